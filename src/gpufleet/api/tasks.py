"""``/api/v1/tasks``: submit, read, list, cancel, wait for and follow queued work.

``POST`` answers 202 with the stored task once the enqueue script has run (with AOF
``appendfsync always`` that means on disk). The body limit (``server.max_body_bytes``,
413) is enforced here, on ``Content-Length`` and on the bytes actually streamed, before
anything is parsed or written; validation errors are 422 naming the field. Nothing is
written to Redis for a rejected request.

Callers see their own tasks; admin keys (and everyone when auth is off) see all.
The queue itself is built by ``create_app`` (``Services.queue``, ``gpufleet.wiring``).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.requests import ClientDisconnect

from gpufleet.api.auth import Principal, authenticate, require_budget
from gpufleet.api.cursors import BadCursor, CursorCodec
from gpufleet.api.deps import get_cursors, get_queue, get_results, get_settings
from gpufleet.api.requirements import gpu_fit
from gpufleet.api.streams import event_stream
from gpufleet.domain import Engine, TaskStatus, public_worker_id
from gpufleet.errors import Forbidden, TaskNotFound
from gpufleet.results import ResultStore, guess_content_type, safe_name
from gpufleet.routing import pool_serves
from gpufleet.settings import PoolSpec
from gpufleet.store.queue import TaskQueue
from gpufleet.tasks import Task, TaskSubmit

router = APIRouter(prefix="/api/v1/tasks", tags=["tasks"])

# Not validated by FastAPI: an id that is not well-formed names no task, so it is the same
# 404 as any other unknown id (scripts check "unknown task -> 404"), checked in ``_visible``.
TASK_ID = Path(description="Task id.")
WELL_FORMED_ID = re.compile(r"[0-9a-z]{1,64}")
MAX_WAIT_S = 300.0
# The body is read by hand (for the 413 check), so its schema is declared for /docs; the
# Engine enum it refers to is in the components because Task uses it too.
SUBMIT_SCHEMA = {
    k: v
    for k, v in TaskSubmit.model_json_schema(ref_template="#/components/schemas/{model}").items()
    if k != "$defs"
}


class TaskList(BaseModel):
    tasks: list[Task]
    next_cursor: str | None = Field(
        None, description="Opaque: pass it as ?cursor= for the next page; null on the last."
    )


async def read_limited_body(request: Request) -> bytes:
    """The request body, or 413 as soon as it is known to pass ``server.max_body_bytes``,
    or 408 if it is not complete within ``server.body_timeout_s`` (the key was checked
    before: ``authenticate`` runs first and reads no body)."""
    server = get_settings(request).server
    limit = server.max_body_bytes
    too_large = HTTPException(413, f"request body is larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(server.body_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except ClientDisconnect:
        # The client left mid-body: nothing was written and nobody reads the answer.
        raise HTTPException(400, "the client disconnected before the body was complete") from None
    except TimeoutError:
        raise HTTPException(
            408,
            f"request body not complete within {server.body_timeout_s:g} s",
            headers={"Connection": "close"},
        ) from None
    return bytes(body)


def _invalid(errors: list[Any]) -> RequestValidationError:
    """422 in the app's shape, with each field's path under the body."""
    return RequestValidationError([{**err, "loc": ("body", *err.get("loc", ()))} for err in errors])


def _check_submit(request: Request, spec: TaskSubmit, principal: Principal) -> None:
    settings = get_settings(request)
    if spec.pool is not None and settings.pools:
        pool = next((p for p in settings.pools if p.name == spec.pool), None)
        if pool is None:
            msg = f"unknown pool {spec.pool!r}"
            raise _invalid([{"loc": ("pool",), "msg": msg, "type": "value_error"}])
        if pool.engine != spec.kind:
            msg = f"pool {spec.pool!r} runs {pool.engine}, not {spec.kind}"
            raise _invalid([{"loc": ("pool",), "msg": msg, "type": "value_error"}])
    if settings.pools:
        _check_servable(spec, settings.pools)
    cap = principal.max_priority
    if cap is not None and spec.priority > cap:
        whose = "this key's" if principal.team is None else "this key's or its team's"
        raise Forbidden(f"priority {spec.priority} is above {whose} limit {cap}")


def _check_servable(spec: TaskSubmit, pools: list[PoolSpec]) -> None:
    """422 unless some configured pool could run the task: nothing else would ever take it,
    and it would keep a pool scaled up for nothing (issue 19)."""
    candidates = [p for p in pools if p.engine == spec.kind and spec.pool in (None, p.name)]
    if not candidates:
        msg = f"no pool runs {spec.kind} tasks"
        raise _invalid([{"loc": ("kind",), "msg": msg, "type": "value_error"}])
    # gpu=False: a model whose GPU requirement no pool fits is gpu_fit's 422, which says so.
    if spec.model is None or any(pool_serves(p, spec.model, gpu=False) for p in candidates):
        return
    served = sorted({m for p in candidates for m in p.models})
    where = f"pool {spec.pool!r}" if spec.pool else f"no {spec.kind} pool"
    verb = "does not serve" if spec.pool else "serves"
    msg = f"{where} {verb} model {spec.model!r} (served: {', '.join(served)})"
    raise _invalid([{"loc": ("model",), "msg": msg, "type": "value_error"}])


@router.post(
    "",
    status_code=202,
    summary="Queue a ComfyUI graph or an Ollama request",
    responses={
        409: {"description": "The idempotency key was used for a different request."},
        413: {"description": "Body larger than [server] max_body_bytes; nothing stored."},
        402: {"description": "The key's team has spent its day's or month's budget."},
        429: {"description": "Over the key's (or its team's) rate limit or max_queued tasks."},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": SUBMIT_SCHEMA}},
        }
    },
)
async def submit_task(
    request: Request,
    principal: Principal = Depends(require_budget),
    queue: TaskQueue = Depends(get_queue),
    idempotency_key: str | None = Header(None, min_length=1, max_length=200),
) -> Task:
    raw = await read_limited_body(request)
    try:
        spec = TaskSubmit.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid(list(exc.errors(include_url=False))) from None
    _check_submit(request, spec, principal)
    fit, requires = await gpu_fit(request, spec)
    return await queue.enqueue(
        spec,
        owner=principal.owner,
        idempotency_key=idempotency_key,
        max_queued=_max_queued(request, principal),
        fit=fit,
        requires=requires,
        submitted_by=principal.key.id if principal.key else None,
    )


def _max_queued(request: Request, principal: Principal) -> int | None:
    """The waiting-task limit of the task's owner. A team owns its keys' tasks, so the limit
    counts the team's queue: the smaller of the team's and the key's own max_queued."""
    key = principal.key
    if key is None:
        return None
    limits = [n for n in (key.max_queued, principal.team and principal.team.max_queued) if n]
    if limits:
        return min(limits)
    if principal.is_admin:
        return None
    return get_settings(request).auth.default_max_queued or None


@router.get(
    "",
    summary="List tasks, newest first",
    responses={400: {"description": "The cursor was not issued by this server."}},
)
async def list_tasks(
    status: TaskStatus | None = None,
    kind: Engine | None = None,
    pool: str | None = Query(None, max_length=63),
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(
        None, max_length=64, description="The previous page's next_cursor (opaque)."
    ),
    principal: Principal = Depends(authenticate),
    queue: TaskQueue = Depends(get_queue),
    cursors: CursorCodec = Depends(get_cursors),
) -> TaskList:
    position: str | None = None
    if cursor:
        try:
            position = str(cursors.decode(cursor))
        except BadCursor as exc:
            raise HTTPException(400, f"bad cursor: {exc}; use a next_cursor as given") from None
    page = await queue.list(
        status=status.value if status else None,
        kind=kind.value if kind else None,
        pool=pool,
        owner=None if principal.is_admin else principal.owner,
        limit=limit,
        cursor=position,
    )
    # The queue's position is a global counter: encrypted, so it tells nothing of others' work.
    following = cursors.encode(int(page.next_cursor)) if page.next_cursor else None
    return TaskList(tasks=[shown(t, principal) for t in page.tasks], next_cursor=following)


# A worker's URL as it appears in engine error messages ("GET http://… timed out").
_URL = re.compile(r"\b(?:https?|wss?)://[^\s'\"<>]+")


def _hide_urls(text: str) -> str:
    return _URL.sub("<worker>", text)


def _shown_error(error: dict[str, Any], principal: Principal) -> dict[str, Any]:
    out = dict(error)
    if out.get("worker"):
        out["worker"] = public_worker_id(str(out["worker"]))
    if isinstance(out.get("message"), str):
        out["message"] = _hide_urls(out["message"])
    return out


def shown(task: Task, principal: Principal) -> Task:
    """``task`` as ``principal`` may see it: user keys get workers by their alias and error
    messages without worker URLs (a Novita worker's id is its instance id); admins all."""
    if principal.is_admin or (task.worker is None and not task.errors):
        return task
    return task.model_copy(
        update={
            "worker": public_worker_id(task.worker) if task.worker else None,
            "error": _shown_error(task.error, principal) if task.error else None,
            "errors": [_shown_error(e, principal) for e in task.errors],
        }
    )


def shown_event(event: dict[str, Any], principal: Principal) -> dict[str, Any]:
    """A task event for ``principal``: the ``running`` event names the worker's alias."""
    if principal.is_admin or not event.get("detail"):
        return event
    detail = str(event["detail"])
    alias = public_worker_id(detail) if event.get("status") == "running" else _hide_urls(detail)
    return {**event, "detail": alias}


async def _visible(queue: TaskQueue, task_id: str, principal: Principal, **kw: Any) -> Task:
    if not WELL_FORMED_ID.fullmatch(task_id):
        raise TaskNotFound(f"no task {task_id[:80]!r}")
    task = await queue.get(task_id, **kw)
    if not principal.can_see(task.owner):
        raise TaskNotFound(f"no task {task_id}")  # others' tasks do not exist for you
    return task


@router.get("/{task_id}", summary="One task, with payload and result")
async def get_task(
    task_id: str = TASK_ID,
    principal: Principal = Depends(authenticate),
    queue: TaskQueue = Depends(get_queue),
) -> Task:
    return shown(await _visible(queue, task_id, principal), principal)


@router.get("/{task_id}/outputs", summary="The output files gpufleet keeps for a task")
async def list_outputs(
    task_id: str = TASK_ID,
    principal: Principal = Depends(authenticate),
    queue: TaskQueue = Depends(get_queue),
    results: ResultStore = Depends(get_results),
) -> dict[str, Any]:
    await _visible(queue, task_id, principal)
    return {"outputs": [f.to_dict() for f in await results.list(task_id)]}


@router.get(
    "/{task_id}/outputs/{filename}",
    summary="Download one output file (copied from the worker before the task succeeded)",
    response_class=FileResponse,
)
async def download_output(
    task_id: str = TASK_ID,
    filename: str = Path(description="File name, as listed in the result."),
    principal: Principal = Depends(authenticate),
    queue: TaskQueue = Depends(get_queue),
    results: ResultStore = Depends(get_results),
) -> FileResponse:
    await _visible(queue, task_id, principal)
    try:
        path = await results.open(task_id, safe_name(filename))
    except (ValueError, FileNotFoundError) as exc:
        raise HTTPException(404, f"task {task_id} has no output {filename[:80]!r}") from exc
    return FileResponse(path, media_type=guess_content_type(filename), filename=filename)


@router.post(
    "/{task_id}/cancel",
    summary="Cancel a queued or running task (409 if finished)",
    responses={409: {"description": "The task has already finished."}},
)
async def cancel_task(
    task_id: str = TASK_ID,
    principal: Principal = Depends(authenticate),
    queue: TaskQueue = Depends(get_queue),
) -> Task:
    await _visible(queue, task_id, principal, include_payload=False)
    return shown(await queue.cancel(task_id), principal)


@router.get("/{task_id}/wait", summary="Long poll: the task once finished, or after timeout_s")
async def wait_task(
    task_id: str = TASK_ID,
    timeout_s: float = Query(30.0, ge=0, le=MAX_WAIT_S),
    principal: Principal = Depends(authenticate),
    queue: TaskQueue = Depends(get_queue),
) -> Task:
    await _visible(queue, task_id, principal, include_payload=False)
    return shown(await queue.wait(task_id, timeout_s), principal)


@router.get(
    "/{task_id}/events",
    summary="Server-sent events of every state change",
    responses={429: {"description": "The key holds [auth] max_streams_per_key streams."}},
)
async def task_events(
    request: Request,
    task_id: str = TASK_ID,
    after: str | None = Query(None, pattern=r"^\d+-\d+$", description="Resume after this id."),
    principal: Principal = Depends(authenticate),
    queue: TaskQueue = Depends(get_queue),
) -> StreamingResponse:
    await _visible(queue, task_id, principal, include_payload=False)
    header = request.headers.get("last-event-id", "")
    resume = header if re.fullmatch(r"\d+-\d+", header) else after

    async def body() -> AsyncIterator[bytes]:
        yield b": connected\n\n"
        events = queue.events(task_id, after=resume)
        try:
            async for event in events:
                if event is None:
                    yield b": keep-alive\n\n"
                    continue
                data = json.dumps(shown_event(event.to_json(), principal))
                yield f"id: {event.id}\nevent: {event.status}\ndata: {data}\n\n".encode()
        finally:
            await events.aclose()

    return await event_stream(request, principal, body())
