"""A small OTLP/HTTP trace receiver on loopback: what a collector gets from the service, decoded with
``opentelemetry-proto`` (the tests check the span tree; the harness gives the tracing servers somewhere to send)."""

from __future__ import annotations

import gzip
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """``POST /v1/traces`` with an ``ExportTraceServiceRequest`` (protobuf, gzip or not): its spans kept (``spans``,
    each a dict), or only counted with ``keep=False``. Answers as a collector does: an empty
    ``ExportTraceServiceResponse``."""

    def __init__(self, keep: bool = True) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                             ExportTraceServiceResponse)

        self.keep, self.spans, self.count, self.posts = keep, [], 0, 0
        self._lock = threading.Lock()
        receiver = self
        answer = ExportTraceServiceResponse().SerializeToString()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.add(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, request) -> None:
        spans = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append({"name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                  "parent_id": s.parent_span_id.hex(), "kind": s.kind,
                                  "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                                  "status": s.status.code, "resource": resource,
                                  "attributes": {a.key: _value(a.value) for a in s.attributes}})
        with self._lock:
            self.posts += 1
            self.count += len(spans)
            if self.keep:
                self.spans.extend(spans)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(v):
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None
