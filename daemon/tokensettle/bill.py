"""The bill check: what OpenAI bills beside what tokensettle prices, per UTC day and project.

Pure: cost lines (`GET /organization/costs`, daily buckets, grouped by project and line
item) and daily usage rows (`GET /organization/usage/completions`, `bucket_width=1d`,
grouped by project, model, service tier and batch) in, a `BillCheck` out; renderers for a
table, JSON and a section of `tokensettle report`. The fetching is `billing_api`.

* **Our side** is the day's completions usage priced with `pricing.price` (the pricer of
  every run's cost) at the day's UTC midnight, each (model, service tier, batch) row in its
  price context: batch and flex/priority prices where genai-prices has them. Usage it
  cannot price is `unpriced`, never zero, and makes the day `incomplete`.
* **Matching.** A line item is taken to bill completions usage when its *model part* (the
  text before its first comma: "gpt-4o-mini-2024-07-18, cached input") names a model of that
  day's and project's completions usage, exactly or as the alias of its dated snapshot
  (`breakdown.same_model`). Every other line item (embeddings, images, web search, a model
  the usage does not show, a currency other than USD) is shown apart as *not covered*, and
  never added to either side.
* **Per model.** Billed and priced amounts are compared per model (the line items naming
  it against its priced usage) and per day and project in total: two price errors of
  opposite sign cannot hide in a total. A snapshot named by two line-item spellings forms
  one group with them.
* **Verdict.** `ok` when |priced - billed| <= max(tolerance * billed, one cent);
  `mismatch` otherwise (priced usage that nothing bills is one); `incomplete` when part of
  the usage is unpriced (a priced model's mismatch still wins); `not_compared` for a day
  and project with no completions usage and no line item naming one. The cent: the bill
  is in cents, and below that a provider's rounding is no price error.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Literal

from tokensettle.breakdown import NO_MODEL, same_model
from tokensettle.figures import esc
from tokensettle.paper import _md_table, md
from tokensettle.pricing import (
    PRICE_SOURCE,
    PRICE_SOURCE_VERSION,
    Priced,
    Unpriced,
    decimal_text,
    price,
    price_context,
)
from tokensettle.render import table
from tokensettle.report_html import html_table
from tokensettle.usage import Usage

__all__ = [
    "COSTS_GROUP_BY",
    "DAY",
    "MIN_DIFFERENCE_USD",
    "USAGE_GROUP_BY",
    "BillCheck",
    "BillUnavailable",
    "CostLine",
    "DailyUsage",
    "DayCheck",
    "ModelCheck",
    "PricedUsage",
    "Verdict",
    "compare",
    "line_item_model",
    "render_json",
    "render_table",
    "report_section",
    "section_json",
]

DAY: Final = 86_400
#: What the costs and usage queries group by (the two sides of the comparison).
COSTS_GROUP_BY: Final = ("project_id", "line_item")
USAGE_GROUP_BY: Final = ("project_id", "model", "service_tier", "batch")
#: A difference this small is never a mismatch: the bill is in cents.
MIN_DIFFERENCE_USD: Final = Decimal("0.01")
USD: Final = "usd"

Verdict = Literal["ok", "mismatch", "incomplete", "not_compared"]
VERDICTS: Final[tuple[Verdict, ...]] = ("ok", "mismatch", "incomplete", "not_compared")


# ------------------------------------------------------------------ inputs


@dataclass(frozen=True, slots=True)
class CostLine:
    """One result of a costs bucket: what one line item of one project cost that day."""

    day: int  # the bucket's start, Unix seconds (a UTC midnight)
    project_id: str | None
    line_item: str | None
    amount: Decimal
    currency: str = USD
    quantity: Decimal | None = None
    quantity_unit: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "line_item": self.line_item,
            "amount": float(self.amount),
            "amount_exact": decimal_text(self.amount),
            "currency": self.currency,
            "quantity": None if self.quantity is None else float(self.quantity),
            "quantity_unit": self.quantity_unit,
        }


@dataclass(frozen=True, slots=True)
class DailyUsage:
    """One result of a daily completions usage bucket."""

    day: int
    project_id: str | None
    model: str | None
    service_tier: str | None
    batch: bool | None
    usage: Usage


def line_item_model(line_item: str | None) -> str | None:
    """The model a line item names: the text before its first comma, or None."""
    if line_item is None:
        return None
    head = line_item.split(",", 1)[0].strip()
    return head or None


# ------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class PricedUsage:
    """A usage row of our side and its price (in its service tier / batch context)."""

    row: DailyUsage
    result: Priced | Unpriced

    @property
    def usd(self) -> Decimal | None:
        return self.result.total_usd if isinstance(self.result, Priced) else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.row.model,
            "service_tier": self.row.service_tier,
            "batch": self.row.batch,
            "usage": self.row.usage.present(),
        }
        if isinstance(self.result, Priced):
            out["priced_usd"] = float(self.result.total_usd)
            out["priced_as"] = self.result.priced_as
        else:
            out["priced_usd"] = None
            out["unpriced"] = self.result.to_json()
        return out


class _Compared:
    """Billed beside priced: the difference, its percent of the bill, whether it is within
    tolerance. Subclasses give the amounts."""

    tolerance: Decimal

    @property
    def billed_usd(self) -> Decimal:
        raise NotImplementedError

    @property
    def priced_usd(self) -> Decimal:
        raise NotImplementedError

    @property
    def complete(self) -> bool:
        raise NotImplementedError

    @property
    def diff_usd(self) -> Decimal | None:
        """Priced minus billed; None when part of the usage is unpriced."""
        return self.priced_usd - self.billed_usd if self.complete else None

    @property
    def diff_pct(self) -> Decimal | None:
        diff = self.diff_usd
        return None if diff is None or self.billed_usd == 0 else diff / self.billed_usd * 100

    @property
    def within(self) -> bool | None:
        """Whether the difference is within tolerance (None: unknown, incomplete)."""
        diff = self.diff_usd
        if diff is None:
            return None
        return abs(diff) <= max(self.tolerance * abs(self.billed_usd), MIN_DIFFERENCE_USD)


@dataclass(frozen=True)
class ModelCheck(_Compared):
    """One model (or the snapshots two line-item spellings share): its line items beside
    its priced usage."""

    models: tuple[str, ...]
    billed: tuple[CostLine, ...]
    priced: tuple[PricedUsage, ...]
    tolerance: Decimal

    @property
    def label(self) -> str:
        return ", ".join(self.models)

    @property
    def billed_usd(self) -> Decimal:
        return sum((line.amount for line in self.billed), Decimal(0))

    @property
    def priced_usd(self) -> Decimal:
        """What the priced rows cost (all of the usage only when `complete`)."""
        return sum((p.usd for p in self.priced if p.usd is not None), Decimal(0))

    @property
    def unpriced(self) -> tuple[PricedUsage, ...]:
        return tuple(p for p in self.priced if p.usd is None)

    @property
    def complete(self) -> bool:
        return not self.unpriced

    @property
    def verdict(self) -> Verdict:
        within = self.within
        if within is None:
            return "incomplete"
        return "ok" if within else "mismatch"

    def to_json(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            **_amounts_json(self),
            "line_items": [line.to_json() for line in self.billed],
            "usage": [p.to_json() for p in self.priced],
        }


@dataclass(frozen=True)
class DayCheck(_Compared):
    """One UTC day of one project."""

    day: date
    project_id: str | None
    models: tuple[ModelCheck, ...]
    uncovered: tuple[CostLine, ...]
    tolerance: Decimal

    @property
    def billed_usd(self) -> Decimal:
        return sum((m.billed_usd for m in self.models), Decimal(0))

    @property
    def priced_usd(self) -> Decimal:
        return sum((m.priced_usd for m in self.models), Decimal(0))

    @property
    def uncovered_usd(self) -> Decimal:
        return sum((line.amount for line in self.uncovered if line.currency == USD), Decimal(0))

    @property
    def complete(self) -> bool:
        return all(m.complete for m in self.models)

    @property
    def unpriced(self) -> tuple[PricedUsage, ...]:
        return tuple(p for m in self.models for p in m.unpriced)

    @property
    def verdict(self) -> Verdict:
        if not self.models:
            return "not_compared"
        within = self.within
        if within is False or any(m.verdict == "mismatch" for m in self.models):
            return "mismatch"
        return "incomplete" if within is None else "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            "project_id": self.project_id,
            **_amounts_json(self),
            "uncovered_usd": float(self.uncovered_usd),
            "models": [m.to_json() for m in self.models],
            "uncovered": [line.to_json() for line in self.uncovered],
        }


def _amounts_json(check: ModelCheck | DayCheck) -> dict[str, Any]:
    diff, pct = check.diff_usd, check.diff_pct
    return {
        "billed_usd": float(check.billed_usd),
        "priced_usd": float(check.priced_usd),
        "complete": check.complete,
        "diff_usd": None if diff is None else float(diff),
        "diff_pct": None if pct is None else float(pct),
        "verdict": check.verdict,
        "unpriced": sorted({p.row.model or NO_MODEL for p in check.unpriced}),
    }


@dataclass(frozen=True)
class BillCheck:
    """The check of the UTC days `[start, end)`."""

    start: date
    end: date  # exclusive
    tolerance: float
    days: tuple[DayCheck, ...]
    projects: tuple[str, ...] = ()
    generated_at: datetime | None = None

    @property
    def counts(self) -> Counter[str]:
        return Counter(d.verdict for d in self.days)

    @property
    def verdict(self) -> Verdict:
        """`mismatch` if a day is, else `incomplete` if a day is, else `ok`."""
        counts = self.counts
        for verdict in ("mismatch", "incomplete"):
            if counts[verdict]:
                return verdict
        return "ok"

    @property
    def passed(self) -> bool:
        return self.verdict == "ok"

    @property
    def billed_usd(self) -> Decimal:
        return sum((d.billed_usd for d in self.days), Decimal(0))

    @property
    def priced_usd(self) -> Decimal:
        return sum((d.priced_usd for d in self.days), Decimal(0))

    @property
    def uncovered_usd(self) -> Decimal:
        return sum((d.uncovered_usd for d in self.days), Decimal(0))

    def to_json(self) -> dict[str, Any]:
        counts = self.counts
        return {
            "check": "bill",
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "days": (self.end - self.start).days,
            "tolerance": self.tolerance,
            "min_difference_usd": float(MIN_DIFFERENCE_USD),
            "projects": list(self.projects),
            "generated_at": None if self.generated_at is None else self.generated_at.isoformat(),
            "price_source": {"name": PRICE_SOURCE, "version": PRICE_SOURCE_VERSION},
            "verdict": self.verdict,
            "counts": {v: counts[v] for v in VERDICTS},
            "billed_usd": float(self.billed_usd),
            "priced_usd": float(self.priced_usd),
            "uncovered_usd": float(self.uncovered_usd),
            "checks": [d.to_json() for d in self.days],
        }


@dataclass(frozen=True, slots=True)
class BillUnavailable:
    """The bill could not be checked (no admin key, the API refused or failed): why."""

    reason: str


# ------------------------------------------------------------------ the comparison


def _day_of(t: int) -> int:
    return t - t % DAY


def _price_row(row: DailyUsage) -> PricedUsage:
    at = datetime.fromtimestamp(_day_of(row.day), UTC)
    if row.model is None:
        reason = "usage without a model (not grouped by model), so no price applies"
        return PricedUsage(row, Unpriced(NO_MODEL, reason, "no_model"))
    context = price_context(row.service_tier, row.batch)
    return PricedUsage(row, price(row.model, row.usage, at, context=context))


def _groups(
    rows: Sequence[PricedUsage], lines: Sequence[CostLine], tolerance: Decimal
) -> tuple[list[ModelCheck], list[CostLine]]:
    """Line items matched to the usage models they name, grouped; the rest uncovered."""
    models = sorted({p.row.model for p in rows if p.row.model is not None})
    # each group: the usage models it holds and the line items naming one of them
    groups: list[tuple[set[str], list[CostLine]]] = [({m}, []) for m in models]
    uncovered: list[CostLine] = []
    for line in lines:
        named = line_item_model(line.line_item)
        members = {m for m in models if named is not None and same_model(named, m)}
        if line.currency != USD or not members:
            uncovered.append(line)
            continue
        touched = [g for g in groups if g[0] & members]
        merged: tuple[set[str], list[CostLine]] = (set(members), [line])
        for group in touched:
            merged[0].update(group[0])
            merged[1].extend(group[1])
            groups.remove(group)
        groups.append(merged)
    checks = [
        ModelCheck(
            models=tuple(sorted(names)),
            billed=tuple(sorted(billed, key=lambda c: c.line_item or "")),
            priced=tuple(p for p in rows if p.row.model in names),
            tolerance=tolerance,
        )
        for names, billed in groups
    ]
    no_model = tuple(p for p in rows if p.row.model is None)
    if no_model:
        checks.append(ModelCheck((NO_MODEL,), (), no_model, tolerance))
    checks.sort(key=lambda c: c.models)
    return checks, uncovered


def compare(
    costs: Iterable[CostLine],
    usage: Iterable[DailyUsage],
    *,
    start: date,
    end: date,
    tolerance: float,
    projects: Sequence[str] = (),
    generated_at: datetime | None = None,
) -> BillCheck:
    """The bill check of the UTC days `[start, end)` from the costs and the usage rows of
    those days (rows of other days are ignored; usage rows that count nothing cost
    nothing and are dropped)."""
    lo = int(datetime(start.year, start.month, start.day, tzinfo=UTC).timestamp())
    hi = int(datetime(end.year, end.month, end.day, tzinfo=UTC).timestamp())
    tol = Decimal(str(tolerance))
    billed: dict[tuple[int, str | None], list[CostLine]] = defaultdict(list)
    used: dict[tuple[int, str | None], list[PricedUsage]] = defaultdict(list)
    for line in costs:
        if lo <= _day_of(line.day) < hi:
            billed[_day_of(line.day), line.project_id].append(line)
    for row in usage:
        if lo <= _day_of(row.day) < hi and not row.usage.is_empty:
            used[_day_of(row.day), row.project_id].append(_price_row(row))
    days: list[DayCheck] = []
    for key in sorted(set(billed) | set(used), key=lambda k: (k[0], k[1] or "")):
        checks, uncovered = _groups(used.get(key, []), billed.get(key, []), tol)
        days.append(
            DayCheck(
                day=datetime.fromtimestamp(key[0], UTC).date(),
                project_id=key[1],
                models=tuple(checks),
                uncovered=tuple(sorted(uncovered, key=lambda c: c.line_item or "")),
                tolerance=tol,
            )
        )
    return BillCheck(
        start=start,
        end=end,
        tolerance=tolerance,
        days=tuple(days),
        projects=tuple(projects),
        generated_at=generated_at,
    )


# ------------------------------------------------------------------ rendering

HEADERS: Final = ("DAY", "PROJECT", "MODEL", "BILLED", "PRICED", "DIFF", "DIFF %", "VERDICT")
NUMERIC: Final = frozenset({3, 4, 5, 6})
UNCOVERED_HEADERS: Final = ("DAY", "PROJECT", "LINE ITEM", "AMOUNT", "QUANTITY")
UNCOVERED_NUMERIC: Final = frozenset({3, 4})
ALL_MODELS: Final = "(all models)"


def usd(value: Decimal) -> str:
    return f"${value:,.6f}" if value >= 0 else f"-${-value:,.6f}"


def _signed_usd(value: Decimal | None) -> str:
    if value is None:
        return "-"
    return ("+" if value >= 0 else "-") + usd(abs(value))


def _pct(value: Decimal | None) -> str:
    return "-" if value is None else f"{value:+.2f}%"


def _priced_cell(check: ModelCheck | DayCheck) -> str:
    if check.complete:
        return usd(check.priced_usd)
    missing = ", ".join(sorted({p.row.model or NO_MODEL for p in check.unpriced}))
    if check.priced_usd == 0:
        return f"unpriced ({missing})"
    return f"partial {usd(check.priced_usd)}; unpriced ({missing})"


def _line(day: DayCheck, model: str, check: ModelCheck | DayCheck) -> list[str]:
    return [
        day.day.isoformat(),
        day.project_id or "-",
        model,
        usd(check.billed_usd),
        _priced_cell(check),
        _signed_usd(check.diff_usd),
        _pct(check.diff_pct),
        check.verdict,
    ]


def rows(check: BillCheck) -> list[list[str]]:
    """The comparison table: a row per model of each day and project, and a total row
    where a day and project has more than one."""
    out: list[list[str]] = []
    for day in check.days:
        out += [_line(day, m.label, m) for m in day.models]
        if len(day.models) > 1:
            out.append(_line(day, ALL_MODELS, day))
    return out


def uncovered_rows(check: BillCheck) -> list[list[str]]:
    out: list[list[str]] = []
    for day in check.days:
        for line in day.uncovered:
            amount = usd(line.amount) if line.currency == USD else f"{line.amount} {line.currency}"
            quantity = "-" if line.quantity is None else format(line.quantity.normalize(), ",f")
            unit = f" {line.quantity_unit}" if line.quantity_unit and line.quantity else ""
            out.append(
                [
                    day.day.isoformat(),
                    day.project_id or "-",
                    line.line_item or "(no line item)",
                    amount,
                    quantity + unit,
                ]
            )
    return out


def heading(check: BillCheck) -> str:
    days = (check.end - check.start).days
    last = check.end - timedelta(days=1)
    scope = f"projects {', '.join(check.projects)}" if check.projects else "all projects"
    return (
        f"Bill check, {check.start.isoformat()} to {last.isoformat()} ({days} UTC "
        f"day{'s' if days != 1 else ''}, {scope}): the costs OpenAI bills beside the "
        f"completions usage priced with {PRICE_SOURCE} {PRICE_SOURCE_VERSION}; tolerance "
        f"{check.tolerance:.2%} of the bill (BILL_TOLERANCE), a difference under a cent "
        "always passes"
    )


def notes(check: BillCheck) -> list[str]:
    """The lines under the tables: unpriced usage, and the verdict."""
    lines: list[str] = []
    unpriced = [(day, p) for day in check.days for p in day.unpriced]
    if unpriced:
        lines.append("Unpriced usage (the day's verdict is incomplete, never a pass):")
        for day, p in unpriced:
            reason = p.result.reason if isinstance(p.result, Unpriced) else ""
            tier = f" {p.row.service_tier}" if p.row.service_tier else ""
            batch = " batch" if p.row.batch else ""
            lines.append(
                f"  {day.day.isoformat()} {day.project_id or '-'} "
                f"{p.row.model or NO_MODEL}{tier}{batch}: {reason}"
            )
    counts = check.counts
    compared = sum(counts[v] for v in ("ok", "mismatch", "incomplete"))
    parts = [f"{counts[v]} {v}" for v in ("ok", "mismatch", "incomplete") if counts[v]]
    if counts["not_compared"]:
        parts.append(f"{counts['not_compared']} with no completions usage")
    summary = (
        f"Verdict: {check.verdict} ({compared} day-project pairs compared: "
        f"{', '.join(parts) or 'nothing billed or used'}); billed for completions "
        f"{usd(check.billed_usd)}, priced {usd(check.priced_usd)}; "
        f"not covered {usd(check.uncovered_usd)}"
    )
    return [*lines, summary]


def render_table(check: BillCheck) -> str:
    """The text of `tokensettle bill`."""
    parts = [heading(check), ""]
    body = rows(check)
    parts.append(table(HEADERS, body) if body else "No completions usage or cost in these days.")
    apart = uncovered_rows(check)
    if apart:
        parts += [
            "",
            "Not covered by completions usage (shown apart, not compared):",
            table(UNCOVERED_HEADERS, apart),
        ]
    parts += ["", *notes(check)]
    return "\n".join(parts) + "\n"


def render_json(check: BillCheck) -> str:
    return json.dumps(check.to_json(), indent=2) + "\n"


# ------------------------------------------------------------------ a section of the report


def section_json(check: BillCheck | BillUnavailable) -> dict[str, Any]:
    """What the report's JSON carries under `"bill"`."""
    if isinstance(check, BillUnavailable):
        return {"check": "bill", "verdict": None, "unavailable": check.reason}
    return check.to_json()


def report_section(
    check: BillCheck | BillUnavailable, fmt: Literal["table", "markdown", "html", "json"]
) -> str:
    """The bill check as a section of `tokensettle report` in its format."""
    if fmt == "json":
        return json.dumps(section_json(check), indent=2)
    if isinstance(check, BillUnavailable):
        text = f"Bill check: not available ({check.reason})"
        if fmt == "html":
            return f'<h2>Bill check</h2><p class="note">{esc(text)}</p>'
        return ("### " if fmt == "markdown" else "") + text + "\n"
    if fmt == "table":
        return render_table(check)
    if fmt == "markdown":
        return _markdown(check)
    if fmt == "html":
        return _html(check)
    raise ValueError(f"no bill section for format {fmt!r}")


def _markdown(check: BillCheck) -> str:
    def cells(table_rows: list[list[str]]) -> list[list[str]]:
        return [[md(c) for c in row] for row in table_rows]

    parts = ["### Bill check", "", md(heading(check)), ""]
    body = rows(check)
    if body:
        parts.append(_md_table(list(HEADERS), cells(body), set(NUMERIC)))
    apart = uncovered_rows(check)
    if apart:
        parts += [
            "",
            "Not covered by completions usage (shown apart, not compared):",
            "",
            _md_table(list(UNCOVERED_HEADERS), cells(apart), set(UNCOVERED_NUMERIC)),
        ]
    parts += ["", *(f"{md(line)}  " for line in notes(check))]
    return "\n".join(parts) + "\n"


def _html(check: BillCheck) -> str:
    def verdict_class(i: int, cell: str) -> str:
        return f"verdict-{cell}" if i == len(HEADERS) - 1 else ""

    parts = ["<h2>Bill check</h2>", f'<p class="note">{esc(heading(check))}</p>']
    body = rows(check)
    if body:
        parts.append(html_table(HEADERS, body, NUMERIC, verdict_class))
    apart = uncovered_rows(check)
    if apart:
        parts += [
            '<p class="note">Not covered by completions usage (shown apart, not compared):</p>',
            html_table(UNCOVERED_HEADERS, apart, UNCOVERED_NUMERIC),
        ]
    parts += [f'<p class="note">{esc(line)}</p>' for line in notes(check)]
    return "\n".join(parts) + "\n"
