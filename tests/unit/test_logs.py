"""The log setup: library records, warnings and escaped exceptions become structured
lines on our stream, rate-limited per call site; a client's malformed request is one line."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from aiohttp.http_exceptions import BadHttpMessage

from tokensettle import logs
from tokensettle.logs import RATE_BURST, RateLimit, configure, fatal


@pytest.fixture
def stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """A JSON log on a StringIO; every global hook `configure` sets is put back after."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    for name in ("excepthook", "unraisablehook"):
        monkeypatch.setattr(sys, name, getattr(sys, name))
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(logs, "_installed", logs._Installed())
    out = io.StringIO()
    configure(level="info", fmt="json", stream=out, secrets=["sk-admin-SECRET-42"])
    yield out
    structlog.reset_defaults()


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    """Every line of the stream, each of which must be one JSON object."""
    parsed = [json.loads(line) for line in out.getvalue().splitlines()]
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


# ------------------------------------------------------------------ rate limit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(name: str = "asyncio", lineno: int = 10) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, "/x/base_events.py", lineno, "boom", (), None)


def test_a_call_site_gets_its_burst_then_is_counted_and_dropped() -> None:
    clock = Clock()
    limit = RateLimit(burst=3, period=60, clock=clock)
    assert [limit.filter(record()) for _ in range(5)] == [True, True, True, False, False]
    assert limit.filter(record(lineno=11)), "another call site has its own budget"
    clock.now += 60
    first = record()
    assert limit.filter(first)
    assert first.suppressed == 2  # type: ignore[attr-defined]
    second = record()
    assert limit.filter(second) and not hasattr(second, "suppressed")


def test_the_limiter_forgets_quiet_sites_instead_of_growing() -> None:
    clock = Clock()
    limit = RateLimit(burst=1, period=60, clock=clock)
    for line in range(RateLimit.MAX_SITES):
        assert limit.filter(record(lineno=line))
    clock.now += 61
    assert limit.filter(record(lineno=-1))
    assert len(limit._windows) == 1


# ------------------------------------------------------------------ routing


def test_library_records_are_json_lines_with_their_logger(stream: io.StringIO) -> None:
    logging.getLogger("watchdog.observers.inotify_buffer").warning("queue %s", "overflow")
    logging.getLogger("asyncio").info("below nothing: info is shown at level info")
    logging.getLogger("asyncio").debug("debug is not")
    got = lines(stream)
    assert [(g["event"], g["level"], g["logger"]) for g in got] == [
        ("queue overflow", "warning", "watchdog.observers.inotify_buffer"),
        ("below nothing: info is shown at level info", "info", "asyncio"),
    ]
    assert all("timestamp" in g for g in got)


def test_a_flood_from_one_library_call_site_is_bounded(stream: io.StringIO) -> None:
    for _ in range(RATE_BURST * 5):
        logging.getLogger("asyncio").error("socket.accept() out of system resource")
    assert len(lines(stream)) == RATE_BURST


def test_python_warnings_are_one_structured_line(stream: io.StringIO) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = logs._show_warning  # as configure left it
        warnings.warn("Callback with id '1' already exists\n  for watch", RuntimeWarning, 1)
    (line,) = lines(stream)
    assert line["event"] == "python.warning" and line["level"] == "warning"
    assert line["category"] == "RuntimeWarning"
    assert line["warning"] == "Callback with id '1' already exists for watch"
    assert line["source"].startswith(__file__)


def test_a_long_warning_is_cut(stream: io.StringIO) -> None:
    logs._show_warning(RuntimeWarning("x" * 5000), RuntimeWarning, "f.py", 1)
    (line,) = lines(stream)
    assert len(line["warning"]) == logs.WARNING_CHARS


def test_a_malformed_request_is_one_line_without_its_traceback(stream: io.StringIO) -> None:
    try:
        raise BadHttpMessage("Invalid character in Content-Length:\n\n    b'abc'\n      ^")
    except BadHttpMessage:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "127.0.0.1")
    (line,) = lines(stream)
    assert line["event"] == "http.bad_request" and line["level"] == "warning"
    assert line["remote"] == "127.0.0.1"
    assert "Invalid character in Content-Length" in line["error"]
    assert "exception" not in line and "Traceback" not in stream.getvalue()


def test_a_handler_bug_keeps_its_traceback_in_one_line(stream: io.StringIO) -> None:
    try:
        raise KeyError("ours")
    except KeyError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "::1")
    (line,) = lines(stream)
    assert line["event"] == "Error handling request from ::1"
    assert "Traceback" in line["exception"] and "KeyError: 'ours'" in line["exception"]


def test_a_crashed_thread_is_a_log_line(stream: io.StringIO) -> None:
    def crash() -> None:
        raise RuntimeError("observer died")

    thread = threading.Thread(target=crash, name="watchdog-observer")
    thread.start()
    thread.join()
    (line,) = lines(stream)
    assert line["event"] == "thread.crashed" and line["thread_name"] == "watchdog-observer"
    assert "RuntimeError: observer died" in line["exception"]


def test_secrets_are_masked_in_library_records_too(stream: io.StringIO) -> None:
    logging.getLogger("aiohttp.client").warning("header Authorization: Bearer sk-admin-SECRET-42")
    (line,) = lines(stream)
    assert "SECRET-42" not in stream.getvalue() and logs.REDACTED in line["event"]


def test_reconfiguring_replaces_the_handler(stream: io.StringIO) -> None:
    second = io.StringIO()
    configure(level="warning", fmt="json", stream=second)
    logging.getLogger("asyncio").warning("once")
    assert stream.getvalue() == ""
    assert [line["event"] for line in lines(second)] == ["once"]


def test_the_logger_level_lets_library_warnings_reach_other_handlers(
    stream: io.StringIO,
) -> None:
    """At LOG_LEVEL error, watchdog's overflow warning must still reach the watcher's own
    handler (it triggers a rescan), while our output shows errors only."""
    configure(level="error", fmt="json", stream=stream)
    seen: list[str] = []

    class Hook(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    name = "watchdog.observers.inotify_buffer"
    hook = Hook(level=logging.WARNING)
    logging.getLogger(name).addHandler(hook)
    try:
        logging.getLogger(name).warning("inotify queue overflow")
    finally:
        logging.getLogger(name).removeHandler(hook)
    assert seen == ["inotify queue overflow"]
    assert stream.getvalue() == ""


# ------------------------------------------------------------------ fatal


def test_fatal_is_json_when_the_log_is(stream: io.StringIO) -> None:
    err = io.StringIO()
    fatal("report --out /x/y: directory /x does not exist", stream=err)
    (line,) = lines(err)
    assert line["event"] == "command.failed" and line["level"] == "error"
    assert line["error"] == "report --out /x/y: directory /x does not exist"


def test_fatal_before_configure_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_installed", logs._Installed())
    err = io.StringIO()  # not a terminal: auto means JSON
    monkeypatch.delenv("TOKENSETTLE_LOG_FORMAT", raising=False)
    fatal("config error: x", stream=err)
    assert json.loads(err.getvalue())["error"] == "config error: x"
    monkeypatch.setenv("TOKENSETTLE_LOG_FORMAT", "console")
    err = io.StringIO()
    fatal("config error: x", stream=err)
    assert err.getvalue() == "tokensettle: config error: x\n"


class YieldingStream(io.StringIO):
    """A stream that lets other threads run after every write, as a pipe to a busy reader
    does: a line written in two calls is then cut in two by whoever writes next."""

    def write(self, text: str) -> int:
        n = super().write(text)
        time.sleep(0)
        return n


def test_lines_from_structlog_and_libraries_never_interleave(stream: io.StringIO) -> None:
    out = YieldingStream()
    configure(level="info", fmt="json", stream=out)
    lib = logging.getLogger("somelib")

    def library() -> None:
        for i in range(400):
            lib.handle(
                logging.LogRecord("somelib", logging.WARNING, "/x/lib.py", i, "m%d", (i,), None)
            )

    worker = threading.Thread(target=library)
    worker.start()
    log = structlog.get_logger()
    for i in range(400):
        log.info("ours", i=i)
    worker.join()
    parsed = lines(out)
    assert sum(1 for p in parsed if p.get("event") == "ours") == 400
    assert sum(1 for p in parsed if p.get("logger") == "somelib") >= RATE_BURST
