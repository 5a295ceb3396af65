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

    def body(self) -> dict:
        return {"error": self.message, "code": self.code}


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
