"""Log lines as JSON (``log_format=json``): the access lines of requests, written in batches (``Lines``), and every
other line of the server through python-json-logger (``json_logging``), under the Elastic Common Schema's field
names, which Elasticsearch maps as they are and Loki's ``json`` parser turns into labels."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time

_ENCODER = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps makes one per call with separators
#: A string as JSON, as ``_ENCODER`` writes it (the C encoder's own function: quoted, escaped, ASCII only).
_STR = json.encoder.encode_basestring_ascii


class Lines:
    """JSON access lines, written to standard output in batches: the first line of a batch schedules its write
    ``FLUSH_S`` later on the event loop (or at ``MAX_LINES``). Each line is the object ``json_formatter`` would
    write, as text (``access_json``): through ``logging`` and python-json-logger, a write per line,
    a JSON line per request left LeNet-5 at 64 clients 0.58 of its throughput in a first trial (text lines: 0.89);
    this way it takes about 7 us of CPU with its share of the writes, a text line through BentoML's handler 11
    (``bench/overhead.py``'s ``request_cpu``; docs/observability.md has the served figures)."""

    FLUSH_S, MAX_LINES = 0.1, 256

    def __init__(self, stream=None) -> None:
        self.pid = os.getpid()
        self.stream = stream  # None: standard output as it is at each write (BentoML and pytest replace it)
        self._held: list[str] = []
        self._scheduled = False
        self._second, self._prefix = -1, ""
        # a JSON line's fixed fields, from its time stamp's value to its message's key
        fixed = _ENCODER.encode({"log.level": "INFO", "log.logger": "cnnserve.access", "process.pid": self.pid})
        self.head = f'",{fixed[1:-1]},"message":'

    def timestamp(self) -> str:
        """Now in ISO 8601, UTC, to the microsecond (as ``json_formatter``'s ``@timestamp``)."""
        now = time.time()
        second = int(now)
        if second != self._second:  # the date and time of day made once a second
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        return f"{self._prefix}{int((now - second) * 1e6):06d}+00:00"

    def write(self, line: str) -> None:
        self._held.append(line)
        if len(self._held) >= self.MAX_LINES:
            self.flush()
        elif not self._scheduled:
            try:
                asyncio.get_running_loop().call_later(self.FLUSH_S, self.flush)
                self._scheduled = True
            except RuntimeError:  # no event loop in this thread: at once
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._held:
            return
        text, self._held = "\n".join(self._held) + "\n", []
        out = self.stream or sys.stdout
        try:
            out.write(text)
            out.flush()
        except (OSError, ValueError):  # standard output closed: nothing to write to
            pass


# -- a request's access line as JSON --------------------------------------------------------------------------

def _value(value) -> str:
    """A field's value as ``_ENCODER`` writes it."""
    if type(value) is str:
        return _STR(value)
    if type(value) is int:
        return str(value)
    return _ENCODER.encode(value)


_STAGES: dict[tuple, str] = {}  # the stages' names (a closed set: the service's own): their fields' template


def _stage_fields(names: tuple, ms: list) -> str:
    """``,"cnnserve.stage_ms.NAME":MS`` for each stage, in one format of a template made once per set of names: each
    number with three decimals (valid JSON, which reads ``0.040`` as ``0.04``). One value at a time, rounded and
    written in its shortest form, the stages took a third of a line's time."""
    template = _STAGES.get(names)
    if template is None:
        template = _STAGES[names] = "".join(f",{_STR(f'cnnserve.stage_ms.{n}')}:%.3f" for n in names)
    return template % tuple(ms)


def access_json(lines: Lines, record, end: float, ms: float, path: str, route: str, stages, trace_ids) -> str:
    """``record``'s access line (``telemetry.RequestRecord``, answered at ``end``): the object ``_ENCODER`` would
    write for its fields, in this order, written directly: the fixed keys as text made once, each string through
    the encoder's own escaping, milliseconds with three decimals. A dict and its encoding took about 9 us of CPU a
    line, this about 5 (bench/overhead.py's request_cpu); tests/test_telemetry.py parses every field of lines
    whose every string needs escaping. ``stages(record, end)``: the stages' (start, end) where the request has
    no timings of its own."""
    client, status, call, marks = record.client, record.status, record.call, record.marks
    line = (f'{{"@timestamp":"{lines.timestamp()}{lines.head}'
            f'{_STR(f"{record.method} {path} {status} {ms:.1f} ms")},"http.request.id":{_STR(record.id)}'
            f',"network.protocol":{_STR(record.protocol)},"http.request.method":{_STR(record.method)}'
            f',"url.path":{_STR(path)},"http.route":{_STR(route)}'
            f',"client.address":{"null" if client is None else _STR(client)}'
            f',"event.duration":{int((end - record.start) * 1e9)},"cnnserve.latency_ms":{ms:.3f}'
            # a gRPC status code's name (OK, INVALID_ARGUMENT, ...)
            f',"{"rpc.grpc.status_code" if record.protocol == "grpc" else "http.response.status_code"}":'
            f'{_value(status)}')
    if call is not None:
        line += f',"cnnserve.model":{_value(call.model.name)},"cnnserve.model_version":{_value(call.model.version)}'
    timings = record.timings
    if timings:
        line += _stage_fields(tuple(timings), [seconds * 1000 for seconds in timings.values()])
    else:
        spans = stages(record, end)
        line += _stage_fields(tuple(spans), [(b - a) * 1000 for a, b in spans.values()])
    if marks and "batch" in marks:
        line += f',"cnnserve.batch_size":{_value(marks["batch"])}'
    if record.code:
        line += f',"error.code":{_value(record.code)}'
    if record.api_key:
        line += f',"cnnserve.api_key":{_value(record.api_key)}'
    if trace_ids:
        line += f',"trace.id":{_STR(trace_ids[0])},"span.id":{_STR(trace_ids[1])}'
    return line + "}"


# -- every log line as JSON ----------------------------------------------------------------------------------

#: Record attributes BentoML's log filter adds for its text format (the JSON has its own fields).
BENTOML_ATTRS = ("levelname_bracketed", "component", "trace_msg", "request_id", "service_name", "taskName")


def json_formatter() -> logging.Formatter:
    """Every field under the Elastic Common Schema's name: ``@timestamp`` (ISO 8601, UTC), ``log.level``,
    ``log.logger``, ``message``, ``process.pid``, an exception's ``error.stack_trace``, and a record's own extras."""
    from pythonjsonlogger.core import RESERVED_ATTRS
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter("%(levelname)s %(name)s %(process)d %(message)s", timestamp="@timestamp",
                         rename_fields={"levelname": "log.level", "name": "log.logger", "process": "process.pid",
                                        "exc_info": "error.stack_trace"},
                         reserved_attrs=[*RESERVED_ATTRS, *BENTOML_ATTRS])


def json_logging() -> None:
    """Every handler this process has (the root's and each logger's, BentoML's included) writes JSON, and Python's
    warnings go through logging too. Called when the service module loads (the server's first process and each
    worker) and again once a worker has started, after BentoML configured its logging."""
    formatter = json_formatter()
    loggers = [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values()
                                      if isinstance(x, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            handler.setFormatter(formatter)
    logging.captureWarnings(True)
