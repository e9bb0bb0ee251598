"""JSON and text the database can store."""

from __future__ import annotations

import json

import pytest

from noetl_pgworker import jsontext

pytestmark = pytest.mark.unit


def test_nul_characters_are_replaced_and_errors_bounded() -> None:
    text = jsontext.dumps({"a\x00": "b\x00c", "l": ["\x00"]})
    assert "\\u0000" not in text
    assert json.loads(text) == {"a\ufffd": "b\ufffdc", "l": ["\ufffd"]}
    assert jsontext.clean_text("x" * 5000) is not None
    assert len(jsontext.clean_text("x" * 5000) or "") == jsontext.ERROR_LIMIT
    assert jsontext.clean_text("a\x00b") == "a\ufffdb"


@pytest.mark.parametrize("value", [{"x": object()}, {"x": float("nan")}, {1j: 2}])
def test_unserialisable_values_raise_a_clear_error(value: object) -> None:
    with pytest.raises(jsontext.NotSerialisable, match="not JSON-serialisable"):
        jsontext.dumps(value)
