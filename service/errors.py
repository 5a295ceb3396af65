"""How the service refuses: ``APIError`` carries an HTTP status, a short code and a message that names the
problem (every protocol maps it: HTTP as JSON, gRPC as a status code), and the checks that keep a client's
numbers and JSON within bounds before anything parses them. No HTTP, no BentoML.
"""

from __future__ import annotations

import numpy as np

#: Refusals that concern a whole request, not one of its images.
REQUEST_CODES = frozenset({"deadline_exceeded", "overloaded", "client_closed"})


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self, request_id: str | None = None) -> dict:
        """The JSON error; with the request's id (``telemetry.py``) where there is one."""
        if request_id is None:
            return {"error": self.message, "code": self.code}
        return {"error": self.message, "code": self.code, "request_id": request_id}


#: Set on an unexpected exception once it has been answered (a JSON 500) and logged with its traceback.
ANSWERED = "__cnnserve_answered__"


def routing_error(method: str, path: str, status: int, detail: object = None, headers: dict | None = None) -> APIError:
    """A router's refusal (no route for the path, a method the path does not take) as the service's JSON error,
    whichever router made it: FastAPI's for the service's routes, BentoML's for the paths it adds itself."""
    where = short(path)[1:-1]
    if status == 404:
        return APIError(404, "not_found", f"no route {method} {where} on this server (the routes: /docs.json)")
    if status == 405:
        allow = (headers or {}).get("Allow") or (headers or {}).get("allow")
        return APIError(405, "method_not_allowed", f"{where} does not take {method}"
                                                   + (f"; it takes {allow}" if allow else ""),
                        {"Allow": allow} if allow else None)
    text = detail if isinstance(detail, str) else None
    return APIError(status, f"http_{status}", text or f"{method} {where} was refused with status {status}",
                    dict(headers or {}))


def model_output_not_finite(model: str, version: str | None = None, images: list[int] | None = None) -> APIError:
    """A 500 that names the model: it answered NaN or infinity for this request (``images``: which of its images,
    where the rows are the request's own). The server's model is at fault, not the request; JSON cannot carry
    such a number, and no client could use one."""
    which = f"{model}:{version}" if version else model
    where = "this request"
    if images:
        where = "image " + ", ".join(map(str, images[:10])) + (f" and {len(images) - 10} more" if len(images) > 10
                                                               else "") + " of this request"
    return APIError(500, "model_output_not_finite", f"model {which!r} gave outputs that are not finite (NaN or "
                                                    f"infinity) for {where}; the model is at fault, not the request")


def decimal(text: str | None, max_digits: int = 18) -> int | None:
    """A header's non-negative decimal integer, or None when it is not one: ASCII digits only (``"²"`` is a
    digit to ``str.isdigit``), and at most ``max_digits`` of them, so ``int`` never sees a number it refuses
    (4,301 digits and more) or one that costs time to convert."""
    if text and len(text) <= max_digits and text.isascii() and text.isdigit():
        return int(text)
    return None


def json_depth(data: bytes) -> int:
    """The deepest nesting of brackets and braces in ``data`` (brackets inside strings count too,
    so this is an upper bound), in C speed: a JSON bomb is refused before the parser recurses."""
    if not data:
        return 0
    a = np.frombuffer(data, np.uint8)
    step = ((a == 0x5B) | (a == 0x7B)).astype(np.int32) - ((a == 0x5D) | (a == 0x7D))
    return int(np.cumsum(step).max())


def short(value) -> str:
    """A client's value for an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
