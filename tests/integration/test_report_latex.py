"""`report --format latex` compiles with pdflatex, where pdflatex is installed."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from tokensettle.report import render
from tokensettle.summary import RunSummary

END = datetime(2025, 10, 19, 10, 41, 18, tzinfo=UTC)

DOCUMENT = r"""\documentclass{article}
\usepackage[T1]{fontenc}
\usepackage[margin=2cm]{geometry}
\usepackage{booktabs}
\begin{document}
\input{table}
\end{document}
"""


def _runs() -> list[RunSummary]:
    def one(fw: str, rid: str, tin: int, cost: str | None, **extra: object) -> RunSummary:
        return RunSummary(
            fw,
            rid,
            str(extra.pop("status", "verified")),
            tokens_in=tin,
            tokens_out=tin // 4,
            cached_tokens=tin // 5,
            api_calls=tin // 4_000,
            cost_usd=None if cost is None else Decimal(cost),
            run_end=END,
            verified_at=END + timedelta(minutes=40),
            endpoint="https://api.openai.com/v1/organization/usage/completions",
            price_source="genai-prices 0.2.3 (bundled)",
            priced_at=END - timedelta(hours=1),
            window=(END - timedelta(hours=1), END + timedelta(minutes=1)),
            **extra,  # type: ignore[arg-type]
        )

    return [
        one("baes", "b1", 47_486, "0.014181"),
        one("baes", "b2", 53_633, "0.016869"),
        one("chatdev", "c1", 40_183, "0.015578"),
        one("chatdev", "c2", 48_161, "0.015285", status="ambiguous", apportioned_tokens=9_000),
        one("gh_spec & co. 100%", "g1", 54_590, None, unpriced_models=("acme_1",)),
        one("gh_spec & co. 100%", "x\n\\input{/etc/passwd}", 53_217, "0.013716"),
        RunSummary("ghspec", "pending-1", "pending"),
    ]


def _pdflatex() -> str:
    path = shutil.which("pdflatex")
    if path is None:
        pytest.skip("pdflatex is not installed (apt-get install texlive-latex-recommended)")
    if subprocess.run(["kpsewhich", "booktabs.sty"], capture_output=True, check=False).returncode:
        pytest.skip("booktabs.sty is not installed (apt-get install texlive-latex-recommended)")
    return path


@pytest.mark.parametrize("include_ambiguous", [False, True])
def test_latex_table_compiles(tmp_path: Path, include_ambiguous: bool) -> None:
    binary = _pdflatex()
    table = render(_runs(), "latex", generated_at=END, include_ambiguous=include_ambiguous)
    (tmp_path / "table.tex").write_text(table, encoding="utf-8")
    (tmp_path / "paper.tex").write_text(DOCUMENT, encoding="utf-8")
    result = subprocess.run(
        [binary, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", "paper.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    log = (tmp_path / "paper.log").read_text(encoding="latin-1")
    assert result.returncode == 0, log[-3000:]
    assert (tmp_path / "paper.pdf").stat().st_size > 1_000
    assert "Overfull \\hbox" not in log  # fits a page with 2 cm margins
    assert "/etc/passwd" not in log  # the hostile run id stayed a comment
    assert "Missing character" not in log
