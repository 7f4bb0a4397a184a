"""The daemon's output stays one JSON object per line whatever the libraries do, and a
configuration file with a typo is refused on SIGHUP while the running one is kept."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from tests.e2e.conftest import World
from tests.support.daemon import Daemon, wait_for, write_in_new_dirs
from tokensettle.logs import RATE_BURST

pytestmark = pytest.mark.e2e


def all_json(daemon: Daemon) -> None:
    """Every line on stdout and on stderr is one JSON object."""
    assert not daemon.not_json, daemon.not_json[:5]
    for line in daemon.stderr.decode().splitlines():
        assert isinstance(json.loads(line), dict), line


async def test_malformed_requests_give_one_structured_line_at_most(world: World) -> None:
    daemon = await world.start()
    host, port = daemon.env["TOKENSETTLE_HTTP_ADDR"].rsplit(":", 1)
    for _ in range(2 * RATE_BURST):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.0 400")
        writer.close()
        await writer.wait_closed()
    line = await daemon.wait_event("http.bad_request")
    assert line["level"] == "warning" and line["remote"] == "127.0.0.1"
    assert "Content-Length" in line["error"]
    status, _ = await world.healthz(daemon)
    assert status == 200
    assert await daemon.terminate() == 0
    # One line per bad request until the call site's budget is spent, then silence.
    assert daemon.count("http.bad_request") == RATE_BURST
    all_json(daemon)


async def test_a_run_directory_moved_out_and_back_is_seen_again_without_a_warning(
    world: World,
) -> None:
    """watchdog's recursive watch warned (a RuntimeWarning, which became a `python.warning`
    line) when a directory it had watched came back; the watcher now gives each watch its
    own callback id, so the return is seen and nothing warns. (That a warning becomes one
    JSON line is tests/unit/test_logs.py's.)"""
    daemon = await world.start()
    run = world.run("chatdev", "r1", 1, (900, 90, 3))
    path = world.path(run)
    write_in_new_dirs(path, run.data)
    await daemon.wait_event("run.scheduled", run_id="r1")

    async def forgotten() -> bool:
        _, body = await daemon.get(world.session, "/runs")
        return all(r["path"] != str(path) for r in body["runs"])

    away = world.tmp / "moved-away"
    os.rename(path.parent, away)
    await wait_for(forgotten, 10, what="the moved-away run to be forgotten")
    since = len(daemon.events)
    os.rename(away, path.parent)
    await daemon.wait_event("run.scheduled", run_id="r1", since=since)
    assert daemon.count("python.warning") == 0, daemon.find("python.warning")
    assert await daemon.terminate() == 0
    all_json(daemon)


async def test_sighup_refuses_a_file_with_a_typo_and_keeps_running(world: World) -> None:
    config = world.tmp / "tokensettle.toml"
    config.write_text('[frameworks.chatdev]\napi_key_ids = ["key_chatdevTEST001"]\n')
    daemon = await world.start(TOKENSETTLE_CONFIG=str(config))
    typos = [
        (
            '[frameworks.chatdev]\napi_key_id = ["key_other"]\n',
            "frameworks.chatdev.api_key_id: unknown key; did you mean api_key_ids?",
        ),
        ('min_aeg = "5m"\n', f"min_aeg (config {config}): unknown setting; did you mean min_age?"),
    ]
    for text, error in typos:
        since = len(daemon.events)
        config.write_text(text)
        os.kill(daemon.pid, signal.SIGHUP)
        failed = await daemon.wait_event("daemon.reload_failed", since=since)
        assert failed["error"] == error
        assert failed["action"] == "keeping the running configuration"
    assert daemon.count("daemon.reloaded") == 0
    status, body = await world.healthz(daemon)
    assert status == 200 and body["status"] == "ok"
    # A correct file is taken again.
    config.write_text('[frameworks.chatdev]\napi_key_ids = ["key_chatdevTEST001"]\n')
    os.kill(daemon.pid, signal.SIGHUP)
    await daemon.wait_event("daemon.reloaded")
    assert await daemon.terminate() == 0
    all_json(daemon)
