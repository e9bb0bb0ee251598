"""Server mode: report to a NoETL server over HTTP, so that playbooks advance.

NoETL's workflow engine advances only inside its HTTP event handlers. With ``--server-url``
the worker still claims in SQL, but it reports each command's lifecycle to the server the way
NoETL's own worker does, and writes no status or event rows itself (the server does):

- ``POST {server}/api/events/batch`` with ``Idempotency-Key: <worker>:<execution>:<uuid>`` and
  ``{"execution_id": "<id>", "worker_id", "events": [{"step", "name", "payload", "actionable",
  "informative", "meta"}]}`` (≤ 256 events, ≤ 2 MiB; answer 202), one batch per execution per
  flush; a command's ``call.*``, ``step.exit`` and ``command.*`` always travel in one batch.
- ``POST {server}/api/events`` one event at a time, only if the batch endpoint is missing.
- Connection errors, 408/425/429/5xx: kept and retried with backoff (``Retry-After`` honoured;
  the same content is re-sent with the same idempotency key). Other 4xx: logged with the
  server's answer, and the command is reported failed instead (once).
- Context fields the server externalised (``{"kind": "result_ref"|"temp_ref", "ref": …}``) are
  resolved with ``GET {server}/api/result/resolve?ref=…`` before the tool runs.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import httpx
from psycopg_pool import ConnectionPool

from . import threads
from .batches import BatchChecker
from .db import write_errors
from .errors import PgWorkerError, RetryLater, ToolError
from .externalise import Externaliser, Refused
from .jsontext import clean_text, dumps
from .models import Command, CommandRef, CommandStatus, Outcome
from .queries import query
from .sink import Key, WriteItem, shape

logger = logging.getLogger(__name__)

MAX_EVENTS = 256
MAX_BYTES = 2 * 1024 * 1024
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504}
REF_KINDS = ("result_ref", "temp_ref")
EXTERNALISED_FIELDS = ("tool_config", "input", "render_context", "spec")


class ServerRejected(PgWorkerError):
    """The server refused a batch with a 4xx that retrying will not change."""

    def __init__(self, status: int, answer: str) -> None:
        super().__init__(f"HTTP {status}: {answer[:500]}")
        self.status = status
        self.answer = answer


#: The tool output travels whole in ``call.done|call.error``'s ``response`` (the engine stores it
#: as the step result that later steps render); above this it is a summary. The server refuses a
#: batch whose payloads pass 2 MiB.
RESPONSE_LIMIT = 1536 * 1024
#: Seconds to wait for the server's answer when data moves to or from its result store: it
#: scans what it stores (a few MB take it seconds, on a busy host tens of seconds).
DATA_TIMEOUT = 60.0
#: Keys NoETL's worker never puts in a result envelope's ``context`` (data, not control).
_BLOCKED_CONTEXT_KEYS = frozenset(
    {
        "_ref",
        "_preview",
        "_size_bytes",
        "_store",
        "_store_failed",
        "_store_error",
        "_inline",
        "_internal_data",
        "data",
        "response",
        "result",
        "payload",
        "rows",
        "columns",
    }
)


def _meta(ref: CommandRef, worker_id: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"command_id": ref.wire_command_id, "worker_id": worker_id}
    if ref.loop_epoch_id is not None:
        # NoETL's engine reads a loop iteration's epoch and index from the event's meta.
        meta["__loop_epoch_id"] = ref.loop_epoch_id
        meta["loop_iteration_index"] = ref.loop_index
    return meta


def _event(
    ref: CommandRef, name: str, payload: dict[str, Any], worker_id: str, *, actionable: bool
) -> dict[str, Any]:
    return {
        "step": ref.step,
        "name": name,
        "payload": payload,
        "actionable": actionable,
        "informative": True,
        "meta": _meta(ref, worker_id),
    }


def start_events(ref: CommandRef, worker_id: str) -> list[dict[str, Any]]:
    """``command.started`` and ``step.enter``: may travel ahead of the outcome."""
    cid = ref.wire_command_id
    return [
        _event(
            ref,
            "command.started",
            {"command_id": cid, "worker_id": worker_id},
            worker_id,
            actionable=False,
        ),
        _event(
            ref, "step.enter", {"status": "started", "command_id": cid}, worker_id, actionable=False
        ),
    ]


def control_context(value: Any) -> dict[str, Any] | None:
    """What NoETL's worker keeps of a tool output in an envelope's ``context``: its scalar
    fields and the scalar fields of its objects; no lists, no data-carrying keys."""
    if not isinstance(value, dict):
        return None
    out: dict[str, Any] = {}
    for key, item in value.items():
        key = str(key)
        if key in _BLOCKED_CONTEXT_KEYS or (key.startswith("command_") and key != "command_id"):
            continue
        if item is None or isinstance(item, bool | int | float | str):
            out[key] = clean_text(item, 1000) if isinstance(item, str) else item
        elif isinstance(item, dict):
            inner = {
                str(k): (clean_text(v, 1000) if isinstance(v, str) else v)
                for k, v in item.items()
                if v is None or isinstance(v, bool | int | float | str)
            }
            if inner:
                out[key] = inner
    return out or None


def envelope(status: str, value: Any) -> dict[str, Any]:
    """A result envelope NoETL stores as is: ``status`` and, when there is one, ``context``.
    Nothing else: the server copies it into events its CHECK allows only these keys in."""
    env: dict[str, Any] = {"status": status}
    context = control_context(value)
    if context:
        env["context"] = context
    return env


def bounded_response(data: Any, limit: int = RESPONSE_LIMIT) -> Any:
    """The tool output, or a summary saying it was too large to send."""
    if data is None:
        return None
    text = dumps(data)
    size = len(text.encode())
    if size <= limit:
        return data
    return {
        "truncated": True,
        "original_bytes": size,
        "limit_bytes": limit,
        "preview": text[:1000],
    }


def outcome_events(
    ref: CommandRef,
    outcome: Outcome,
    worker_id: str,
    *,
    loop_event_id: str | None = None,
    iter_index: int | None = None,
) -> list[dict[str, Any]]:
    """``call.done|call.error``, ``step.exit``, ``command.completed|command.failed``: one batch,
    shaped as NoETL's own worker sends them."""
    cid = ref.wire_command_id
    status = "COMPLETED" if outcome.ok else "FAILED"
    response = bounded_response(outcome.data)
    loop = {
        "loop_event_id": loop_event_id if loop_event_id is not None else ref.loop_epoch_id,
        "loop_iteration_index": iter_index if iter_index is not None else ref.loop_index,
    }
    error = clean_text(outcome.error)
    if outcome.ok:
        result = envelope(status, response)
        call, final = _done_events(ref, response, result, worker_id, loop)
    else:
        failure = {"error": error, "error_type": outcome.error_type}
        if isinstance(response, dict):
            failure = {**response, **failure}
        result = envelope(status, failure)
        call, final = _error_events(ref, outcome, response, result, worker_id, loop)
    if outcome.extra:  # captured output: beside the data, never in the step's result
        context = result.setdefault("context", {})
        for key, value in outcome.extra.items():
            if isinstance(value, str):
                context[key] = clean_text(value, 4000)
    exit_ = _event(
        ref,
        "step.exit",
        {"status": status, "result": result, "error": error, "command_id": cid},
        worker_id,
        actionable=False,
    )
    return [call, exit_, final]


def _done_events(
    ref: CommandRef, response: Any, result: dict[str, Any], worker_id: str, loop: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``call.done`` and ``command.completed``."""
    cid = ref.wire_command_id
    call = _event(
        ref,
        "call.done",
        {"response": response, "result": result, "command_id": cid, **loop},
        worker_id,
        actionable=True,
    )
    final = _event(
        ref,
        "command.completed",
        {"command_id": cid, "worker_id": worker_id, "result": result},
        worker_id,
        actionable=False,
    )
    return call, final


def _error_events(
    ref: CommandRef,
    outcome: Outcome,
    response: Any,
    result: dict[str, Any],
    worker_id: str,
    loop: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``call.error`` and ``command.failed``."""
    cid = ref.wire_command_id
    error = clean_text(outcome.error)
    call = _event(
        ref,
        "call.error",
        {"error": error, "response": response, "result": result, "command_id": cid, **loop},
        worker_id,
        actionable=True,
    )
    final = _event(
        ref,
        "command.failed",
        {
            "command_id": cid,
            "worker_id": worker_id,
            "error": error,
            "error_type": outcome.error_type,
            "result": result,
        },
        worker_id,
        actionable=False,
    )
    return call, final


def item_events(item: WriteItem, worker_id: str) -> list[dict[str, Any]]:
    evs = start_events(item.ref, worker_id) if item.started else []
    if item.outcome is not None:
        evs += outcome_events(
            item.ref,
            item.outcome,
            worker_id,
            loop_event_id=item.loop_event_id,
            iter_index=item.iter_index,
        )
    return evs


def batch_body(execution_id: int, worker_id: str, evs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"execution_id": str(execution_id), "worker_id": worker_id, "events": evs}


def idempotency_key(worker_id: str, execution_id: int, body: str) -> str:
    """Same content, same key: a batch re-sent after a lost answer is not applied twice."""
    digest = uuid.uuid5(uuid.NAMESPACE_URL, f"noetl-pgworker:{body}").hex
    return f"{worker_id}:{execution_id}:{digest}"


class NoetlServer:
    """A small client of NoETL's HTTP API."""

    def __init__(
        self, base_url: str, *, timeout: float = 10.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers={"User-Agent": "noetl-pgworker"},
        )
        self._batch_supported = True
        self._resolve_path = "/api/result/resolve"

    def close(self) -> None:
        self._client.close()

    def post_batch(
        self, execution_id: int, worker_id: str, evs: list[dict[str, Any]]
    ) -> str | None:
        """Send one batch; the server's ``request_id`` for it (None if it gave none, or the
        events went one by one). Raise RetryLater or ServerRejected on failure."""
        body = batch_body(execution_id, worker_id, evs)
        text = json.dumps(body, separators=(",", ":"))
        if self._batch_supported:
            resp = self._send(
                "POST",
                "/api/events/batch",
                text,
                {"Idempotency-Key": idempotency_key(worker_id, execution_id, text)},
            )
            if resp.status_code in (404, 405):
                logger.warning(
                    "the server has no /api/events/batch; sending events one by one",
                    extra={"action": "batch_unsupported"},
                )
                self._batch_supported = False
            else:
                self._check(resp)
                try:
                    answer = resp.json()
                except ValueError:
                    return None
                request_id = answer.get("request_id") if isinstance(answer, dict) else None
                return str(request_id) if request_id is not None else None
        for ev in evs:
            single = {"execution_id": str(execution_id), "worker_id": worker_id, **ev}
            self._check(self._send("POST", "/api/events", json.dumps(single), {}))
        return None

    def batch_status(self, request_id: str) -> dict[str, Any]:
        """``GET /api/events/batch/{request_id}/status``: ``{"state": …, "message": …}``."""
        resp = self._send("GET", f"/api/events/batch/{request_id}/status", None, {})
        self._check(resp)
        answer = resp.json()
        return answer if isinstance(answer, dict) else {}

    def resolve(self, ref: str) -> Any:
        """The data behind a reference NoETL's server left in a command's context."""
        resp = self._send(
            "GET", self._resolve_path, None, {}, params={"ref": ref}, read_timeout=DATA_TIMEOUT
        )
        if resp.status_code == 404 and _route_missing(resp):
            # Observed on NoETL 2.103.4: the route is mounted twice-prefixed.
            other = "/api/api/result/resolve"
            if self._resolve_path == other:
                other = "/api/result/resolve"
            again = self._send(
                "GET", other, None, {}, params={"ref": ref}, read_timeout=DATA_TIMEOUT
            )
            if not (again.status_code == 404 and _route_missing(again)):
                self._resolve_path = other
                resp = again
        self._check(resp)
        return resp.json()

    def put_result(self, execution_id: int, step: str, data: Any) -> dict[str, Any]:
        """Store a step's output with the server's result store (``PUT /api/result/{id}``);
        the server's answer (``ref``, ``store``, ``bytes``). RetryLater when worth retrying,
        :class:`~noetl_pgworker.externalise.Refused` when not."""
        body = dumps({"name": step, "data": data, "scope": "execution", "source_step": step})
        path = f"{self._resolve_path.removesuffix('/resolve')}/{execution_id}"
        resp = self._send("PUT", path, body, {}, read_timeout=DATA_TIMEOUT)
        if resp.status_code == 404 and _route_missing(resp):  # NoETL 2.103.4's double prefix
            other = "/api/result" if path.startswith("/api/api/") else "/api/api/result"
            resp = self._send("PUT", f"{other}/{execution_id}", body, {}, read_timeout=DATA_TIMEOUT)
        try:
            self._check(resp)
            answer = resp.json()
        except ServerRejected as exc:
            raise Refused(str(exc)) from None
        except ValueError:
            raise Refused("the server's answer is not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("ref"), str):
            raise Refused(f"the server's answer has no ref: {str(answer)[:200]}")
        return answer

    def _send(
        self,
        method: str,
        path: str,
        content: str | None,
        headers: dict[str, str],
        params: dict[str, str] | None = None,
        read_timeout: float | None = None,
    ) -> httpx.Response:
        timeout: Any = httpx.USE_CLIENT_DEFAULT
        if read_timeout is not None:
            timeout = httpx.Timeout(self._client.timeout.connect, read=read_timeout)
        try:
            return self._client.request(
                method,
                path,
                content=content,
                params=params,
                headers={"Content-Type": "application/json", **headers},
                timeout=timeout,
            )
        except httpx.HTTPError as exc:
            raise RetryLater(f"NoETL server {self.base_url} unreachable: {exc}") from exc

    @staticmethod
    def _check(resp: httpx.Response) -> None:
        if resp.is_success:
            return
        if resp.status_code in RETRY_STATUSES:
            raise RetryLater(
                f"NoETL server answered {resp.status_code}",
                retry_after=_retry_after(resp.headers.get("Retry-After")),
            )
        raise ServerRejected(resp.status_code, resp.text)


def _route_missing(resp: httpx.Response) -> bool:
    """A 404 for a path the server does not have (not for a reference it does not know)."""
    try:
        return bool(resp.json() == {"detail": "Not Found"})
    except ValueError:
        return True


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


class HttpSink:
    """Server mode's sink: events to the NoETL server, fenced by a read of the claim first."""

    def __init__(
        self,
        server: NoetlServer,
        pool: ConnectionPool[Any],
        worker_id: str,
        checker: BatchChecker | None = None,
    ) -> None:
        self._server = server
        self._pool = pool
        self._worker_id = worker_id
        self._checker = checker
        self._externaliser = Externaliser(server.put_result)

    def _still_held(self, items: list[WriteItem]) -> set[Key]:
        rows = dumps(
            [{"execution_id": i.ref.execution_id, "command_id": i.ref.command_id} for i in items]
        )
        with write_errors(), self._pool.connection(timeout=10) as conn:
            found = conn.execute(
                query("held_commands"),
                {
                    "items": rows,
                    "worker_id": self._worker_id,
                    "execution_ids": sorted({i.ref.execution_id for i in items}),
                    "command_ids": [i.ref.command_id for i in items],
                },
            ).fetchall()
        return {(int(e), int(c)) for e, c in found}

    def write(self, items: list[WriteItem]) -> set[Key]:
        # A command the worker's stop interrupted is not reported: its claim stays, and is
        # taken back (by this worker id's next start at once, by others after the lease).
        # A cancelled one is reported as failed (NoETL's server knows no command.cancelled).
        given_back = {i.key for i in items if i.status == CommandStatus.PENDING}
        items = [i for i in items if i.key not in given_back]
        # Outputs too large for an event go to the server's result store first.
        items = [self._externaliser.item(item) for item in items]
        # Shaped before anything is sent: an outcome that cannot be is refused alone.
        shaped = {
            item.key: shape(item, lambda i: _sized(item_events(i, self._worker_id)))
            for item in items
        }
        held = self._still_held(items)
        by_execution: dict[int, list[WriteItem]] = {}
        for item in items:
            # A lost claim is not reported: the new owner will. (A poison command this worker
            # failed itself in SQL is reported although its row is already terminal.)
            if item.key in held or item.unfenced:
                by_execution.setdefault(item.ref.execution_id, []).append(item)
        written: set[Key] = set()
        for execution_id, group in by_execution.items():
            for chunk in _chunks(group, shaped):
                evs = [e for item in chunk for e in shaped[item.key][0]]
                try:
                    request_id = self._server.post_batch(execution_id, self._worker_id, evs)
                except RetryLater as exc:
                    raise RetryLater(
                        str(exc), written=written, retry_after=exc.retry_after
                    ) from exc
                except ServerRejected as exc:
                    self._rejected(execution_id, chunk, exc)
                else:
                    if request_id is not None and self._checker is not None:
                        self._checker.track(
                            request_id, execution_id, [i.ref.command_id for i in chunk]
                        )
                written.update(item.key for item in chunk)
        self._externaliser.written(written)
        return written | given_back

    def _rejected(self, execution_id: int, chunk: list[WriteItem], exc: ServerRejected) -> None:
        logger.error(
            "the NoETL server refused the events of %d command(s) of execution %s: %s",
            len(chunk),
            execution_id,
            exc,
            extra={"action": "server_rejected"},
        )
        finals = [i for i in chunk if i.outcome is not None]
        if not finals:
            return
        failure = Outcome.failure(
            f"the NoETL server refused the worker's events: {exc}", error_type="server_rejected"
        )
        evs = [e for i in finals for e in outcome_events(i.ref, failure, self._worker_id)]
        try:
            self._server.post_batch(execution_id, self._worker_id, evs)
        except ServerRejected as again:
            logger.error(
                "the server refused the failure report too (%s); giving up on %s",
                again,
                [i.ref.command_id for i in finals],
                extra={"action": "server_rejected"},
            )


def _sized(evs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Events and the size of their JSON in bytes."""
    return evs, len(dumps(evs).encode())


def _chunks(
    items: list[WriteItem], shaped: dict[Key, tuple[list[dict[str, Any]], int]]
) -> Iterable[list[WriteItem]]:
    """Batches within the server's limits; one command's events are never split, and a batch
    carries at most one outcome.

    Observed on NoETL 4.26: the batch handler hands only the *last* actionable event of a
    request to the workflow engine, so two ``call.done`` in one batch advance the workflow
    once (a loop or a fan-out then waits forever). NoETL's own worker sends one batch per
    command outcome; so does this. Start events (not actionable) may share a batch."""
    chunk: list[WriteItem] = []
    count = size = 0
    has_outcome = False
    for item in items:
        evs, b = shaped[item.key]
        n = len(evs)
        full = count + n > MAX_EVENTS or size + b > MAX_BYTES - 4096
        if chunk and (full or (has_outcome and item.outcome is not None)):
            yield chunk
            chunk, count, size, has_outcome = [], 0, 0, False
        chunk.append(item)
        count += n
        size += b
        has_outcome = has_outcome or item.outcome is not None
    if chunk:
        yield chunk


def is_ref(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and value.get("kind") in REF_KINDS
        and isinstance(value.get("ref"), str)
    )


def resolver(server: NoetlServer | None) -> Callable[[Command], Command]:
    """Replace externalised context fields by their data (or fail the command saying why)."""

    def prepare(command: Command) -> Command:
        refs = {k: v for k, v in command.input.items() if k in EXTERNALISED_FIELDS and is_ref(v)}
        if not refs:
            return command
        if server is None:
            names = ", ".join(f"context.{k}" for k in refs)
            first = next(iter(refs.values()))["ref"]
            raise ToolError(
                f"{names} was moved out of the row by NoETL's server ({first});"
                " it can be resolved only in server mode (--server-url)",
            )
        resolved = dict(command.input)
        for key, value in refs.items():
            try:
                data = server.resolve(value["ref"])
            except (RetryLater, ServerRejected) as exc:
                raise ToolError(f"cannot resolve context.{key} ({value['ref']}): {exc}") from None
            resolved[key] = (
                data.get("data", data) if isinstance(data, dict) and "data" in data else data
            )
        return command.model_copy(update={"input": resolved})

    return prepare


class CommandHeartbeats:
    """``command.heartbeat`` every ``interval`` seconds for commands that run long."""

    def __init__(
        self,
        server: NoetlServer,
        worker_id: str,
        running: Callable[[], list[tuple[CommandRef, float]]],
        interval: float = 15.0,
    ) -> None:
        self._server = server
        self._worker_id = worker_id
        self._running = running
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="noetl-pgworker-cmd-heartbeat", daemon=True
        )

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        threads.join(self._thread, timeout)

    def _run(self) -> None:
        import time

        while not self._stop.wait(self._interval):
            now = time.monotonic()
            by_execution: dict[int, list[dict[str, Any]]] = {}
            for ref, since in self._running():
                if now - since >= self._interval:
                    by_execution.setdefault(ref.execution_id, []).append(
                        _event(
                            ref,
                            "command.heartbeat",
                            {"command_id": ref.wire_command_id, "worker_id": self._worker_id},
                            self._worker_id,
                            actionable=False,
                        )
                    )
            for execution_id, evs in by_execution.items():
                try:
                    self._server.post_batch(execution_id, self._worker_id, evs)
                except Exception as exc:  # a missed heartbeat is logged, not fatal
                    logger.warning(
                        "command heartbeat not delivered: %s",
                        exc,
                        extra={"action": "cmd_heartbeat_failed"},
                    )
