"""`tokensettle doctor` run beside the daemon it checks: the HTTP address is taken, by us."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.conftest import World
from tests.support.daemon import EXE
from tokensettle import __version__

pytestmark = pytest.mark.e2e


async def test_doctor_beside_a_running_daemon_warns_that_its_address_is_served(
    world: World,
) -> None:
    daemon = await world.start()
    addr = daemon.env["TOKENSETTLE_HTTP_ADDR"]
    proc = await asyncio.create_subprocess_exec(
        EXE,
        "doctor",
        env=daemon.env,
        cwd=world.tmp,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = out.decode().splitlines()
    assert (
        f"WARN  http addr: {addr} is served by a running tokensettle {__version__}; a second "
        "daemon with this address would not start"
    ) in lines, out.decode()
    assert proc.returncode == 0, out.decode() + err.decode()  # a warning is not a failure
    assert await daemon.terminate() == 0
