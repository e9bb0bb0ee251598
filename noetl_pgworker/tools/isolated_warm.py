"""Imported by the isolated fork server before it serves (see
:mod:`noetl_pgworker.tools.isolated`): renders constant templates of its own, so that Jinja's
lexer, parser, compiler and runtime have run — and the interpreter has specialised them —
before any command's process is forked. A process that did that itself would copy every page
it wrote. Nothing of a command is involved."""

from __future__ import annotations

from ..render import _Renderer

#: Every kind of node a template usually has: text, output, loops, conditions, filters, calls.
SAMPLES = (
    "{{ a + 1 }}",
    "x {{ a ~ 'y' }} {% if a > 1 %}{{ b.c | upper }}{% else %}{{ b['c'] }}{% endif %}",
    "{% for i in range(3) %}{{ i * 2 }},{% endfor %}",
    "{{ [a, 2] | tojson }} {{ {'k': a} }} {{ '%s-%d' % ('x', a) }} {{ b.c | default('z') }}",
    "{% set n = namespace(v=0) %}{% for i in l %}{% set n.v = n.v + i %}{% endfor %}{{ n.v }}",
)
CONTEXT = {"a": 2, "b": {"c": "d"}, "l": [1, 2, 3]}
ROUNDS = 50


def warm_up() -> None:
    for round_ in range(ROUNDS):
        renderer = _Renderer({**CONTEXT, "r": round_})
        for sample in SAMPLES:
            renderer.value(sample)
            renderer.value(sample + " ")  # (compiled anew: the compiler runs each round)


warm_up()
