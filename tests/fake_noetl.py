"""A small fake NoETL server for the tests of server mode.

Every rule it enforces was observed on a real NoETL server (the note says where); it is a
hypothesis about NoETL only as far as those notes go:

- 2.103.4: a batch body has only ``execution_id`` (a string), ``worker_id``, ``events``; an
  event only ``step``/``name``/``payload``/``actionable``/``informative``/``meta``; else 422.
- 2.103.4 and 4.26: ``payload.result`` may hold only ``status``, ``reference``, ``context``,
  ``command_id`` (else the batch is refused with a 5xx ``enqueue_error``).
- 4.26: ``/api/events/batch`` answers 202 with a ``request_id`` *before* applying the events.
  The command rows are updated, but the server copies ``payload.result`` verbatim into the
  ``workflow.completed``/``playbook.completed`` events it writes, whose CHECK
  ``chk_event_result_shape`` allows only ``status``, ``reference``, ``context``: with any other
  key (``command_id`` included) the batch fails afterwards, a ``batch.failed`` event is written,
  and the workflow does not advance. ``GET /api/events/batch/{request_id}/status`` says
  ``completed`` or ``failed`` (with the message).
- 2.103.4: the result resolver is mounted at ``/api/api/result/resolve`` (``resolve_prefix``).
- 4.26: ``PUT /api/result/{execution_id}`` (``{name, data, scope, source_step}``) stores data
  and answers ``{ref: "noetl://execution/<id>/result/<name>/<hex>", store, scope, bytes}``; a
  ``call.done`` whose ``response`` has a top-level ``reference`` (``{kind: result_ref, ref,
  store}``) is resolved to the stored data before the step's result is recorded
  (``_hydrate_reference_only_step_result``), so later steps render the data itself.
- 4.26: only the *last* actionable event of a batch (not a ``command.*``/``step.enter``) is
  handed to the workflow engine: two ``call.done`` in one batch advance the workflow once.

It de-duplicates batches by Idempotency-Key and applies what the real server applies: command
status on ``command.started`` and terminal events, an audit row in noetl.event, and, for a
playbook of steps, the next command issued on ``call.done`` and ``playbook.completed`` after
the last step.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg

from noetl_pgworker.events import event_status

EVENT_KEYS = {"step", "name", "payload", "actionable", "informative", "meta"}
#: Events the batch handler never hands to the workflow engine (4.26, batch.py).
NOT_FOR_ENGINE = {
    "command.claimed",
    "command.heartbeat",
    "command.started",
    "command.completed",
    "command.failed",
    "step.enter",
    "step.exit",
}
BATCH_KEYS = {"execution_id", "worker_id", "events"}
SINGLE_KEYS = {
    "execution_id",
    "step",
    "name",
    "payload",
    "worker_id",
    "actionable",
    "informative",
    "meta",
}

#: A playbook: step -> (tool_kind, tool_config, how to build the next step's input, next step)
Step = tuple[str, dict[str, Any], str | None, Callable[[Any], dict[str, Any]] | None]


class FakeNoetl:
    def __init__(self, dsn: str, playbook: dict[str, Step] | None = None) -> None:
        self.dsn = dsn
        self.playbook = playbook or {}
        self.received: list[dict[str, Any]] = []  # every applied event, in order
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.rejections: list[str] = []
        self.keys: set[str] = set()
        self.refs: dict[str, Any] = {}
        self.executions: list[dict[str, Any]] = []  # bodies of POST /api/execute
        self.cancelled: list[tuple[int, Any]] = []  # POST /api/executions/{id}/cancel
        self.down = False
        self.drop_after_apply = 0  # apply, then drop the connection (a lost answer) this often
        self.no_batch = False
        self.resolve_path = "/api/result/resolve"
        self.fail_batches: str | None = None  # fail every batch after accepting it, saying this
        self.batches: dict[str, dict[str, Any]] = {}  # request_id -> {state, message}
        self._next_request = 1000
        self.lock = threading.Lock()
        self.conn = psycopg.connect(dsn, autocommit=True)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_PUT(self) -> None:
                fake._handle(self, "PUT")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.conn.close()

    # -- HTTP --------------------------------------------------------------------------------

    def _reply(self, h: BaseHTTPRequestHandler, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _reject(self, h: BaseHTTPRequestHandler, why: str) -> None:
        self.rejections.append(why)
        self._reply(h, 422, {"detail": why})

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        if self.down:  # a server that is restarting: the connection just drops
            h.close_connection = True
            return
        url = urlsplit(h.path)
        if method == "GET" and url.path.startswith("/api/events/batch/"):
            request_id = url.path.split("/")[4]
            if request_id not in self.batches:
                self._reply(h, 404, {"detail": f"Batch request not found: {request_id}"})
            else:
                self._reply(h, 200, {"request_id": request_id, **self.batches[request_id]})
            return
        if method == "GET" and url.path in ("/api/result/resolve", "/api/api/result/resolve"):
            if url.path != self.resolve_path:
                self._reply(h, 404, {"detail": "Not Found"})
                return
            ref = parse_qs(url.query).get("ref", [""])[0]
            if ref in self.refs:
                self._reply(h, 200, {"data": self.refs[ref]})
            else:
                self._reply(h, 404, {"detail": f"no such ref {ref}"})
            return
        body = json.loads(raw)
        self.requests.append((url.path, dict(h.headers), body))
        if method == "PUT" and url.path.startswith("/api/result/"):
            execution_id = url.path.split("/")[3]
            with self.lock:
                ref = f"noetl://execution/{execution_id}/result/{body['name']}/{len(self.refs):08x}"
                self.refs[ref] = body["data"]
            size = len(json.dumps(body["data"]))
            self._reply(h, 200, {"ref": ref, "store": "kv", "scope": "execution", "bytes": size})
            return
        if url.path == "/api/events/batch" and not self.no_batch:
            problem = self._check_batch(body, raw, h.headers.get("Idempotency-Key"))
            if problem:
                self._reject(h, problem)
                return
            key = str(h.headers["Idempotency-Key"])
            with self.lock:
                self._next_request += 1
                request_id = str(self._next_request)
                if key not in self.keys:
                    self.keys.add(key)
                    problem = self._check_stored_results(body["events"])
                    # 4.26: only the last actionable event of a batch reaches the engine.
                    engine = [
                        i
                        for i, ev in enumerate(body["events"])
                        if ev.get("actionable") and ev["name"] not in NOT_FOR_ENGINE
                    ]
                    last = engine[-1] if engine else -1
                    for i, ev in enumerate(body["events"]):
                        self._apply(
                            int(body["execution_id"]),
                            body["worker_id"],
                            ev,
                            advance=not problem and (i == last or ev["name"] in NOT_FOR_ENGINE),
                        )
                    self.batches[request_id] = (
                        {"state": "failed", "status": "FAILED", "message": problem}
                        if problem
                        else {"state": "completed", "status": "COMPLETED", "message": None}
                    )
                    if problem:
                        self._audit(int(body["execution_id"]), "batch.failed")
                else:
                    self.batches[request_id] = {"state": "completed", "status": "COMPLETED"}
            if self.drop_after_apply:
                self.drop_after_apply -= 1
                h.close_connection = True
                return
            self._reply(
                h,
                202,
                {
                    "status": "accepted",
                    "request_id": request_id,
                    "event_count": len(body["events"]),
                },
            )
        elif url.path == "/api/execute":
            # 4.26 and 2.103.4: {"path", "payload", "parent_execution_id"} → 200 with the new
            # execution's id as a string (a sub-playbook started by a `playbook` step).
            if not isinstance(body.get("path"), str):
                self._reject(h, "path is required")
                return
            self.executions.append(body)
            self._reply(
                h, 200, {"execution_id": str(7000 + len(self.executions)), "status": "started"}
            )
        elif url.path.startswith("/api/executions/") and url.path.endswith("/cancel"):
            # 4.26 and 2.103.4 (tests/e2e/test_runtime.py): {"reason"} → 200
            # {"status": "cancelled", ...}, and an execution.cancelled event.
            execution_id = int(url.path.split("/")[3])
            self.cancelled.append((execution_id, body))
            with self.lock:
                self._audit(execution_id, "execution.cancelled")
            self._reply(h, 200, {"status": "cancelled", "execution_id": str(execution_id)})
        elif url.path == "/api/events":
            extra = set(body) - SINGLE_KEYS
            if extra or not isinstance(body.get("execution_id"), str) or "name" not in body:
                self._reject(h, f"bad single event: {sorted(extra)}")
                return
            with self.lock:
                ev = {k: body[k] for k in EVENT_KEYS if k in body}
                self._apply(int(body["execution_id"]), body.get("worker_id"), ev)
            self._reply(h, 200, {"status": "ok"})
        else:
            self._reply(h, 404, {"detail": "not found"})

    def _check_batch(self, body: Any, raw: bytes, key: str | None) -> str | None:
        if not isinstance(body, dict) or set(body) - BATCH_KEYS:
            return f"unexpected fields {sorted(set(body) - BATCH_KEYS)}"
        if not isinstance(body.get("execution_id"), str):
            return "execution_id must be a string"
        evs = body.get("events")
        if not isinstance(evs, list) or not evs or len(evs) > 256 or len(raw) > 2 * 1024 * 1024:
            return "events must be a list of 1..256 (2 MiB)"
        for ev in evs:
            if set(ev) - EVENT_KEYS or "name" not in ev or "step" not in ev:
                return f"bad event fields {sorted(ev)}"
            result = (ev.get("payload") or {}).get("result")
            if result is not None and set(result) - {
                "status",
                "reference",
                "context",
                "command_id",
            }:
                return f"payload.result has {sorted(result)}"
        if not key or key.count(":") < 2 or key.split(":")[1] != body["execution_id"]:
            return "Idempotency-Key must be <worker_id>:<execution_id>:<uuid>"
        return None

    def _check_stored_results(self, evs: list[dict[str, Any]]) -> str | None:
        """4.26: the envelope is copied into events under chk_event_result_shape."""
        if self.fail_batches:
            return self.fail_batches
        for ev in evs:
            result = (ev.get("payload") or {}).get("result")
            if isinstance(result, dict) and set(result) - {"status", "reference", "context"}:
                return (
                    'new row for relation "event" violates check constraint'
                    f' "chk_event_result_shape" (payload.result has {sorted(result)})'
                )
        return None

    # -- what the real server does with an event --------------------------------------------

    def _apply(
        self, execution_id: int, worker_id: str | None, ev: dict[str, Any], advance: bool = True
    ) -> None:
        self.received.append({"execution_id": execution_id, **ev})
        name, payload = ev["name"], ev.get("payload") or {}
        command_id = int(payload.get("command_id") or ev.get("meta", {}).get("command_id"))
        c = self.conn
        catalog = c.execute(
            "SELECT catalog_id FROM noetl.command WHERE execution_id = %s LIMIT 1", (execution_id,)
        ).fetchone()
        result = payload.get("result")
        envelope = None
        if isinstance(result, dict):
            envelope = {k: v for k, v in result.items() if k in ("status", "reference", "context")}
        c.execute(
            "INSERT INTO noetl.event (execution_id, catalog_id, event_id, event_type, node_id,"
            " node_name, status, result, meta, error, worker_id, command_id)"
            " VALUES (%s, %s, noetl.snowflake_id(), %s, %s, %s, %s, %s::jsonb, %s::jsonb,"
            " %s, %s, %s)",
            (
                execution_id,
                catalog[0] if catalog else 0,
                name,
                ev["step"],
                ev["step"],
                event_status(name),
                json.dumps(envelope) if envelope else None,
                json.dumps(ev.get("meta")),
                payload.get("error"),
                worker_id,
                command_id,
            ),
        )
        if name == "command.started":
            c.execute(
                "UPDATE noetl.command SET status = 'RUNNING',"
                " started_at = COALESCE(started_at, now()),"
                " updated_at = now() WHERE execution_id = %s AND command_id = %s"
                " AND completed_at IS NULL",
                (execution_id, command_id),
            )
        elif name in ("command.completed", "command.failed"):
            c.execute(
                "UPDATE noetl.command SET status = %s, completed_at = now(), result = %s::jsonb,"
                " error = %s, updated_at = now() WHERE execution_id = %s AND command_id = %s"
                " AND status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')",
                (
                    "COMPLETED" if name == "command.completed" else "FAILED",
                    json.dumps(envelope) if envelope else None,
                    payload.get("error"),
                    execution_id,
                    command_id,
                ),
            )
            step = self.playbook.get(ev["step"])
            if advance and step and step[2] is None and name == "command.completed":
                for final in ("workflow.completed", "playbook.completed"):
                    self._audit(execution_id, final)
            if advance and name == "command.failed":
                for final in ("workflow.failed", "playbook.failed"):
                    self._audit(execution_id, final)
        elif name == "call.done" and ev.get("actionable") and advance:
            step = self.playbook.get(ev["step"])
            if step and step[2] is not None and step[3] is not None:
                nxt = step[2]
                kind, config, _, _ = self.playbook[nxt]
                response = self._hydrated(payload.get("response"))
                self.issue(execution_id, nxt, kind, config, step[3](response))

    def _hydrated(self, response: Any) -> Any:
        """4.26: a response that is a reference stands for the stored data (merged over it)."""
        reference = response.get("reference") if isinstance(response, dict) else None
        if not isinstance(reference, dict) or reference.get("ref") not in self.refs:
            return response
        data = self.refs[reference["ref"]]
        return {**data, "reference": reference} if isinstance(data, dict) else data

    def _audit(self, execution_id: int, name: str) -> None:
        self.conn.execute(
            "INSERT INTO noetl.event (execution_id, catalog_id, event_id, event_type, status)"
            " SELECT %s, catalog_id, noetl.snowflake_id(), %s, %s FROM noetl.command"
            " WHERE execution_id = %s LIMIT 1",
            (execution_id, name, event_status(name), execution_id),
        )

    def issue(
        self,
        execution_id: int,
        step: str,
        kind: str,
        config: dict[str, Any],
        args: dict[str, Any],
        catalog_id: int | None = None,
    ) -> int:
        """Write a command the way the server does (the next step of a workflow)."""
        c = self.conn
        if catalog_id is None:
            row = c.execute(
                "SELECT catalog_id FROM noetl.command WHERE execution_id = %s LIMIT 1",
                (execution_id,),
            ).fetchone()
            catalog_id = int(row[0])
        row = c.execute(
            "WITH ids AS (SELECT noetl.snowflake_id() AS cid, noetl.snowflake_id() AS eid),"
            " ev AS (INSERT INTO noetl.event (execution_id, catalog_id, event_id, event_type,"
            "  node_id, node_name, status, meta, command_id)"
            "  SELECT %(x)s, %(cat)s, eid, 'command.issued', %(step)s::text, %(step)s::text,"
            "  'PENDING',"
            "  jsonb_build_object('command_id', cid, 'step', %(step)s::text), cid FROM ids)"
            " INSERT INTO noetl.command (command_id, event_id, execution_id, catalog_id, step_name,"
            "  tool_kind, context, meta)"
            " SELECT cid, eid, %(x)s, %(cat)s, %(step)s::text, %(kind)s, %(ctx)s::jsonb,"
            "  jsonb_build_object('command_id', cid, 'step', %(step)s::text, 'actionable', true)"
            " FROM ids RETURNING command_id",
            {
                "x": execution_id,
                "cat": catalog_id,
                "step": step,
                "kind": kind,
                "ctx": json.dumps({"tool_config": config, "input": args, "render_context": {}}),
            },
        ).fetchone()
        return int(row[0])
