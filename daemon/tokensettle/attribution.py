"""Share minute buckets out among the owners active in them: one rule, used twice.

Owners are runs within a scope (rows come from the Usage API) and steps within a run (rows
are the run's own per-minute share). For each row (one minute, one key/project/model):

* the candidates are the owners whose scope matches the row and whose window holds the
  minute; owners that name the row's key explicitly take precedence over broader scopes,
  and those actively running in it over those there only by grace;
* one candidate: the row is that owner's **exactly**;
* several: each counter is split by active seconds (largest remainder, so integers stay
  exact) and counted as **apportioned**;
* none: the row belongs to no owner (`unowned`).

So per-owner values always sum to the total of the rows that have an owner.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tokensettle.usage import ALL_FIELDS, Scope, Usage, UsageRow
from tokensettle.windows import Activity

# Weights are compared as integer milliseconds so the split is exact and reproducible.
_WEIGHT_SCALE = 1000


@dataclass(frozen=True, slots=True)
class Owner:
    key: str
    activity: Activity
    scope: Scope = field(default_factory=Scope)


@dataclass
class Share:
    """What one owner received."""

    key: str = ""
    exact: Usage = field(default_factory=Usage)
    apportioned: Usage = field(default_factory=Usage)
    per_minute: dict[int, Usage] = field(default_factory=dict)
    models: dict[str, Usage] = field(default_factory=dict)
    #: minute -> keys of every owner the minute was split among (this one included). The
    #: tuple is the row's own, shared by reference by all its owners: storing "the others"
    #: per owner made a minute split k ways cost k^2 (16,000 steps in one minute: 152 s).
    split_among: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def usage(self) -> Usage:
        return self.exact + self.apportioned

    @property
    def apportioned_fraction(self) -> float:
        total = self.usage.total_tokens
        return self.apportioned.total_tokens / total if total else 0.0

    @property
    def shared_with(self) -> dict[int, tuple[str, ...]]:
        """minute -> keys of the other owners the minute was split with."""
        return {m: tuple(k for k in keys if k != self.key) for m, keys in self.split_among.items()}

    def co_owners(self) -> set[str]:
        """Every other owner this share was split with, in any minute."""
        out: set[str] = set()
        for keys in self.split_among.values():
            out.update(keys)
        out.discard(self.key)
        return out

    def _add(self, row: UsageRow, usage: Usage, among: tuple[str, ...] = ()) -> None:
        if among:
            self.apportioned = self.apportioned + usage
            known = self.split_among.get(row.minute)
            if known is None:
                self.split_among[row.minute] = among
            elif known is not among and known != among:
                self.split_among[row.minute] = tuple(sorted(set(known) | set(among)))
        else:
            self.exact = self.exact + usage
        self.per_minute[row.minute] = self.per_minute.get(row.minute, Usage()) + usage
        if row.model is not None:
            self.models[row.model] = self.models.get(row.model, Usage()) + usage


@dataclass
class Attribution:
    shares: dict[str, Share]
    unowned: Usage

    def share(self, key: str) -> Share:
        return self.shares.get(key) or Share(key)


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Split `total` in proportion to positive integer `weights`; the parts sum to `total`.

    Largest remainder method; ties go to the earlier weight, so the result is deterministic.
    """
    if not weights:
        raise ValueError("apportion needs at least one weight")
    if any(w <= 0 for w in weights):
        raise ValueError("weights must be positive")
    whole = sum(weights)
    parts = [total * w // whole for w in weights]
    remainders = [total * w % whole for w in weights]
    short = total - sum(parts)
    order = sorted(range(len(weights)), key=lambda i: (-remainders[i], i))
    for i in order[:short]:
        parts[i] += 1
    return parts


def split_usage(usage: Usage, weights: Sequence[int]) -> list[Usage]:
    """Apportion every counter of `usage`; absent optional counters stay absent, and a
    request count the data does not carry stays not carried in every part."""
    columns: dict[str, list[int] | None] = {}
    for name in ALL_FIELDS:
        value = getattr(usage, name)
        columns[name] = None if value is None else apportion(value, weights)
    return [
        Usage.from_fields(
            {n: (col[i] if col is not None else None) for n, col in columns.items()}
        ).replace(requests_counted=usage.requests_counted)
        for i in range(len(weights))
    ]


def _candidates(
    row: UsageRow, by_minute: Mapping[int, Sequence[tuple[Owner, float]]]
) -> list[tuple[Owner, int]]:
    present = [(o, w) for o, w in by_minute.get(row.minute, ()) if o.scope.matches(row)]
    # A key that some owners name explicitly is theirs alone: a broader scope (a project,
    # the organisation) does not share it. So a run with its own key (a lease) keeps its
    # usage exactly, whoever else was active in the same minutes.
    named = [(o, w) for o, w in present if row.api_key_id in o.scope.api_key_ids]
    if named:
        present = named
    active = [(o, w) for o, w in present if w > 0]
    if active:
        return [(o, max(1, round(w * _WEIGHT_SCALE))) for o, w in active]
    # Only grace minutes claim this row: share it evenly among them.
    return [(o, 1) for o, _ in present]


def attribute(rows: Iterable[UsageRow], owners: Sequence[Owner]) -> Attribution:
    rows = list(rows)
    # Only the minutes that have rows matter: an owner's window is searched in them, so a
    # window of years (a step dated 2001) costs what its rows cost, not 13 million minutes.
    minutes = sorted({row.minute for row in rows})
    by_minute: dict[int, list[tuple[Owner, float]]] = defaultdict(list)
    for owner in sorted(owners, key=lambda o: o.key):
        window = owner.activity.window
        lo, hi = bisect_left(minutes, window.start), bisect_left(minutes, window.end)
        for minute in minutes[lo:hi]:
            by_minute[minute].append((owner, owner.activity.weight(minute)))
    shares: dict[str, Share] = {o.key: Share(o.key) for o in owners}
    unowned = Usage()
    for row in rows:
        candidates = _candidates(row, by_minute)
        if not candidates:
            unowned = unowned + row.usage
            continue
        if len(candidates) == 1:
            shares[candidates[0][0].key]._add(row, row.usage)
            continue
        among = tuple(o.key for o, _ in candidates)
        parts = split_usage(row.usage, [w for _, w in candidates])
        for (owner, _), part in zip(candidates, parts, strict=True):
            shares[owner.key]._add(row, part, among)
    return Attribution(shares=shares, unowned=unowned)


def rows_of(per_minute: Mapping[int, Usage]) -> list[UsageRow]:
    """A share's per-minute values as rows, to attribute them further (run -> steps)."""
    return [UsageRow(minute=m, usage=u) for m, u in sorted(per_minute.items())]
