"""Descriptive statistics of one metric over runs: n, mean, median, sd, 95% CI, min, max.

Pure and exact: values are turned into Fractions (exactly, whatever their type), the standard
library's `statistics` computes means, medians and variances of Fractions without round-off,
and the result is rounded to float once, so the figures match a hand computation; the sd is
the correctly rounded square root of the exact variance, the interval float arithmetic.

The 95% interval is the Student-t interval of the mean, mean +- t(0.975, n-1) * sd / sqrt(n),
for n >= 2 (none for n < 2). The t quantile comes from a table for 1..30 degrees of freedom
(computed from the exact t distribution function, Abramowitz & Stegun 26.7.3-4) and, beyond,
from the Cornish-Fisher expansion around the normal quantile (A&S 26.7.5, four terms), whose
error there is below 3e-8; tests check both against the exact distribution function.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

Number = int | float | Decimal | Fraction

#: t(0.975, df) for df = 1..30, to 6 decimals
T975: tuple[float, ...] = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
    2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
    2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
    2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)  # fmt: skip

_Z975 = statistics.NormalDist().inv_cdf(0.975)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, not {df}")
    if df <= len(T975):
        return T975[df - 1]
    x = _Z975
    g1 = (x**3 + x) / 4
    g2 = (5 * x**5 + 16 * x**3 + 3 * x) / 96
    g3 = (3 * x**7 + 19 * x**5 + 17 * x**3 - 15 * x) / 384
    g4 = (79 * x**9 + 776 * x**7 + 1482 * x**5 - 1920 * x**3 - 945 * x) / 92160
    return x + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


@dataclass(frozen=True, slots=True)
class Stat:
    """One metric over n runs. `sd` and `ci95` are None for n < 2; everything is None at 0."""

    n: int
    mean: float | None = None
    median: float | None = None
    sd: float | None = None
    ci95: tuple[float, float] | None = None
    min: float | None = None
    max: float | None = None

    def to_json(self, digits: int = 10) -> dict[str, Any]:
        def r(value: float | None) -> float | None:
            return None if value is None else _round(value, digits)

        return {
            "n": self.n,
            "mean": r(self.mean),
            "median": r(self.median),
            "sd": r(self.sd),
            "ci95": None if self.ci95 is None else [r(self.ci95[0]), r(self.ci95[1])],
            "min": r(self.min),
            "max": r(self.max),
        }


def _round(value: float, digits: int) -> float:
    """`digits` significant digits: JSON without float noise (0.30000000000000004)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def describe(values: Sequence[Number]) -> Stat:
    """Statistics of `values` (exact types stay exact until the final float)."""
    n = len(values)
    if n == 0:
        return Stat(0)
    exact = [Fraction(v) for v in values]  # ints, Decimals and floats convert exactly
    mean = statistics.mean(exact)
    median = statistics.median(exact)
    low, high = min(exact), max(exact)
    if n < 2:
        return Stat(1, float(mean), float(median), None, None, float(low), float(high))
    sd = float(statistics.stdev(exact))  # a correctly rounded sqrt of the exact variance
    half = t975(n - 1) * sd / math.sqrt(n)
    m = float(mean)
    ci = (m, m) if sd == 0 else (m - half, m + half)
    return Stat(n, m, float(median), sd, ci, float(low), float(high))
