"""A fix to BentoML's HTTP server that cnnserve applies when the service module loads.

BentoML 1.4's ``TimeoutMiddleware`` (``bentoml/_internal/server/http/traffic.py``) arms
``loop.call_later(timeout, ...)`` for every request and never cancels it. Each timer
keeps its request's context (OpenTelemetry span, futures, closures) alive for the whole
``traffic.timeout``. At 1,000 requests/s and the 60 s timeout that is some 60,000
requests' objects alive at once, and every full garbage collection walks them all:
measured on LeNet-5 at 64 clients, gen-2 collections grew from 87 to 180 ms within
8 s, collected nothing, and stalled every request in flight, which put p99 latency
at 5-10x p95. ``patch_timeout_middleware`` replaces the middleware's ``__call__``
with the same logic that cancels its timer when the request ends.

The replacement is applied only to the BentoML versions it was checked against
(``CHECKED_VERSIONS``: read that release's ``TimeoutMiddleware.__call__`` before adding one),
so a release that changes the middleware is left alone; the service logs once either way.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("cnnserve.service")

#: BentoML releases whose TimeoutMiddleware.__call__ was read and found to be the one `_call` mirrors.
CHECKED_VERSIONS = frozenset({"1.4.39"})


async def _call(self, scope, receive, send) -> None:
    """BentoML's ``TimeoutMiddleware.__call__``, with the timer cancelled when the request ends."""
    from starlette.responses import JSONResponse

    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
    try:
        await waiter
    except asyncio.TimeoutError:
        if fut.cancel():
            resp = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds",
                                 "code": "timeout"}, status_code=504)
            await resp(scope, receive, send)
    else:
        await fut
    finally:
        timer.cancel()


def patch_timeout_middleware() -> bool:
    """Apply the fix where it fits; logs once whether it applied."""
    import bentoml

    try:
        from bentoml._internal.server.http.traffic import TimeoutMiddleware
    except ImportError:
        log.info("BentoML %s has no TimeoutMiddleware: nothing to patch", bentoml.__version__)
        return False
    if TimeoutMiddleware.__call__ is _call:
        return True
    if bentoml.__version__ not in CHECKED_VERSIONS or not hasattr(TimeoutMiddleware, "_set_timer_out"):
        log.warning("BentoML %s was not checked for its per-request timer leak (checked: %s); its "
                    "TimeoutMiddleware is left as it is", bentoml.__version__, ", ".join(sorted(CHECKED_VERSIONS)))
        return False
    TimeoutMiddleware.__call__ = _call
    log.info("BentoML %s: TimeoutMiddleware patched to cancel its per-request timers", bentoml.__version__)
    return True
