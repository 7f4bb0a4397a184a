"""Summarise py-spy raw (collapsed) stacks: the share of busy samples in which each
function is on the stack (inclusive) or on top (self), over every thread. Samples of a
thread waiting for work (a worker thread's queue, the event loop's epoll) are not busy.

    .venv/bin/python bench/stacks.py PASS.txt [--top 40] [--match tokensettle]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

#: `function (path/to/file.py:123)` -> `function (file.py)`
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]*?)(?::\d+)?\)$")


#: leaves at which a thread waits for work
IDLE = frozenset({"_worker (thread.py)", "EpollSelector.select (selectors.py)"})


def frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip()
    return f"{m['fn']} ({Path(m['file']).name})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stacks", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--match", default="", help="only frames whose text contains this")
    args = parser.parse_args()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = idle = 0
    for line in args.stacks.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";")]
        if frames[-1] in IDLE:
            idle += count
            continue
        total += count
        for name in set(frames):
            inclusive[name] += count
        own[frames[-1]] += count
    print(f"{total} busy samples ({idle} idle left out)")
    for name, count in inclusive.most_common():
        if args.match in name and args.top > 0:
            args.top -= 1
            print(f"{100 * count / total:5.1f}% incl {100 * own[name] / total:5.1f}% self  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
