"""structlog set-up: one line per event on stdout, JSON or a readable console form.

aiohttp's own stdlib log records (errors while parsing a request, for instance) are
rendered by the same processors, so every stdout line has the same shape.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


class JSONLine:
    """One event as 7-bit clean JSON (``ensure_ascii``), whatever a client sends.

    The same text as ``json.dumps(event, ensure_ascii=True, default=...)``, but from an
    encoder built once: ``json.dumps`` with any keyword builds a new ``JSONEncoder`` per
    call, which was half of the line's encoding cost (9 us -> 5 us per access line).
    """

    __slots__ = ("_encoders",)

    def __init__(self) -> None:
        self._encoders: dict[Any, json.JSONEncoder] = {}

    def __call__(self, event: EventDict, **dumps_kw: Any) -> str:
        default = dumps_kw.get("default")
        encoder = self._encoders.get(default)
        if encoder is None:
            encoder = self._encoders[default] = json.JSONEncoder(ensure_ascii=True, default=default)
        return encoder.encode(event)

    def __repr__(self) -> str:
        return f"<JSONLine encoders={len(self._encoders)}>"


class UTCTimeStamper:
    """structlog's ``TimeStamper(fmt="iso", utc=True)`` layout, formatting a second once.

    ``2026-12-01T22:31:37.123456Z``: the date and time change once a second, so only the
    microseconds are formatted per line (0.4 instead of 1.9 us).
    """

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: WrappedLogger, name: str, event: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event

    def __repr__(self) -> str:
        return f"<UTCTimeStamper {self._prefix}>"


def _renderer(fmt: str) -> Processor:
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer(serializer=JSONLine())


class LineWriter:
    """A structlog logger that writes lines without flushing each one.

    A flush per access line is a system call per request; instead the stream is flushed
    when ``flush_interval`` has passed since the last flush, and by ``flush()``, which the
    server calls periodically and at shutdown (Envoy buffers access logs the same way).
    """

    def __init__(self, stream: TextIO, flush_interval: float = 0.2) -> None:
        self._write = stream.write
        self._flush = stream.flush
        self._interval = flush_interval
        self._last = time.monotonic()

    def msg(self, message: str) -> None:
        self._write(message + "\n")
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        self._flush()

    log = debug = info = warn = warning = error = critical = exception = msg


_writer: LineWriter | None = None


def flush() -> None:
    """Write out buffered log lines now."""
    if _writer is not None:
        _writer.flush()


def _buffered_stdout() -> TextIO:
    """stdout with a 64 KiB buffer of its own.

    With PYTHONUNBUFFERED=1 (set in our image, as in most Python images) ``sys.stdout``
    writes through: a system call per access line, about a tenth of the CPU per request.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stdout  # not a file (a test harness's capture): keep it
    sys.stdout.flush()
    raw = open(fd, "wb", buffering=1 << 16, closefd=False)  # noqa: SIM115 (lives as long as we log)
    return io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace")


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    global _writer
    out = stream if stream is not None else _buffered_stdout()
    _writer = writer = LineWriter(out)
    shared: list[Processor] = [
        structlog.processors.add_log_level,
        UTCTimeStamper(),
    ]
    structlog.configure(
        processors=[*shared, _renderer(fmt)],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *args: writer,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _renderer(fmt),
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                *shared,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(_LEVELS[level], logging.WARNING))


def get_logger(**initial: Any) -> FilteringBoundLogger:
    """A logger bound now, under the current configuration.

    Binding up front skips the lazy proxy's per-call indirection (about 3 us per line);
    call ``configure`` first.
    """
    logger: FilteringBoundLogger = structlog.get_logger().bind(**initial)
    return logger
