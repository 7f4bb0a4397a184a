"""structlog setup: JSON lines by default, a console renderer on a TTY.

One-shot commands log to stderr so that `--json` output on stdout stays machine-readable;
the daemon logs to stdout (journald and `docker logs` read it). A redaction processor
masks the admin key wherever it might appear, as a second line of defence.

Everything else that would print goes through the same renderer, so that in JSON mode
every line is one JSON object: the stdlib `logging` records of the libraries (asyncio,
aiohttp, watchdog), Python warnings, and exceptions that escape a thread or the program.
Library records are rate-limited per call site (a flood of accept() errors or malformed
requests must not become megabytes of log), and a malformed HTTP request from a client is
one `http.bad_request` line, not aiohttp's traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

import structlog

REDACTED = "[redacted]"
#: How many records one library call site may log per period before the rest are counted
#: and dropped (the next line let through says how many: `suppressed`).
RATE_BURST = 10
RATE_PERIOD = 60.0
#: Library warnings can carry whole object reprs (watchdog's do): cut them here.
WARNING_CHARS = 300

_FORMAT_ENV = "TOKENSETTLE_LOG_FORMAT"


@dataclass
class _Installed:
    """What `configure` set up last: our root handler, and whether lines are JSON."""

    handler: logging.Handler | None = None
    json: bool | None = None


_installed = _Installed()


class LineSink:
    """One stream, one lock, one `write` per line, shared by structlog and the stdlib
    handler. structlog's PrintLogger writes a message and its newline in two calls under a
    lock of its own, so a library record written between them by the stdlib handler
    glued two lines into one that was not JSON (seen under a kill loop)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.RLock()

    def msg(self, message: str) -> None:
        with self.lock:
            self.stream.write(message + "\n")
            self.stream.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = failure = msg


class _SinkHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stdlib side of a `LineSink`: same lock, same single write per line."""

    def __init__(self, sink: LineSink) -> None:
        super().__init__(sink.stream)
        self.sink = sink
        self.lock = sink.lock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.msg(self.format(record))
        except Exception:  # logging must not raise into the caller
            self.handleError(record)


def redactor(secrets: Iterable[str]) -> structlog.types.Processor:
    values = [s for s in secrets if s]

    def _mask(value: Any) -> Any:
        if isinstance(value, str):
            for secret in values:
                if secret in value:
                    value = value.replace(secret, REDACTED)
        return value

    def processor(
        _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in list(event_dict.items()):
            event_dict[key] = _mask(value)
        return event_dict

    return processor


def use_console(fmt: str, stream: TextIO) -> bool:
    """`console`, or `auto` on a terminal; JSON lines otherwise."""
    return fmt == "console" or (fmt == "auto" and stream.isatty())


@dataclass
class _Window:
    start: float
    count: int = 1
    dropped: int = 0


class RateLimit(logging.Filter):
    """At most `burst` records per call site (logger, file, line; a warning's own source)
    in each `period` seconds. The first record let through after drops carries
    `suppressed=<how many>`."""

    MAX_SITES = 1024

    def __init__(
        self,
        burst: int = RATE_BURST,
        period: float = RATE_PERIOD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self.clock = clock
        self._windows: dict[tuple[Any, ...], _Window] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        site = (record.name, record.pathname, record.lineno, getattr(record, "source", None))
        now = self.clock()
        with self._lock:
            window = self._windows.get(site)
            if window is None or now - window.start >= self.period:
                if window is not None and window.dropped:
                    record.suppressed = window.dropped
                if window is None and len(self._windows) >= self.MAX_SITES:
                    self._forget_quiet(now)
                self._windows[site] = _Window(now)
                return True
            if window.count < self.burst:
                window.count += 1
                return True
            window.dropped += 1
            return False

    def _forget_quiet(self, now: float) -> None:
        quiet = [k for k, w in self._windows.items() if now - w.start >= self.period]
        for key in quiet if quiet else list(self._windows):
            # Past the cap with every site busy: forget them all (the limit restarts).
            del self._windows[key]


def _bad_request(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """aiohttp logs a client's malformed request with a traceback of its own parser: make
    it one line. Handler exceptions (our bugs) keep their traceback."""
    args = event_dict.pop("positional_args", ())
    record = event_dict.get("_record")
    exc_info = event_dict.get("exc_info")
    exc = exc_info[1] if isinstance(exc_info, tuple) else None
    http_exceptions = sys.modules.get("aiohttp.http_exceptions")
    if (
        record is not None
        and record.name.startswith("aiohttp")
        and http_exceptions is not None
        and isinstance(exc, http_exceptions.HttpProcessingError)
    ):
        del event_dict["exc_info"]
        event_dict["event"] = "http.bad_request"
        event_dict["level"] = "warning"
        event_dict["error"] = " ".join(str(exc).split())
        if args:
            event_dict["remote"] = str(args[0])
    return event_dict


def _show_warning(  # noqa: PLR0917 - the signature of warnings.showwarning
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    text = " ".join(str(message).split())
    if len(text) > WARNING_CHARS:
        text = text[: WARNING_CHARS - 3] + "..."
    logging.getLogger("py.warnings").warning(
        "python.warning",
        extra={"category": category.__name__, "warning": text, "source": f"{filename}:{lineno}"},
    )


def _thread_crashed(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    logging.getLogger("threading").error(
        "thread.crashed",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        extra={"thread_name": args.thread.name if args.thread else None},
    )


def _uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("tokensettle").critical("python.uncaught", exc_info=(kind, value, tb))


def _unraisable(args: Any) -> None:
    exc = args.exc_value
    logging.getLogger("python").warning(
        "python.unraisable",
        extra={
            "error": f"{type(exc).__name__}: {exc}" if exc is not None else None,
            "where": args.err_msg or repr(args.object),
        },
    )


def _route_stdlib(
    sink: LineSink,
    level: int,
    renderer: structlog.types.Processor,
    redact: structlog.types.Processor,
) -> None:
    """Library records, warnings and escaped exceptions -> the same renderer and stream."""
    root = logging.getLogger()
    if _installed.handler is not None:
        root.removeHandler(_installed.handler)
    handler = _SinkHandler(sink)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(),
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _bad_request,
                structlog.processors.format_exc_info,
                redact,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            pass_foreign_args=True,
        )
    )
    handler.setLevel(level)
    handler.addFilter(RateLimit())
    root.addHandler(handler)
    # The logger level stays at WARNING or below whatever we show: watchdog's overflow
    # warning must still reach the watcher's own handler when LOG_LEVEL is error.
    root.setLevel(min(level, logging.WARNING))
    _installed.handler = handler
    warnings.showwarning = _show_warning
    threading.excepthook = _thread_crashed
    sys.excepthook = _uncaught
    sys.unraisablehook = _unraisable


def configure(
    *,
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    secrets: Iterable[str] = (),
) -> None:
    out = stream or sys.stderr
    console = use_console(fmt, out)
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    redact = redactor(secrets)
    sink = LineSink(out)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_args: sink,
        cache_logger_on_first_use=False,
    )
    _route_stdlib(sink, numeric, renderer, redact)
    _installed.json = not console


def fatal(message: str, *, event: str = "command.failed", stream: TextIO | None = None) -> None:
    """The one line a command prints when it cannot go on, on stderr: a JSON object when
    the log is JSON (as configured, or as `TOKENSETTLE_LOG_FORMAT` would make it when the
    settings did not load), else `tokensettle: <message>`."""
    out = stream or sys.stderr
    as_json = _installed.json
    if as_json is None:
        fmt = os.environ.get(_FORMAT_ENV, "auto").strip().lower()
        as_json = fmt in ("json", "auto") and not use_console(fmt, out)
    if not as_json:
        out.write(f"tokensettle: {message}\n")
        out.flush()
        return
    logger = structlog.wrap_logger(
        structlog.PrintLogger(out),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
    )
    logger.error(event, error=message)
