"""`tokensettle lease` in this process against the real simulator (served from a thread
over loopback): refusals that run nothing, `new`, `list`, `revoke`, retries after a 5xx.
The real-process story (signals, exit codes, the child's environment) is in
tests/e2e/test_lease_exec.py."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from tokensettle import lease_cli
from tokensettle.simulator import RunningSimulator, Scenario
from tokensettle.usage_scope import SCOPE_FILE, load_declaration

ADMIN = "sk-admin-lease-cli-S3CRET"
USAGE_ONLY = "sk-admin-usage-only-S3CRET"
LEASES = "proj_leases"
SCENARIO = {
    "admin_keys": [ADMIN, USAGE_ONLY],
    "admin": {
        "projects": [
            {"id": "proj_default", "name": "Default project", "default": True},
            {"id": LEASES, "name": "Leases"},
            {"id": "proj_old", "archived": True},
            {"id": "proj_capped", "max_key_lifetime": 3600},
        ],
        "usage_only_keys": [USAGE_ONLY],
        "usage_delay": 0,
    },
}


class ThreadedSimulator:
    """The simulator on its own event loop in a thread, so that a synchronous test can
    run the CLI (which calls asyncio.run) in the main thread."""

    def __init__(self, scenario: Scenario) -> None:
        self.sim = RunningSimulator(scenario)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> RunningSimulator:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.sim.__aenter__(), self.loop).result(10)
        return self.sim

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.sim.__aexit__(None, None, None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Cli:
    sim: RunningSimulator
    tmp: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    def run(self, *argv: str, **env: str | None) -> tuple[int, str, str]:
        with self.monkeypatch.context() as m:
            for name, value in env.items():
                if value is None:
                    m.delenv(name, raising=False)
                else:
                    m.setenv(name, value)
            code = lease_cli.run(["lease", *argv])
        out = self.capsys.readouterr()
        return code, out.out, out.err

    def control(self, what: str, body: dict[str, Any]) -> None:
        request = urllib.request.Request(  # noqa: S310 - the simulator, on loopback
            f"{self.sim.root_url}/_sim/{what}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            assert resp.status == 200

    def minted(self) -> list[Any]:
        return list(self.sim.admin.keys.values())


@pytest.fixture
def cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Cli]:
    for name in list(os.environ):
        if name.startswith(("TOKENSETTLE_", "OPENAI_", "ANTHROPIC_")) or name in (
            "CREDENTIALS_DIRECTORY",
        ):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    with ThreadedSimulator(Scenario.from_json(SCENARIO)) as sim:
        monkeypatch.setenv("TOKENSETTLE_API_BASE_URL", sim.base_url)
        monkeypatch.setenv("TOKENSETTLE_ADMIN_KEY", ADMIN)
        monkeypatch.setenv("TOKENSETTLE_LEASE_PROJECT", LEASES)
        monkeypatch.setenv("TOKENSETTLE_STATE_DIR", str(tmp_path / "state"))
        monkeypatch.setenv("TOKENSETTLE_LOG_FORMAT", "json")
        monkeypatch.setenv("TOKENSETTLE_REQUEST_ATTEMPTS", "2")
        try:
            yield Cli(sim, tmp_path, monkeypatch, capsys)
        finally:
            structlog.reset_defaults()  # the CLI bound its logs to this test's stderr


def message_lines(err: str) -> list[str]:
    """stderr without its JSON log lines (and without argparse's usage lines)."""
    return [
        line
        for line in err.splitlines()
        if line and not line.startswith(("{", "usage:", "  ", "                "))
    ]


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("env", "argv", "code", "needle"),
    [
        ({"TOKENSETTLE_ADMIN_KEY": USAGE_ONLY}, [], 3, "admin key refused (Admin API GET"),
        ({"TOKENSETTLE_LEASE_PROJECT": "proj_default"}, [], 2, "the Default project"),
        ({"TOKENSETTLE_LEASE_PROJECT": "proj_nope"}, [], 2, "project proj_nope not found"),
        ({"TOKENSETTLE_LEASE_PROJECT": "proj_old"}, [], 2, "proj_old is archived"),
        ({"TOKENSETTLE_LEASE_PROJECT": "proj_capped"}, [], 2, "may cap key lifetime"),
        ({"TOKENSETTLE_LEASE_PROJECT": None}, [], 2, "lease_project (TOKENSETTLE_LEASE_PROJECT)"),
        ({"TOKENSETTLE_LEASE_PROJECT": "Leases"}, [], 2, "config error: lease_project"),
        ({"TOKENSETTLE_ADMIN_KEY": None}, [], 2, "admin_key: not set"),
        ({"TOKENSETTLE_LEASE_SERVICE_ACCOUNT": "svc_acct_nope"}, [], 2, "svc_acct_nope not found"),
        ({}, ["--ttl", "400d"], 2, "argument --ttl: '400d' must be between 1s and 365d"),
        ({}, ["--ttl", "30"], 2, "needs a unit"),
        ({}, ["--framework", "chat dev"], 2, "is not a framework name"),
    ],
)
def test_a_lease_that_cannot_be_made_runs_nothing(
    cli: Cli, env: dict[str, str | None], argv: list[str], code: int, needle: str
) -> None:
    marker = cli.tmp / "ran"
    run_dir = cli.tmp / "runs" / "chatdev" / "r1"
    got, out, err = cli.run(
        "exec", *argv, "--run-dir", str(run_dir), "--", "touch", str(marker), **env
    )
    assert got == code, err
    lines = message_lines(err)
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err and out == ""
    assert not marker.exists() and not run_dir.exists()
    assert [k for k in cli.minted() if k.owner_type == "service_account"] == []
    assert ADMIN not in err and USAGE_ONLY not in err


def test_the_lifetime_policy_is_met_with_a_shorter_ttl(cli: Cli) -> None:
    marker = cli.tmp / "ran"
    code, _, err = cli.run(
        "exec", "--ttl", "1h", "--", "touch", str(marker), TOKENSETTLE_LEASE_PROJECT="proj_capped"
    )
    assert code == 0, err and marker.exists()
    (key,) = cli.minted()
    assert key.expires_at - key.created_at == 3600


def test_a_run_directory_that_already_declares_mints_nothing(cli: Cli) -> None:
    run_dir = cli.tmp / "r1"
    run_dir.mkdir()
    (run_dir / SCOPE_FILE).write_text('{"api_key_ids": ["key_old"]}')
    code, _, err = cli.run("exec", "--run-dir", str(run_dir), "--", "true")
    assert code == 2 and f"{SCOPE_FILE} exists already" in err
    assert (run_dir / SCOPE_FILE).read_text() == '{"api_key_ids": ["key_old"]}'
    (run_dir / "file").write_text("")
    code, _, err = cli.run("exec", "--run-dir", str(run_dir / "file"), "--", "true")
    assert code == 2 and "exists and is not a directory" in err
    assert cli.minted() == [] and cli.sim.call_log == []


@pytest.mark.parametrize(
    ("cmd", "code", "needle"),
    [
        (["no-such-command-tokensettle"], 127, "command not found"),
        (["/nonexistent/bin/tool"], 127, "command not found"),
        ([], 2, "no command given"),
    ],
)
def test_a_command_that_cannot_start_mints_nothing(
    cli: Cli, cmd: list[str], code: int, needle: str
) -> None:
    got, _, err = cli.run("exec", "--", *cmd)
    assert got == code and needle in err
    assert cli.sim.call_log == []


def test_a_usage_error_of_revoke(cli: Cli) -> None:
    code, _, err = cli.run("revoke")
    assert code == 2 and "name KEY_IDs, or --settled and/or --expired" in err
    code, _, err = cli.run("revoke", "sk-svcacct-oops")
    assert code == 2 and "is not a key id" in err and "sk-svcacct-oops" in err  # user's input


# ---------------------------------------------------------------------------- new, list, revoke


def test_new_prints_the_key_and_writes_the_declaration(cli: Cli) -> None:
    run_dir = cli.tmp / "runs" / "baes" / "r7"
    code, out, err = cli.run("new", "--framework", "baes", "--run-dir", str(run_dir))
    assert code == 0, err
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    env = {k: shlex.split(v)[0] for k, v in env.items()}
    value = env["OPENAI_API_KEY"]
    assert value.startswith("sk-svcacct-") and env["OPENAI_API_KEY_BAES"] == value
    decl = load_declaration((run_dir / SCOPE_FILE).read_bytes(), source="x")
    assert decl.api_key_ids == (env["TOKENSETTLE_LEASE_KEY_ID"],)
    assert json.loads(env["TOKENSETTLE_USAGE_SCOPE"]) == decl.to_json()
    assert env["TOKENSETTLE_RUN_DIR"] == str(run_dir)
    assert value not in err
    assert_absent(value, cli.state, run_dir)

    code, out, _ = cli.run("new", "--format", "json")
    doc = json.loads(out)
    assert doc["api_key"].startswith("sk-svcacct-") and doc["key_id"].startswith("key_")
    assert doc["usage_scope"]["lease"]["key_id"] == doc["key_id"]
    assert doc["run_dir"] is None and doc["env"]["OPENAI_API_KEY"] == doc["api_key"]
    assert_absent(doc["api_key"], cli.state)
    assert len(cli.sim.admin.service_accounts) == 1  # remembered, not made twice


def assert_absent(value: str, *dirs: Path) -> None:
    files = [p for d in dirs for p in d.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert value.encode() not in path.read_bytes(), path


def test_list_and_revoke(cli: Cli) -> None:
    code, out, _ = cli.run("list")
    assert code == 0 and out.startswith("no leases in ")
    run_dir = cli.tmp / "runs" / "chatdev" / "r1"
    assert (
        cli.run("exec", "--framework", "chatdev", "--run-dir", str(run_dir), "--", "true")[0] == 0
    )
    code, out, _ = cli.run("list", "--json")
    (lease,) = json.loads(out)["leases"]
    assert lease["state"] == "active" and lease["run_dir"] == str(run_dir)
    assert lease["framework"] == "chatdev"
    code, out, _ = cli.run("list")
    assert lease["key_id"] in out and "active" in out and str(run_dir) in out
    code, out, _ = cli.run("revoke", "--settled", "--expired")
    assert code == 0 and out.strip() == "nothing to revoke"
    code, out, _ = cli.run("revoke", lease["key_id"])
    assert code == 0 and out.strip() == f"{lease['key_id']}: revoked"
    assert cli.sim.admin.keys[lease["key_id"]].deleted_at is not None
    code, out, _ = cli.run("list", "--json")
    assert json.loads(out)["leases"][0]["state"] == "revoked"
    code, out, _ = cli.run("revoke", lease["key_id"])
    assert code == 0 and "already revoked" in out
    # a key id nobody has: nothing to delete
    code, out, _ = cli.run("revoke", "key_notrecorded")
    assert code == 0 and out.strip() == f"key_notrecorded: already gone (no such key in {LEASES})"


def test_revoke_never_deletes_a_key_tokensettle_did_not_lease(cli: Cli) -> None:
    """`lease revoke` of a user's own key in the lease project (a typo, a pasted id) was
    `revoked`: it deleted the key. Only a key tokensettle leased is ever deleted."""
    cli.control(
        "admin",
        {
            "api_keys": [
                {
                    "id": "key_usersOwn0001",
                    "value": "sk-proj-users-own-SECRET-1",
                    "project_id": LEASES,
                }
            ]
        },
    )
    code, out, _ = cli.run("revoke", "key_usersOwn0001")
    assert code == 2, out
    assert out.strip().startswith("key_usersOwn0001: not revoked: not a leased key")
    assert "owner is a user" in out and "nothing deleted" in out
    assert cli.sim.admin.keys["key_usersOwn0001"].deleted_at is None
    assert "sk-proj-users-own-SECRET-1" not in out


def test_a_lost_lease_book_still_revokes_the_keys_tokensettle_leased(cli: Cli) -> None:
    assert cli.run("exec", "--", "true")[0] == 0
    (key,) = cli.minted()
    (cli.state / "leases.json").unlink()  # the record of the lease and its account is gone
    code, out, _ = cli.run("revoke", key.id)
    assert code == 0 and out.strip() == f"{key.id}: revoked", out
    assert key.deleted_at is not None


def test_a_revoke_is_retried_after_a_5xx(cli: Cli) -> None:
    assert cli.run("exec", "--", "true")[0] == 0
    (key,) = cli.minted()
    cli.control("faults", {"faults": [{"kind": "500", "target": "admin"}] * 2})
    code, out, _ = cli.run("revoke", key.id)
    assert code == 1 and f"{key.id}: not revoked: Admin API DELETE" in out and "HTTP 500" in out
    assert key.deleted_at is None
    code, out, _ = cli.run("list")
    assert "1 failed revoke(s)" in out
    code, out, _ = cli.run("revoke", key.id)
    assert code == 0 and out.strip() == f"{key.id}: revoked"
    assert key.deleted_at is not None


def test_a_revoke_refused_for_permission_is_exit_3(cli: Cli) -> None:
    assert cli.run("exec", "--", "true")[0] == 0
    (key,) = cli.minted()
    code, out, err = cli.run("revoke", key.id, TOKENSETTLE_ADMIN_KEY=USAGE_ONLY)
    assert code == 3 and "HTTP 403" in out and "leases need an admin key" in err
    assert key.deleted_at is None


def test_a_damaged_lease_book_is_one_line(cli: Cli) -> None:
    cli.state.mkdir()
    (cli.state / "leases.json").write_text("{not json")
    code, _, err = cli.run("list")
    assert code == 1 and message_lines(err) == [
        f"tokensettle lease: {cli.state / 'leases.json'}: not a lease book "
        "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"
    ]
    assert cli.run("exec", "--", "true")[0] == 0  # set aside, and leasing goes on
    assert len(list(cli.state.glob("leases.json.damaged-*"))) == 1


def test_the_hook_for_the_top_level_cli() -> None:
    """What cli.py will call: add_arguments on its subparsers, main with the namespace."""
    import argparse

    parser = argparse.ArgumentParser(prog="tokensettle")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run")
    lease_cli.add_arguments(sub)
    args = parser.parse_args(["lease", "exec", "--framework", "x", "--", sys.executable, "-V"])
    assert (args.command, args.lease_command, args.framework) == ("lease", "exec", "x")
    assert args.cmd == ["--", sys.executable, "-V"]
    args = parser.parse_args(["lease", "revoke", "key_a", "key_b", "--settled"])
    assert (args.key_ids, args.settled, args.expired) == (["key_a", "key_b"], True, False)


def test_two_admin_requests_per_run_once_the_account_exists(cli: Cli) -> None:
    """The issue's goal: create and delete. The project is checked on first use only."""
    assert cli.run("exec", "--", "true")[0] == 0
    first = [f"{e.method} {e.path.rsplit('/', 1)[-1]}" for e in cli.sim.call_log]
    assert first == ["GET proj_leases", "POST service_accounts", "POST api_keys"]
    before = len(cli.sim.call_log)
    assert cli.run("exec", "--", "true")[0] == 0
    key = cli.minted()[-1]
    assert cli.run("revoke", key.id)[0] == 0
    assert [e.method for e in cli.sim.call_log[before:]] == ["POST", "DELETE"]


def test_a_project_archived_since_the_first_lease_is_named(cli: Cli) -> None:
    assert cli.run("exec", "--", "true")[0] == 0
    cli.control("admin", {"projects": [{"id": LEASES, "archived": True}]})
    marker = cli.tmp / "ran"
    code, _, err = cli.run("exec", "--", "touch", str(marker))
    assert code == 2 and message_lines(err) == [
        f"tokensettle lease: lease_project (TOKENSETTLE_LEASE_PROJECT): {LEASES} is archived; "
        "name an active project"
    ]
    assert not marker.exists()


def test_a_remembered_service_account_deleted_since_is_replaced(cli: Cli) -> None:
    assert cli.run("exec", "--", "true")[0] == 0
    cli.sim.admin.service_accounts.clear()  # deleted in the dashboard
    assert cli.run("exec", "--", "true")[0] == 0
    assert len(cli.sim.admin.service_accounts) == 1
    book = json.loads((cli.state / "leases.json").read_text())
    assert [a["id"] for a in book["service_accounts"]] == list(cli.sim.admin.service_accounts)
