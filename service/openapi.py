"""The OpenAPI document (``/docs.json``, and the browsable page at ``/``) describes cnnserve.

BentoML writes the document's ``info`` itself: outside a bento the version is the string "None" and the
description is BentoML's own read-me boilerplate (badges, Slack and Twitter links), with BentoML's team
as the contact. ``OpenAPIInfo`` is ASGI middleware (added with the documented
``Service.add_asgi_middleware``, no change to BentoML) that replaces that block with cnnserve's title,
version and description; the paths are BentoML's and FastAPI's as generated.
"""

from __future__ import annotations

import json

DESCRIPTION = """CNN image classification on onnxruntime: exported ONNX models that carry their own \
preprocessing spec and labels, served by BentoML.

- `POST /classify`: one image (multipart field `image`, or the raw bytes); the top classes with probabilities
- `POST /classify/batch`: many images, one result (or error) each
- `POST /classify/explain`: where the model looks (occlusion or CAM), as JSON or a PNG heatmap
- `GET /models`: the served models, their spec, labels, precision and providers
- `/v2/...`: the Open Inference Protocol (KServe v2)
- `GET /demo`: a page to try it in a browser

Bad input gets a 4xx with `{"error", "code"}`. Served models: {models}."""


def info(version: str, models: list[str]) -> dict:
    return {"title": "cnnserve", "version": version,
            "description": DESCRIPTION.replace("{models}", ", ".join(f"`{m}`" for m in models) or "none")}


class OpenAPIInfo:
    """ASGI middleware: the ``info`` block of the OpenAPI document at ``path`` becomes ``info``."""

    def __init__(self, app, info: dict, path: str = "/docs.json") -> None:
        self.app, self.info, self.path = app, info, path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.path:
            return await self.app(scope, receive, send)
        start: dict = {}
        chunks: list[bytes] = []

        async def rewrite(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start.get("status") == 200:
                try:
                    doc = json.loads(body)
                    doc["info"] = self.info
                    body = json.dumps(doc).encode()
                except (ValueError, TypeError):
                    pass  # not the JSON expected: passed on as it came
            headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)
