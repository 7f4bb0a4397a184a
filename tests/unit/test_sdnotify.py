"""sd_notify sender against real datagram sockets: exact bytes, no-ops, dead sockets."""

from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokensettle.sdnotify import notify, watchdog_interval


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A bound datagram socket standing in for systemd, and the environment naming it."""
    path = tmp_path / "notify.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 108 bytes"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5.0)  # recv blocks until the datagram arrives; this only bounds a bug
        yield sock, {"NOTIFY_SOCKET": str(path)}


@pytest.mark.parametrize(
    "message",
    ["READY=1", "STATUS=watching 2 roots, 3 runs pending", "WATCHDOG=1", "STOPPING=1"],
)
def test_the_exact_message_arrives(
    receiver: tuple[socket.socket, dict[str, str]], message: str
) -> None:
    sock, env = receiver
    assert notify(message, environ=env) is True
    assert sock.recv(4096) == message.encode()


def test_several_lines_and_non_ascii_status_arrive_as_one_utf8_datagram(
    receiver: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = receiver
    assert notify("READY=1\nSTATUS=settled 3 runs \u2013 ok", environ=env)
    assert sock.recv(4096) == "READY=1\nSTATUS=settled 3 runs \u2013 ok".encode()


def test_messages_arrive_in_order_one_datagram_each(
    receiver: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = receiver
    for message in ("READY=1", "WATCHDOG=1", "STOPPING=1"):
        assert notify(message, environ=env)
    assert [sock.recv(4096) for _ in range(3)] == [b"READY=1", b"WATCHDOG=1", b"STOPPING=1"]


def test_the_process_environment_is_the_default(
    receiver: tuple[socket.socket, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, env = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    assert notify("READY=1")
    assert sock.recv(4096) == b"READY=1"


@pytest.mark.skipif(sys.platform != "linux", reason="the abstract namespace is Linux only")
def test_an_at_sign_means_the_abstract_namespace() -> None:
    name = f"tokensettle-test-{os.getpid()}-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5.0)
        assert notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"
    # The same name as a path would be a relative path: never sent anywhere.
    assert notify("READY=1", environ={"NOTIFY_SOCKET": name}) is False


def test_without_notify_socket_it_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    assert notify("READY=1", environ={}) is False
    assert notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False


@pytest.mark.parametrize("address", ["relative/notify.sock", "vsock:2:1234", "@"])
def test_addresses_that_are_not_unix_sockets_are_refused(address: str) -> None:
    assert notify("READY=1", environ={"NOTIFY_SOCKET": address}) is False


def test_a_missing_socket_file_returns_false(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}
    assert notify("WATCHDOG=1", environ=env) is False


def test_a_socket_nobody_listens_on_returns_false(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    assert path.exists()  # the file stays, the receiver is gone: ECONNREFUSED
    assert notify("STOPPING=1", environ={"NOTIFY_SOCKET": str(path)}) is False


def test_a_full_receive_queue_returns_false_instead_of_blocking(
    receiver: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = receiver
    sent = 0
    while sent < 100_000 and notify("WATCHDOG=1", environ=env, timeout=0.05):
        sent += 1
    assert 0 < sent < 100_000, "the queue never filled: the test did not test anything"
    # what was queued is intact
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_an_empty_message_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="needs a message"):
        notify("", environ={})


# --------------------------------------------------------------------------------------
# watchdog_interval


@pytest.mark.parametrize(
    ("usec", "expected"),
    [("60000000", 30.0), ("1000000", 0.5), ("3", 1.5e-6)],
)
def test_the_ping_period_is_half_the_watchdog_interval(usec: str, expected: float) -> None:
    assert watchdog_interval({"WATCHDOG_USEC": usec}) == pytest.approx(expected)


def test_a_watchdog_pid_of_this_process_is_honoured() -> None:
    env = {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(env) == 30.0


def test_a_watchdog_meant_for_another_process_is_ignored() -> None:
    env = {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert watchdog_interval(env) is None


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "60s"},
        {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "self"},
    ],
)
def test_no_or_unusable_watchdog_settings_mean_no_pings(env: dict[str, str]) -> None:
    assert watchdog_interval(env) is None


def test_the_process_environment_is_the_default_for_the_watchdog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 10.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None
