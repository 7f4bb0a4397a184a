"""Peak memory of the Usage API client against hostile and dense pages.

Starts the simulator as its own process (`python -m tokensettle.simulator`), then runs each
case in a fresh Python process (so `ru_maxrss` is that case's own peak): the client fetches
one window while the simulator serves the fault. `--uncapped` adds the cases with the page
cap lifted (`max_page_bytes` 1 TiB), which is how the client read every body before the cap.

    .venv/bin/python bench/page_cap.py [--uncapped]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time
from typing import Any

from common import free_port, get, machine, post

MIB = 2**20
CASES: dict[str, dict[str, Any]] = {
    "huge_page 200 MiB": {"fault": {"kind": "huge_page", "size": 200 * MIB}},
    "gzip_bomb 1 GiB": {"fault": {"kind": "gzip_bomb", "size": 1024 * MIB}},
    "dense page just under the cap": {"dense": True},
}


def _dense_requests(t0: int, per_minute: int) -> list[dict[str, Any]]:
    """`per_minute` results in each of 1,440 minutes, every counter carried: the densest
    page of realistic content the cap admits."""
    counters = {
        "input_tokens": 123_456,
        "output_tokens": 12_345,
        "num_model_requests": 12,
        "input_cached_tokens": 23_456,
        "input_cache_write_tokens": 3_456,
        "input_uncached_tokens": 96_544,
        "input_text_tokens": 96_544,
        "output_text_tokens": 12_345,
    }
    return [
        {
            "time": t0 + 60 * m + 1,
            "api_key_id": f"key_bench{k:04d}",
            "project_id": "proj_bench",
            "model": "gpt-4o-mini-2024-07-18",
            "usage": counters,
        }
        for m in range(1440)
        for k in range(per_minute)
    ]


async def _fetch(base_url: str, max_page_bytes: int | None, t0: int) -> dict[str, Any]:
    import aiohttp  # noqa: PLC0415 - measured in the child only

    from tokensettle.usage_api import RetryPolicy, UsageApiError, UsageClient  # noqa: PLC0415
    from tokensettle.windows import Interval  # noqa: PLC0415

    kw: dict[str, Any] = {} if max_page_bytes is None else {"max_page_bytes": max_page_bytes}
    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        client = UsageClient(
            base_url=base_url,
            admin_key="sk-admin-simulator-0000",
            session=session,
            retry=RetryPolicy(attempts=1),
            request_timeout=600,
            **kw,
        )
        try:
            result = await client.fetch(Interval(t0, t0 + 1440 * 60))
            outcome = f"{len(result.rows):,} rows"
        except UsageApiError as exc:
            outcome = f"{type(exc).__name__}"
    return {"outcome": outcome, "seconds": round(time.monotonic() - began, 2)}


def child(base_url: str, max_page_bytes: int | None, t0: int) -> None:
    report = asyncio.run(_fetch(base_url, max_page_bytes, t0))
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uncapped", action="store_true", help="also read the bodies whole")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        base_url, cap, t0 = args.child
        child(base_url, None if cap == "default" else int(cap), int(t0))
        return

    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "tokensettle.simulator", "--port", str(port)],
        stdout=subprocess.PIPE,
    )
    try:
        assert sim.stdout is not None
        json.loads(sim.stdout.readline())  # simulator.listening: it serves from here on
        root = f"http://127.0.0.1:{port}"
        t0 = (int(time.time()) // 86400 - 3) * 86400
        from tokensettle.usage_api import DEFAULT_MAX_PAGE_BYTES  # noqa: PLC0415

        caps = ["default"] + (["1099511627776"] if args.uncapped else [])
        rows = []
        for name, case in CASES.items():
            for cap in caps:
                post(f"{root}/_sim/reset", {})
                if case.get("dense"):
                    # ~450 bytes a result with these counters: ~31 MB, just under the cap
                    per_minute = int(DEFAULT_MAX_PAGE_BYTES / 1440 / 480)
                    dense = _dense_requests(t0, per_minute)
                    for i in range(0, len(dense), 2000):  # the control API takes 1 MiB a body
                        post(f"{root}/_sim/requests", {"requests": dense[i : i + 2000]})
                    name_shown = f"{name} ({per_minute} results a minute)"
                else:
                    post(f"{root}/_sim/faults", {"faults": [case["fault"]]})
                    name_shown = name
                out = subprocess.run(
                    [sys.executable, __file__, "--child", f"{root}/v1", cap, str(t0)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                report = json.loads(out.splitlines()[-1])  # after the client's log lines
                stats = get(f"{root}/_sim/stats")
                rows.append(
                    {
                        "case": name_shown,
                        "cap": "32 MiB (default)" if cap == "default" else "none (1 TiB)",
                        **report,
                        "requests": stats["usage_requests"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
        print(json.dumps({"machine": machine(), "cases": rows}, indent=2))
    finally:
        sim.terminate()
        sim.wait(timeout=30)


if __name__ == "__main__":
    main()
