"""Start-up cost of the command line: import time and whole-process wall time.

Three figures, each the median of `--repeat` fresh processes:

- `import tokensettle.cli`: the cumulative time `python -X importtime` reports for it;
- `tokensettle --version`: wall time of the whole process;
- `tokensettle list`: wall time over an empty runs root (so the figure is start-up, not
  parsing).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BIN, machine

EXE = str(BIN / "tokensettle")


def import_us(module: str) -> int:
    """Cumulative microseconds for `module` as reported by `-X importtime`."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in proc.stderr.splitlines():
        # "import time: self [us] | cumulative | imported package"
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[2] == module:
            return int(parts[1])
    raise RuntimeError(f"{module} not in -X importtime output")


def wall_ms(args: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(args, env=env, cwd=cwd, capture_output=True, check=True)
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=11)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "runs").mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENSETTLE_", "OPENAI_"))}
        env["TOKENSETTLE_RUNS_DIRS"] = str(cwd / "runs")
        env["TOKENSETTLE_LOG_FORMAT"] = "json"
        imports = [import_us("tokensettle.cli") / 1000 for _ in range(opts.repeat)]
        version = [wall_ms([EXE, "--version"], env, cwd) for _ in range(opts.repeat)]
        listing = [wall_ms([EXE, "list"], env, cwd) for _ in range(opts.repeat)]
    print(
        json.dumps(
            {
                "machine": machine(),
                "repeat": opts.repeat,
                "import_tokensettle_cli_ms": round(statistics.median(imports), 1),
                "version_wall_ms": round(statistics.median(version), 1),
                "list_wall_ms": round(statistics.median(listing), 1),
                "min_ms": {
                    "import": round(min(imports), 1),
                    "version": round(min(version), 1),
                    "list": round(min(listing), 1),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
