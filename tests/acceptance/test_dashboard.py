"""The Grafana dashboard (deploy/grafana/) queries only what a running worker exports: every
metric name in every query, and every label it groups or filters by, is checked against the
/metrics of a real worker process that ran commands."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from noetl_pgworker.enqueue import enqueue

from ..helpers import all_terminal, wait_until

pytestmark = pytest.mark.acceptance
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "noetl-pgworker.json"
#: Labels Prometheus adds to every series it scrapes (job, instance) or Kubernetes
#: service discovery commonly does (namespace, pod).
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
_KEYWORDS = {"by", "without", "and", "or", "unless", "bool", "on", "ignoring", "offset"}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: each panel's targets, and the template variables' queries."""
    exprs: list[str] = []

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        exprs += [t["expr"] for t in panel.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def parse(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses."""
    labels: set[str] = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in clause.split(",") if x.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    # label_values(metric, label): the label is the second argument
    for _, label in re.findall(r"label_values\(\s*([^,\s]+)\s*,\s*([a-zA-Z_]\w*)\s*\)", expr):
        labels.add(label)
    bare = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", " ", bare)
    bare = re.sub(r"label_values\(\s*([^,\s]+)\s*,[^)]*\)", r"(\1)", bare)
    metrics = {
        m[0]
        for m in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", bare)
        if m[0] not in _KEYWORDS and not re.fullmatch(r"[0-9.e+-]+", m[0])
    }
    return metrics, labels


def exported(text: str) -> dict[str, set[str]]:
    """Series names a /metrics page exports (with their suffixes), each with its labels."""
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in _SUFFIXES.get(family.type, ("",)):
            series.setdefault(family.name + suffix, set())
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def problems(exprs: list[str], series: dict[str, set[str]]) -> list[str]:
    found: list[str] = []
    for expr in exprs:
        metrics, labels = parse(expr)
        if not metrics:
            found.append(f"no metric found in {expr!r}")
        for metric in sorted(metrics - set(series)):
            found.append(f"{metric} is not exported ({expr!r})")
        seen = set().union(*(series.get(m, set()) for m in metrics))
        if not seen:
            continue  # no series yet (a labelled counter that never moved): labels unknown
        for label in sorted(labels - seen - TARGET_LABELS):
            found.append(f"label {label} is not on {sorted(metrics)} ({expr!r})")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return bytes(resp.read()).decode()
    except (urllib.error.URLError, OSError):
        return None


@pytest.fixture
def metrics_text(dsn: str, tmp_path: Path) -> Iterator[str]:
    """/metrics of a worker process that completed and failed commands of two kinds."""
    port = _free_port()
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "noetl_pgworker", "start", "--dsn", dsn, "--worker-id", "dash",
         "--metrics-port", str(port), "--poll-interval", "0.5"],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )  # fmt: skip
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            enqueue(conn, tool_kind="noop", count=5)
            enqueue(conn, tool_kind="python", tool_config={"code": "raise ValueError('no')"})
            wait_until(lambda: all_terminal(conn), timeout=60, interval=0.1)
        # the queue-depth sampler has run once the live counts are there
        wait_until(lambda: "noetl_pgworker_queue_depth{" in (scrape(port) or ""), timeout=60)
        text = scrape(port)
        assert text is not None
        yield text
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_every_metric_and_label_the_dashboard_queries_is_exported(metrics_text: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = queries(dashboard)
    assert len(exprs) >= 15
    series = exported(metrics_text)
    assert problems(exprs, series) == []
    # the check itself catches a metric or a label the worker does not export
    wrong = [
        "sum(rate(noetl_pgworker_commands_done_total[5m]))",
        "sum by (kind) (rate(noetl_pgworker_commands_completed_total[5m]))",
    ]
    assert len(problems(wrong, series)) == 2


def test_the_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and all(t["expr"] for t in panel["targets"])
