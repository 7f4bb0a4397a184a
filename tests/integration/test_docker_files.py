"""The Dockerfile, .dockerignore and docker-compose.example.yml, checked without a Docker
engine: a small Dockerfile parser, the HEALTHCHECK's Python run against loopback servers,
and the compose file through PyYAML. Where `docker info` succeeds, one test also builds
the image and runs it.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tokensettle import __version__

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.example.yml"
UID_GID = "10001:10001"
STATE_DIR = "/var/lib/tokensettle"


# --------------------------------------------------------------------------------------
# A Dockerfile parser: enough for our own file (continuations, comments, JSON forms)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not parts):
            continue  # comments (also inside continuations) and blank lines
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, args = " ".join(p for p in parts if p).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    assert not parts, "the Dockerfile ends inside a line continuation"
    return out


def json_form(args: str) -> list[str] | None:
    """The exec (JSON array of strings) form, or None for the shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None


def split_flags(args: str) -> tuple[dict[str, str], str]:
    """Leading `--flag=value` options of COPY/HEALTHCHECK, and the rest."""
    flags: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        name, _, value = word[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    return flags, rest


def last(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert found, f"the Dockerfile has no {keyword}"
    return found[-1]  # like Docker: only the last CMD/ENTRYPOINT/HEALTHCHECK/USER counts


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for pair in shlex.split(ins.args):
                key, sep, value = pair.partition("=")
                assert sep, f"line {ins.line}: use ENV KEY=VALUE, not the legacy form"
                env[key] = value
    return env


def healthcheck_code(instructions: list[Instruction]) -> str:
    _, rest = split_flags(last(instructions, "HEALTHCHECK").args)
    kind, _, command = rest.partition(" ")
    assert kind == "CMD", f"HEALTHCHECK {kind}: expected CMD"
    argv = json_form(command)
    assert argv is not None, "HEALTHCHECK CMD must be the exec form (a JSON array)"
    assert argv[:2] == ["python", "-c"] and len(argv) == 3, argv
    return argv[2]


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def test_the_parser_joins_continuations_and_skips_comments() -> None:
    parsed = parse_dockerfile(
        '# syntax=docker/dockerfile:1\nFROM x\n\nRUN a \\\n    # note\n    && b\nCMD ["c"]\n'
    )
    assert parsed == [
        Instruction("FROM", "x", 2),
        Instruction("RUN", "a && b", 4),
        Instruction("CMD", '["c"]', 7),
    ]
    assert json_form('["c"]') == ["c"]
    assert json_form("tokensettle run") is None
    assert json_form("[]") is None


def test_base_image(dockerfile: list[Instruction]) -> None:
    assert [i.args for i in dockerfile if i.keyword == "FROM"] == ["python:3.11-slim"]


def test_entrypoint_and_cmd_are_exec_form_so_arguments_replace_the_subcommand(
    dockerfile: list[Instruction],
) -> None:
    entrypoint = json_form(last(dockerfile, "ENTRYPOINT").args)
    cmd = json_form(last(dockerfile, "CMD").args)
    # `docker run IMAGE` -> tokensettle run; `docker run IMAGE reconcile` -> tokensettle reconcile
    assert entrypoint == ["tokensettle"]
    assert cmd == ["run"]


def test_runs_as_a_numeric_non_root_user(dockerfile: list[Instruction]) -> None:
    user = last(dockerfile, "USER").args
    uid, sep, gid = user.partition(":")
    assert sep and uid.isdigit() and gid.isdigit(), f"USER {user}: use numeric UID:GID"
    assert int(uid) != 0 and int(gid) != 0
    assert user == UID_GID
    # and USER comes after every RUN (nothing runs as root afterwards)
    user_line = last(dockerfile, "USER").line
    assert all(i.line < user_line for i in dockerfile if i.keyword == "RUN")


def test_environment_defaults(dockerfile: list[Instruction]) -> None:
    env = env_of(dockerfile)
    assert env == {
        "TOKENSETTLE_LOG_FORMAT": "json",
        "TOKENSETTLE_HTTP_ADDR": "0.0.0.0:9464",
        "TOKENSETTLE_STATE_DIR": STATE_DIR,
        "TOKENSETTLE_RUNS_DIRS": "/runs",
        "PYTHONUNBUFFERED": "1",
    }


def test_state_volume_and_port(dockerfile: list[Instruction]) -> None:
    volumes = [v for i in dockerfile if i.keyword == "VOLUME" for v in json_form(i.args) or []]
    assert volumes == [env_of(dockerfile)["TOKENSETTLE_STATE_DIR"]]
    port = env_of(dockerfile)["TOKENSETTLE_HTTP_ADDR"].rpartition(":")[2]
    assert [i.args for i in dockerfile if i.keyword == "EXPOSE"] == [port]


def test_pip_installs_the_context_without_a_cache(dockerfile: list[Instruction]) -> None:
    installs = [i.args.split("&&")[0].split() for i in dockerfile if i.keyword == "RUN"]
    assert any(
        words[:3] == ["pip", "install", "--no-cache-dir"] and words[-1] == "." for words in installs
    ), installs


def test_the_working_directory_is_not_the_state_volume(dockerfile: list[Instruction]) -> None:
    # Settings reads `.env` from the working directory; the state volume is writable.
    assert last(dockerfile, "WORKDIR").args == "/"


# --------------------------------------------------------------------------------------
# COPY and .dockerignore


def ignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes `relative` or a directory above it (no `!` rules)."""
    parts = Path(relative).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        assert not pattern.startswith("!"), "this checker does not handle exceptions"
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch.fnmatchcase(Path(prefix).name, bare):
                return True
    return False


def copy_sources(dockerfile: list[Instruction]) -> list[str]:
    sources: list[str] = []
    for ins in dockerfile:
        if ins.keyword in ("COPY", "ADD"):
            assert ins.keyword == "COPY", f"line {ins.line}: ADD fetches and unpacks; use COPY"
            flags, rest = split_flags(ins.args)
            if "from" in flags:
                continue
            items = json_form(rest) or rest.split()
            assert len(items) >= 2, f"line {ins.line}: COPY needs a source and a destination"
            sources.extend(items[:-1])
    return sources


def test_only_existing_files_are_copied_and_none_is_ignored(
    dockerfile: list[Instruction],
) -> None:
    sources = copy_sources(dockerfile)
    assert sorted(s.rstrip("/") for s in sources) == ["README.md", "daemon", "pyproject.toml"]
    patterns = ignore_patterns()
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the build context"
        assert not ignored(source.rstrip("/"), patterns), f"COPY {source} is in .dockerignore"
    assert (REPO / "daemon" / "tokensettle" / "__init__.py").is_file()
    assert not ignored("daemon/tokensettle/cli.py", patterns)


def test_the_copied_files_are_what_the_package_build_reads(
    dockerfile: list[Instruction],
) -> None:
    copied = {s.rstrip("/") for s in copy_sources(dockerfile)}
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["readme"] in copied
    assert set(project["tool"]["setuptools"]["packages"]["find"]["where"]) <= copied
    assert "license-files" not in project["project"]  # else those must be copied too


@pytest.mark.parametrize(
    "path",
    [
        ".venv",
        ".git",
        "tests",
        "bench",
        "demo-runs",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".hypothesis",
        "daemon/tokensettle/__pycache__",
        "daemon/tokensettle/__pycache__/cli.cpython-311.pyc",
        ".env",
        "secrets/admin_key",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert ignored(path, ignore_patterns())


def test_the_ignore_checker_can_say_no() -> None:
    assert not ignored("pyproject.toml", ignore_patterns())
    assert not ignored("daemon", ignore_patterns())


# --------------------------------------------------------------------------------------
# The HEALTHCHECK: it compiles, and it answers 0/1 against real loopback servers


def test_healthcheck_is_python_that_compiles(dockerfile: list[Instruction]) -> None:
    flags, _ = split_flags(last(dockerfile, "HEALTHCHECK").args)
    assert set(flags) <= {"interval", "timeout", "start-period", "retries", "start-interval"}
    code = healthcheck_code(dockerfile)
    compile(code, "<HEALTHCHECK>", "exec")
    assert "/healthz" in code
    assert "curl" not in code


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str]

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {"paths": [], "status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _run_healthcheck(code: str, port: int) -> subprocess.CompletedProcess[str]:
    env = {
        "TOKENSETTLE_HTTP_ADDR": f"0.0.0.0:{port}",
        # a dead proxy: the check must not use it for 127.0.0.1
        "HTTP_PROXY": "http://127.0.0.1:9/",
        "http_proxy": "http://127.0.0.1:9/",
        "NO_PROXY": "",
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_healthcheck_exits_0_on_200(
    dockerfile: list[Instruction], health_server: tuple[int, type[_Health]]
) -> None:
    port, handler = health_server
    done = _run_healthcheck(healthcheck_code(dockerfile), port)
    assert done.returncode == 0, done.stderr
    assert handler.paths == ["/healthz"]


def test_healthcheck_exits_1_on_503(
    dockerfile: list[Instruction], health_server: tuple[int, type[_Health]]
) -> None:
    port, handler = health_server
    handler.status = 503
    done = _run_healthcheck(healthcheck_code(dockerfile), port)
    assert done.returncode == 1, done.stderr
    assert handler.paths == ["/healthz"]


def test_healthcheck_exits_1_when_nothing_listens(dockerfile: list[Instruction]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = _run_healthcheck(healthcheck_code(dockerfile), port)  # the port is closed now
    assert done.returncode == 1


# --------------------------------------------------------------------------------------
# docker-compose.example.yml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _named_volumes(service: dict[str, Any], declared: set[str]) -> dict[str, str]:
    """Named volume -> mount point, from short (`src:dst[:mode]`) or long syntax."""
    out: dict[str, str] = {}
    for item in service.get("volumes", []):
        if isinstance(item, str):
            source, _, rest = item.partition(":")
            target = rest.partition(":")[0]
        else:
            source, target = item.get("source", ""), item.get("target", "")
        if source in declared:
            out[source] = target
    return out


def test_compose_has_the_experiment_and_the_sidecar(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"experiment", "tokensettle"}


def test_sidecar_runs_with_init_restart_and_the_image_user(compose: dict[str, Any]) -> None:
    sidecar = compose["services"]["tokensettle"]
    assert sidecar["init"] is True
    assert sidecar["restart"] == "unless-stopped"
    assert sidecar["user"] == UID_GID
    assert sidecar["build"] == "."


def test_runs_volume_is_shared_and_is_the_sidecars_root(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    assert "runs" in declared
    mounts = {
        name: _named_volumes(service, declared) for name, service in compose["services"].items()
    }
    assert "runs" in mounts["experiment"]
    assert "runs" in mounts["tokensettle"]
    roots = compose["services"]["tokensettle"]["environment"]["TOKENSETTLE_RUNS_DIRS"]
    assert mounts["tokensettle"]["runs"] in roots.split(",")
    assert mounts["tokensettle"].get("state") == STATE_DIR


def test_admin_key_is_a_secret_file_not_an_environment_variable(
    compose: dict[str, Any],
) -> None:
    sidecar = compose["services"]["tokensettle"]
    assert compose["secrets"]["admin_key"]["file"] == "./secrets/admin_key"
    # short syntax mounts at /run/secrets/<name>; long syntax must keep that target
    entries = sidecar["secrets"]
    targets = [
        e if isinstance(e, str) else e.get("target", e["source"])
        for e in entries
        if (e if isinstance(e, str) else e["source"]) == "admin_key"
    ]
    assert targets == ["admin_key"], entries
    env = sidecar.get("environment", {})
    for name in ("TOKENSETTLE_ADMIN_KEY", "OPENAI_ADMIN_KEY", "OPENAI_API_KEY_USAGE_TRACKING"):
        assert name not in env


def test_endpoints_are_published_on_loopback_only(compose: dict[str, Any]) -> None:
    assert compose["services"]["tokensettle"]["ports"] == ["127.0.0.1:9464:9464"]


# --------------------------------------------------------------------------------------
# With an engine: build and run


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _engine_available() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client installed"
    try:
        info = _docker("info", timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out"
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine (`docker info` failed: {reason})"
    return None


@pytest.mark.timeout(1200)
def test_the_image_builds_and_runs_with_arguments_as_the_subcommand() -> None:
    reason = _engine_available()
    if reason is not None:
        pytest.skip(f"{reason}; docs/docker.md says how to check the image by hand")
    tag = f"tokensettle-test:{secrets.token_hex(4)}"
    build = _docker("build", "-t", tag, str(REPO), timeout=1100)
    assert build.returncode == 0, build.stderr[-4000:]
    try:
        # arguments replace CMD only: `tokensettle --version`
        version = _docker("run", "--rm", "--init", "--network", "none", tag, "--version")
        assert version.returncode == 0, version.stderr
        assert version.stdout.strip() == f"tokensettle {__version__}"
        sub = _docker("run", "--rm", "--network", "none", tag, "reconcile", "--help")
        assert sub.returncode == 0, sub.stderr
        assert sub.stdout.startswith("usage: tokensettle reconcile"), sub.stdout
        whoami = _docker("run", "--rm", "--network", "none", "--entrypoint", "id", tag)
        assert whoami.stdout.startswith("uid=10001(tokensettle) gid=10001"), whoami.stdout
    finally:
        _docker("image", "rm", "-f", tag)
