"""Templates rendered as NoETL's worker renders them."""

from __future__ import annotations

from typing import Any

import pytest

from noetl_pgworker.models import Command
from noetl_pgworker.render import (
    command_context,
    render_args,
    render_http,
    render_shell,
    render_sql,
    render_text,
    render_value,
)

CTX: dict[str, Any] = {
    "fetch": {"rows": [{"id": 1}, {"id": 2}], "row_count": 2, "context": {"page": 3}},
    "ids": [10, 20, 30],
    "workload": {"region": "eu", "limits": {"n": 5}},
    "ctx": {"flag": True},
    "name": "Ann",
}


def command(
    config: dict[str, Any] | None = None,
    args: dict[str, Any] | None = None,
    render_context: dict[str, Any] | None = None,
) -> Command:
    context: dict[str, Any] = {"tool_config": config or {}, "input": args or {}}
    if render_context is not None:
        context["render_context"] = render_context
    return Command(
        command_id="99",
        execution_id=5,
        step="step_a",
        tool_kind="noop",
        catalog_id=1,
        input=context,
    )


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("no template", "no template"),
        ("{ not: jinja }", "{ not: jinja }"),
        # a bare reference is the value itself
        ("{{ fetch }}", CTX["fetch"]),
        ("{{ fetch.rows }}", [{"id": 1}, {"id": 2}]),
        ("  {{ workload.limits }} ", {"n": 5}),
        ("{{ ids }}", [10, 20, 30]),
        # rendered text is parsed back
        ("{{ fetch.row_count + 1 }}", 3),
        ("{{ ctx.flag }}", True),
        ("{{ ids | length > 2 }}", True),
        ("[{{ ids[0] }}, {{ ids[1] }}]", [10, 20]),
        ("{{ workload.limits }}{{ '' }}", {"n": 5}),
        ("{{ '1.5' }}", 1.5),
        ("{{ 'null' }}", None),
        # ...except with tojson
        ("{{ fetch.rows | tojson }}", '[{"id": 1}, {"id": 2}]'),
        ("{{ 7 | tojson }}", "7"),
        # text around a value
        ("id={{ fetch.rows[1].id }}", "id=2"),
        ("hi {{ name }}", "hi Ann"),
        # step results as NoETL's proxy shows them
        ("{{ fetch.data.rows[0].id }}", 1),
        ("{{ fetch.page }}", 3),
        ("{{ ids.result | length }}", 3),
        ("{% for r in fetch.rows %}{{ r.id }};{% endfor %}", "1;2;"),
        ("x {{ fetch.rows[0] }}", "x {'id': 1}"),
        ("{{ 'Ann' | b64encode }}", "QW5u"),
        # missing names render empty; their attributes keep the template
        ("{{ missing }}", ""),
        ("a{{ missing }}b", "ab"),
        ("{{ missing.attr }}", "{{ missing.attr }}"),
        ("{{ fetch.nothing }}", ""),
        ("{{ broken", "{{ broken"),
        ("{{ 1 / 0 }}", "{{ 1 / 0 }}"),
    ],
)
def test_render_value(template: str, expected: Any) -> None:
    assert render_value(template, CTX) == expected


def test_a_step_result_renders_as_json_inside_text() -> None:
    context = {"fetch": {"rows": [{"a": 1}]}}
    assert render_value("r={{ fetch.rows[0] }} all={{ fetch }}", context) == (
        'r={\'a\': 1} all={"rows": [{"a": 1}]}'
    )


def test_dicts_and_lists_are_rendered_item_by_item_keys_untouched() -> None:
    value = {"{{ name }}": ["{{ name }}", 1, None, {"n": "{{ workload.limits.n }}"}], "e": {}}
    assert render_value(value, CTX) == {"{{ name }}": ["Ann", 1, None, {"n": 5}], "e": {}}


@pytest.mark.parametrize(
    "template",
    [
        "{{ fetch.__class__ }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ 'x' * 100000000 }}",
        "{{ [1] * 100000000 }}",
        "{{ 9 ** 99999999 }}",
    ],
)
def test_templates_run_in_a_sandbox(template: str) -> None:
    # unsafe attributes are undefined (empty) or refused (the template is kept); nothing runs
    out = render_value(template, CTX)
    assert out in ("", template)


def test_render_text_does_not_parse_back() -> None:
    assert render_text("{{ 1 + 1 }}", {}) == "2"
    assert render_text("{{ fetch.rows }}", CTX) == "[{'id': 1}, {'id': 2}]"
    assert render_text("{{ missing.x }}", {}) == "{{ missing.x }}"


def test_command_context_adds_what_noetls_worker_adds() -> None:
    bare = command_context(command(args={"n": 1}))
    assert bare["input"] == {"n": 1} and bare["step"] == "step_a"
    assert bare["execution_id"] == "5" and bare["command_id"] == "99"
    assert bare["event"] == {"command_id": "99"}
    assert bare["job"] == {"uuid": "5", "execution_id": "5"}
    served = command_context(
        command(args={"n": 1}, render_context={"execution_id": "5", "fetch": {"a": 1}})
    )
    assert served["fetch"] == {"a": 1} and served["input"] == {"n": 1} and "step" not in served


def test_render_sql_quotes_the_arguments_not_the_context() -> None:
    cmd = command(
        config={"query": "ignored"},
        args={"who": "O'Brien", "n": 3},
        render_context={"note": "it's", "workload": {"t": "x"}},
    )
    sql = "SELECT '{{ who }}', {{ n }}, '{{ note }}', '{{ input.who }}', '{{ workload.t }}'"
    assert render_sql(cmd, sql) == "SELECT 'O''Brien', 3, 'it's', 'O'Brien', 'x'"
    assert render_sql(cmd, sql, quote=False).startswith("SELECT 'O'Brien', 3")
    assert render_sql(cmd, ["SELECT {{ n }}", "SELECT 1"]) == ["SELECT 3", "SELECT 1"]


def test_render_http_renders_the_request_parts() -> None:
    cmd = command(args={"id": 7}, render_context={"api": {"base": "https://x.test"}, "k": "v"})
    cfg = {
        "url": "{{ api.base }}/items/{{ input.id }}",
        "params": {"q": "{{ k }}"},
        "headers": {"X-K": "{{ k }}"},
        "payload": {"ids": "{{ [1, 2] }}"},
        "method": "{{ not_rendered }}",
    }
    out = render_http(cmd, cfg)
    assert out["url"] == "https://x.test/items/7" and out["params"] == {"q": "v"}
    assert out["headers"] == {"X-K": "v"} and out["payload"] == {"ids": [1, 2]}
    assert out["method"] == "{{ not_rendered }}"


def test_render_shell_renders_text_against_the_render_context() -> None:
    cmd = command(args={"a": "arg"}, render_context={"who": "world", "n": {"x": 1}})
    cfg = {"command": "echo {{ who }} {{ a }} {{ n.x }}", "env": {"N": "{{ n.x }}", "M": 5}}
    out = render_shell(cmd, cfg)
    # shell does not see the arguments at the top level (NoETL's shell tool), only as input
    assert out["command"] == "echo world  1" and out["env"] == {"N": "1", "M": 5}
    argv = render_shell(cmd, {"command": ["echo", "{{ who }}"]})
    assert argv["command"] == ["echo", "world"]


def test_render_args_as_noetls_python_tool() -> None:
    cmd = command(render_context={"fetch": {"rows": [1]}, "who": "Ann"})
    args = {
        "data": "{{ fetch }}",
        "greeting": "hi {{ who }}",
        "items": "[1, 2]",
        "rows": "{{ fetch.rows }}",
        "n": 3,
    }
    assert render_args(cmd, args) == {
        "data": {"rows": [1]},
        "greeting": "hi Ann",
        "items": [1, 2],
        "rows": [1],
        "n": 3,
    }
