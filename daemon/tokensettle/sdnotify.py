"""A dependency-free sd_notify sender, in the style of systemd's
`man/notify-selfcontained-example.py` (MIT-0).

The protocol is a datagram of `KEY=VALUE` lines sent to the AF_UNIX socket named in
`$NOTIFY_SOCKET`: a filesystem path, or `@name` for the abstract namespace. Without
`$NOTIFY_SOCKET` (a plain shell, Docker, tests) every call is a no-op returning False.
A dead or missing socket never raises: the daemon must not crash because systemd went
away, so `notify` reports the outcome as a bool and leaves logging to the caller.

Messages the daemon sends: `READY=1` after the first scan, `STATUS=...` for
`systemctl status`, `WATCHDOG=1` from the health check, `STOPPING=1` on SIGTERM.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Final

__all__ = ["notify", "watchdog_interval"]

#: A send never blocks the event loop longer than this (a full receive queue is the only
#: way a datagram send on a connected unix socket can block).
SEND_TIMEOUT: Final = 1.0


def _address(raw: str) -> str | None:
    """The socket address for `$NOTIFY_SOCKET`, or None when it is not a unix socket we
    can use (systemd also knows `vsock:`; a relative path is never valid)."""
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None


def notify(
    message: str,
    *,
    environ: Mapping[str, str] | None = None,
    timeout: float = SEND_TIMEOUT,
) -> bool:
    """Send `message` (e.g. `"READY=1"`, or several lines) to the service manager.

    True when the datagram was sent; False without `$NOTIFY_SOCKET`, for an address that
    is not a unix socket, or when the socket is gone, refuses, or stays full for
    `timeout` seconds. Raises ValueError only for an empty message (a caller's bug).
    """
    if not message:
        raise ValueError("notify() needs a message such as 'READY=1'")
    env = os.environ if environ is None else environ
    raw = env.get("NOTIFY_SOCKET")
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        return False
    data = message.encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
            sent = sock.send(data)
    except OSError:  # ENOENT, ECONNREFUSED, EAGAIN/timeout, EMSGSIZE, ...
        return False
    return sent == len(data)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The recommended `WATCHDOG=1` period in seconds: half of `$WATCHDOG_USEC`, as
    sd_watchdog_enabled(3) advises. None when the watchdog is off, the value is unusable,
    or `$WATCHDOG_PID` is set and names another process (the variables were inherited)."""
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            return None
        if pid != os.getpid():
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000
