"""Which templates the worker evaluates itself: only those that cannot loop, allocate beyond a
copy of what they read, or call anything."""

from __future__ import annotations

import pytest

from noetl_pgworker.template_check import all_bounded, is_bounded

pytestmark = pytest.mark.unit

BOUNDED = [
    "plain text",
    "{{ a }}",
    "{{ a.b.c }}",
    "{{ a['b'] }}",
    "{{ a[0].b }}",
    "https://x/{{ a.id }}/y?{{ b }}",
    "{{ a.b | tojson }}",
    "{{ a | default('x') }}",
    "{{ a == 'ok' and b.c != 3 }}",
    "{{ not a }}",
    "{{ a is defined }}",
    "{{ a | length > 2 }}",
    "{{ a | lower }}",
]
UNBOUNDED = [
    "{% for i in range(10) %}{% endfor %}",
    "{{ (9**4096)**4096 > 1 }}",
    "{{ '%0100000000d' % 1 }}",
    "{{ 'x' | center(100000000) }}",
    "{{ '{:>100000000}'.format(1) }}",
    "{{ a | indent(100) }}",
    "{{ a ~ a }}",
    "{{ 'x' * 10 }}",
    "{{ a + 1 }}",
    "{{ a.b() }}",
    "{{ range(10) | list }}",
    "{{ a[b] }}",
    "{{ a | default(b * 2) }}",
    "{{ a | map('upper') | list }}",
    "{{ lipsum(1000) }}",
    "{{ cycler(1) }}",
    "{{ [a, a] }}",
    "{{ {'a': a} }}",
    "{{ 'x%s' | format(a) }}",
    "{{ a | replace('a', 'bb') }}",
    "{{ a" + "[0]" * 2000 + " }}",
    "{{ " + "(" * 500 + "a" + ")" * 500 + " }}",
    "{{ '" + "x" * 2000 + "' }}",
    "{{ a }}" + " " * 5000,
    "{{ a. }}",  # a syntax error: rendered (and kept) in the sandbox
]


@pytest.mark.parametrize("template", BOUNDED)
def test_bounded(template: str) -> None:
    assert is_bounded(template)


@pytest.mark.parametrize("template", UNBOUNDED)
def test_not_bounded(template: str) -> None:
    assert not is_bounded(template)


def test_every_template_in_a_value_is_checked() -> None:
    assert all_bounded({"url": "{{ a.b }}", "headers": {"x": "{{ c }}"}, "n": 1, "l": ["t"]})
    assert not all_bounded({"url": "{{ a.b }}", "headers": {"x": ["{{ c * 9 }}"]}})
    assert all_bounded(None) and all_bounded(["x" * 100_000])
