"""The systemd unit: `systemd-analyze verify` prints nothing, and the security exposure
stays at or below the score recorded in systemd/README.md.

`verify` only *warns* (exit 0) about an unknown key or a misspelt `Type=`, so the check
fails on any output at all; negative controls show it can fail. `verify` needs the
`ExecStart=` binary to exist, so it runs on a copy whose only change is `ExecStart=`
pointing at this venv's console script.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

UNIT = REPO / "systemd" / "tokensettle.service"
README = REPO / "systemd" / "README.md"
INSTALLED_EXEC = "ExecStart=/usr/local/bin/tokensettle run\n"
EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


@pytest.fixture(scope="module")
def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed here (the unit is checked where it is)")
    return found


@pytest.fixture(scope="module")
def console_script() -> str:
    found = shutil.which("tokensettle", path=str(Path(sys.executable).parent))
    assert found is not None, f"no tokensettle console script beside {sys.executable}"
    return found


def _env() -> dict[str, str]:
    return {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}


def _analyze(analyze: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze, *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=_env(),
        timeout=120,
        check=False,
    )


def for_verify(unit_text: str, executable: str) -> str:
    """The unit with ExecStart= pointing at `executable`; every other byte unchanged."""
    assert unit_text.count(INSTALLED_EXEC) == 1, "the unit's ExecStart= line changed"
    return unit_text.replace(INSTALLED_EXEC, f"ExecStart={executable} run\n")


def verify_problems(analyze: str, unit: Path) -> list[str]:
    """Everything `systemd-analyze verify` said about the unit (empty = clean)."""
    done = _analyze(analyze, "verify", str(unit))
    said = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if done.returncode != 0:
        said.append(f"exit status {done.returncode}")
    return said


def exposure(analyze: str, unit: Path) -> float:
    done = _analyze(analyze, "security", "--offline=true", "--no-pager", str(unit))
    assert done.returncode == 0, done.stderr
    match = EXPOSURE.search(done.stdout)
    assert match, f"no 'Overall exposure level' line in:\n{done.stdout}\n{done.stderr}"
    return float(match.group(1))


def recorded_exposure() -> float:
    match = EXPOSURE.search(README.read_text(encoding="utf-8"))
    assert match, f"{README} records no 'Overall exposure level for ...: N' line"
    return float(match.group(1))


def _copy(tmp_path: Path, text: str) -> Path:
    # The same file name: the unit's name and type come from it.
    path = tmp_path / UNIT.name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------


def test_the_copy_differs_from_the_unit_only_in_exec_start(console_script: str) -> None:
    original = UNIT.read_text(encoding="utf-8").splitlines(keepends=True)
    copy = for_verify(UNIT.read_text(encoding="utf-8"), console_script).splitlines(keepends=True)
    assert len(copy) == len(original)
    changed = [(a, b) for a, b in zip(original, copy, strict=True) if a != b]
    assert changed == [(INSTALLED_EXEC, f"ExecStart={console_script} run\n")]


def test_systemd_analyze_verify_says_nothing(
    analyze: str, console_script: str, tmp_path: Path
) -> None:
    unit = _copy(tmp_path, for_verify(UNIT.read_text(encoding="utf-8"), console_script))
    assert verify_problems(analyze, unit) == []


def test_negative_control_an_unknown_key_fails_the_check(
    analyze: str, console_script: str, tmp_path: Path
) -> None:
    text = for_verify(UNIT.read_text(encoding="utf-8"), console_script)
    bogus = text.replace("[Service]\n", "[Service]\nBogus=1\n", 1)
    assert bogus != text
    problems = verify_problems(analyze, _copy(tmp_path, bogus))
    assert problems, "verify accepted Bogus=1 silently: the check cannot fail"
    assert any("Bogus" in line for line in problems), problems


def test_negative_control_a_missing_executable_fails_the_check(
    analyze: str, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-tokensettle"
    unit = _copy(tmp_path, for_verify(UNIT.read_text(encoding="utf-8"), str(missing)))
    problems = verify_problems(analyze, unit)
    assert any("not executable" in line for line in problems), problems


def test_verify_does_not_resolve_users_so_the_check_is_host_independent(
    analyze: str, console_script: str, tmp_path: Path
) -> None:
    """The unit names `User=tokensettle`, which need not exist where tests run. verify
    checks the name's syntax, not the user database: a user that exists nowhere verifies
    cleanly. If a systemd version starts resolving users, this test says so."""
    text = for_verify(UNIT.read_text(encoding="utf-8"), console_script)
    nobody = text.replace("User=tokensettle\n", "User=tokensettle-no-such-user-4f1c\n", 1)
    assert nobody != text
    assert verify_problems(analyze, _copy(tmp_path, nobody)) == []


def test_security_exposure_is_at_most_the_recorded_score(analyze: str) -> None:
    recorded = recorded_exposure()
    measured = exposure(analyze, UNIT)
    assert measured <= recorded, (
        f"exposure {measured} is above the {recorded} recorded in {README.name}: "
        "restore the hardening, or re-measure and record why"
    )


def test_negative_control_without_hardening_the_score_check_fails(
    analyze: str, tmp_path: Path
) -> None:
    text = UNIT.read_text(encoding="utf-8")
    start = text.index("# Hardening")
    end = text.index("[Install]")
    weak = _copy(tmp_path, text[:start] + text[end:])
    assert exposure(analyze, weak) > recorded_exposure()
