"""Shared test helpers: where ../shared lives, and a skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

# Hypothesis' per-example deadline is a timing assertion: on a loaded 2-core machine one
# slow example fails a correct test. Timing belongs in bench/, so no deadline here.
settings.register_profile("tokensettle", deadline=None)
settings.load_profile("tokensettle")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "genai-devbench"
OPENAPI = SHARED / "reference" / "openai-usage-api.yaml"


def need_shared(path: Path) -> Path:
    """Return `path`, or skip the test with a reason when ../shared is not beside the clone."""
    if not path.exists():
        pytest.skip(f"{path} is absent: ../shared is only beside the project's own checkout and CI")
    return path


@pytest.fixture
def fixtures_dir() -> Path:
    return need_shared(FIXTURES)


@pytest.fixture
def openapi_spec_path() -> Path:
    return need_shared(OPENAPI)
