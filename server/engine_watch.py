"""Watching a request's managed engine: end a wait early when the engine dies or the client goes.

A killed engine may leave its TCP connections half-open; without this, requests in flight would
wait out their timeout instead of getting a 503 at once. Every route that reaches a managed
engine (chat, completions, Responses, pass-through) waits through `guard`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request

from calibserve.routing import UpstreamError
from calibserve.server.engine import ManagedEngine
from calibserve.server.errors import APIError

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the answer was ready."""


def engine_stopped(model: str) -> APIError:
    """The managed engine died under the request: 503, retry in a moment."""
    return APIError(503, f"the engine for `{model}` stopped while answering",
                    code="engine_unavailable", headers={"Retry-After": "1"})


async def wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def guard(aw: Awaitable[T], request: Request, engine: ManagedEngine | None,
                model: str) -> T:
    """Await `aw`, but end early if the client disconnects (ClientDisconnected) or `engine`
    (the managed engine answering, None when there is none) dies (`engine_stopped`)."""
    task = asyncio.ensure_future(aw)
    disconnect = asyncio.ensure_future(wait_disconnect(request))
    waiters: set[asyncio.Future[Any]] = {task, disconnect}
    exited = engine.exited() if engine is not None else None
    if exited is not None:
        waiters.add(exited)
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we were cancelled ourselves (shutdown): take the work with us
        task.cancel()
        raise
    finally:
        disconnect.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # let it unwind (closes the upstream connection)
    if exited is not None and exited.done():
        raise engine_stopped(model)
    raise ClientDisconnected


async def engine_died(engine: ManagedEngine | None, exc: UpstreamError) -> bool:
    """Did a transport failure come from the managed engine dying? Then it is a 503.

    The broken connection is often noticed a moment before the process exit is, so wait
    briefly for the exit rather than report the death as a bad gateway.
    """
    if engine is None or exc.answered is not None:  # the engine answered: it is alive
        return False
    exited = engine.exited()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(exited), 0.25)
    return exited.done()
