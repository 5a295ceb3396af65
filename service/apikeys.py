"""Optional API keys for the inference endpoints (``--arg api_keys_file=PATH``).

Off by default. With a file, ``/classify``, ``/classify/batch``, ``/classify/explain``, the Open Inference
Protocol's ``infer`` (HTTP) and gRPC's ``ModelInfer`` need a key, sent as ``Authorization: Bearer KEY`` or
``X-API-Key: KEY`` (gRPC: the same as call metadata); without one, or with one the file does not hold, they
answer 401 (gRPC UNAUTHENTICATED) with the service's JSON error. Health, readiness, metrics, metadata, the
index and the demo page stay open (the demo's own requests then need a key: it has none).

**Hashed at rest.** The file holds one key per line as ``NAME sha256:HEX``, the SHA-256 of the key, never the
key (``cnnserve api-key NAME --file PATH`` makes a random key, appends its line and prints the key once). A key
is 32 random bytes, so a plain hash is enough: nothing can be guessed from it. **Constant time**: the digest
of what a client sent is compared with every stored digest, each with ``hmac.compare_digest``, whatever
matches. **Named**: what identifies a caller in ``cnnserve_api_key_requests_total{key}`` is the key's NAME from
the file (a closed set the operator writes), never the key. **Rotation**: the file is read again when it
changes (looked at most once a second), so a key is added or revoked without a restart; a file that turns
unreadable keeps the keys last read, and says so in the log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time

log = logging.getLogger("cnnserve.apikeys")

#: A key's name: what the metric and the log show of a caller.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
LINE = re.compile(rf"({NAME.pattern})\s+sha256:([0-9a-f]{{64}})")
#: At most this many keys (the metric's label set is bounded by it).
MAX_KEYS = 1000
PREFIX = "cns_"


class KeysFileError(ValueError):
    """An API keys file that cannot be used; the message names the file, the line and the problem."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def parse(text: str, source: str) -> list[tuple[str, bytes]]:
    """``NAME sha256:HEX`` lines (blank lines and ``#`` comments skipped) to (name, digest) pairs."""
    keys, names = [], set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = LINE.fullmatch(line)
        if m is None:
            raise KeysFileError(f"{source}, line {n}: not 'NAME sha256:HEX' (a name of letters, digits, '_', '.', "
                                "'-' and the key's SHA-256 in 64 hex digits; `cnnserve api-key NAME --file "
                                f"{source}` writes one)")
        if m.group(1) in names:
            raise KeysFileError(f"{source}, line {n}: the name {m.group(1)!r} is there twice")
        names.add(m.group(1))
        keys.append((m.group(1), bytes.fromhex(m.group(2))))
    if len(keys) > MAX_KEYS:
        raise KeysFileError(f"{source}: {len(keys)} keys; at most {MAX_KEYS}")
    return keys


def read(path: str) -> list[tuple[str, bytes]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 20)
    except (OSError, UnicodeDecodeError) as e:
        raise KeysFileError(f"{path}: cannot read the API keys file ({e})") from None
    return parse(text, path)


def new_key(name: str, path: str) -> str:
    """A new random key for ``name``, its hash appended to ``path`` (made if missing, readable by its owner
    only); the key itself is returned and kept nowhere."""
    if not NAME.fullmatch(name):
        raise KeysFileError(f"{name!r}: a key's name is 1-64 letters, digits, '_', '.' or '-'")
    existing = read(path) if os.path.exists(path) else []
    if any(n == name for n, _ in existing):
        raise KeysFileError(f"{path}: there is a key named {name!r} already (remove its line to replace it)")
    key = PREFIX + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{name} sha256:{digest(key).hex()}\n")
    return key


def protected(path: str) -> bool:
    """The inference routes (HTTP): what a key is needed for."""
    return (path == "/classify" or path.startswith("/classify/")
            or (path.startswith("/v2/models/") and path.endswith(("/infer", "/feedback"))))


def presented(authorization: str | None, api_key: str | None) -> str | None:
    """The key a request carries: ``X-API-Key``, else a bearer token."""
    if api_key:
        return api_key.strip()
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


class APIKeys:
    """The keys of one file, read again when it changes."""

    def __init__(self, path: str, recheck_s: float = 1.0) -> None:
        self.path, self.recheck_s = path, recheck_s
        self.keys = read(path)  # at start a bad file is an error (the server refuses to start)
        self._stamp = self._stat()
        self._looked = time.monotonic()

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._looked < self.recheck_s:
            return
        self._looked = now
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.keys = read(self.path)
            log.info("API keys read again from %s: %d keys", self.path, len(self.keys))
        except KeysFileError as e:
            log.error("%s; the %d keys read before stay in force", e, len(self.keys))

    def identify(self, key: str | None) -> str | None:
        """The name of the key ``key`` is, or None; every stored digest is compared, in constant time each."""
        self._refresh()
        if not key:
            return None
        sent, found = digest(key), None
        for name, stored in self.keys:
            if hmac.compare_digest(stored, sent) and found is None:
                found = name
        return found
