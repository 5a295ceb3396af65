"""The HTTP floor: a bare ASGI app under the same uvicorn (uvloop, httptools) that reads the request
body and answers a fixed JSON. No framework, no model: what any Python service on this machine pays
per request before doing anything. The harness serves it with as many workers as cnnserve has and
puts the same load on both.

    python -m uvicorn bench.floor:app --workers 2 --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

BODY = b'{"model":"floor","version":"1","predictions":[{"label":"7","index":7,"probability":0.99}]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:  # read the whole body, as a real service must
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
