"""Paired statistics for comparing two runs: pure functions over (base passed, candidate passed) pairs.

Each pair is one test case at one repeat index, played by both runs and scored in both. The pass-rate
difference is candidate minus base over those pairs.

- `mcnemar_p`: the exact two-sided McNemar test, a binomial test on the discordant pairs only
  (b = passed in base and failed in candidate, c = the reverse): under "no change" each discordant pair
  is a fair coin, so p = min(1, 2 * P(X <= min(b, c))) with X ~ Binomial(b + c, 1/2), in integers with
  `math.comb`.
- `MIN_PAIRS`: below this many pairs no p-value and no interval are given ("not enough pairs"). With
  fewer than 6 pairs even a clean sweep (every pair flipped the same way) has p >= 2 / 2**5 = 0.0625, so
  no outcome could be significant at 0.05; a number would suggest a test that cannot reject.
- `bootstrap_interval`: a percentile bootstrap 95% interval of the difference, resampling pairs with
  replacement, from a seeded `random.Random`, so the same pairs always give the same interval.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal, Sequence

MIN_PAIRS = 6
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 2000
DEFAULT_SEED = 20240917
NOT_ENOUGH_PAIRS = "not enough pairs"

Pair = tuple[bool, bool]  # (passed in base, passed in candidate)
Verdict = Literal["better", "worse", "no significant change", "not enough pairs"]


@dataclass(frozen=True)
class PairedResult:
    """One scorer's paired comparison; `p_value` and `interval` are None below MIN_PAIRS."""

    pairs: int
    base_pass_rate: float | None
    candidate_pass_rate: float | None
    delta: float | None
    base_only: int  # b: passed in base, failed in candidate
    candidate_only: int  # c: failed in base, passed in candidate
    p_value: float | None
    interval: tuple[float, float] | None
    verdict: Verdict


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts; 1.0 when there are none."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def bootstrap_interval(pairs: Sequence[Pair], *, seed: int = DEFAULT_SEED, resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(candidate) - mean(base) over `pairs` (at least one pair).

    Each pair contributes -1, 0 or +1 to the difference; a resample draws len(pairs) of them with
    replacement. The same pairs, seed and resample count always give the same interval.
    """
    if not pairs:
        raise ValueError("bootstrap_interval needs at least one pair")
    diffs = [int(c) - int(b) for b, c in pairs]
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    low = means[int(math.floor(tail * (resamples - 1)))]
    high = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    return round(low, 4), round(high, 4)


def compare_pairs(pairs: Sequence[Pair], *, seed: int = DEFAULT_SEED, min_pairs: int = MIN_PAIRS) -> PairedResult:
    """Pass rates, their difference, the McNemar p-value and the bootstrap interval for one scorer's pairs."""
    n = len(pairs)
    b = sum(1 for base, cand in pairs if base and not cand)
    c = sum(1 for base, cand in pairs if cand and not base)
    if n == 0:
        return PairedResult(0, None, None, None, 0, 0, None, None, NOT_ENOUGH_PAIRS)
    base_rate = sum(1 for base, _ in pairs if base) / n
    cand_rate = sum(1 for _, cand in pairs if cand) / n
    delta = round(cand_rate - base_rate, 4)
    rates = dict(pairs=n, base_pass_rate=round(base_rate, 4), candidate_pass_rate=round(cand_rate, 4), delta=delta,
                 base_only=b, candidate_only=c)
    if n < min_pairs:
        return PairedResult(**rates, p_value=None, interval=None, verdict=NOT_ENOUGH_PAIRS)
    p = mcnemar_p(b, c)
    verdict: Verdict = "no significant change"
    if p < ALPHA:
        verdict = "better" if c > b else "worse"
    return PairedResult(**rates, p_value=p, interval=bootstrap_interval(pairs, seed=seed), verdict=verdict)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank `q`-th percentile (0-100) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
