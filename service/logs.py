"""Log lines as JSON (``log_format=json``): the access lines of requests, written in batches (``Lines``), and every
other line of the server through python-json-logger (``json_logging``), under the Elastic Common Schema's field
names, which Elasticsearch maps as they are and Loki's ``json`` parser turns into labels."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time


class Lines:
    """JSON access lines, written to standard output in batches: the first line of a batch schedules its write
    ``FLUSH_S`` later on the event loop (or at ``MAX_LINES``). Each line is the object ``json_formatter`` would
    write, as text (``telemetry.Telemetry._log``): through ``logging`` and python-json-logger, a write per line,
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
