"""Bootstrap confidence intervals over examples, and paired bootstrap tests between two runs.

Small-scale comparisons of release policies differ by a point or two; these say when that is more than the
luck of which examples were drawn. Percentile bootstrap, seeded, vectorised over resamples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Bootstrap:
    """Resampling settings (config `bootstrap`): `resamples` draws of n examples with replacement."""

    resamples: int = 1000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.resamples, int) or self.resamples < 1:
            raise ValueError(
                f"bootstrap.resamples={self.resamples!r} must be a positive integer (0 resamples: set it to 1)"
            )
        if not 0 < self.level < 1:
            raise ValueError(f"bootstrap.level={self.level!r} must be in (0, 1), e.g. 0.95")

    def indices(self, n: int) -> np.ndarray:
        """(resamples, n) example indices; the same seed gives the same draws to every run (paired)."""
        return np.random.default_rng(self.seed).integers(0, n, size=(self.resamples, n))

    def interval(self, replicates: np.ndarray) -> list[float]:
        tail = (1 - self.level) / 2 * 100
        low, high = np.nanpercentile(replicates, [tail, 100 - tail])
        return [float(low), float(high)]

    def mean_ci(self, values) -> list[float]:
        """Interval of the mean of per-example values (NaNs, e.g. examples without a score, are left out)."""
        values = np.asarray(values, dtype=float)
        values = values[~np.isnan(values)]
        if len(values) == 0:
            return [float("nan"), float("nan")]
        return self.interval(values[self.indices(len(values))].mean(1))

    def statistic_ci(self, n: int, statistic: Callable[[np.ndarray], float]) -> list[float]:
        """Interval of any statistic of a subset of examples (e.g. corpus BLEU), given their indices."""
        return self.interval(np.array([statistic(idx) for idx in self.indices(n)]))

    def paired(self, a, b) -> dict:
        """Paired test of mean(a) - mean(b) over the same examples: significant when the interval excludes 0."""
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if a.shape != b.shape:
            raise ValueError(f"paired bootstrap needs scores of the same examples: got {a.shape} and {b.shape}")
        keep = ~(np.isnan(a) | np.isnan(b))
        diff = a[keep] - b[keep]
        if len(diff) == 0:
            return {"diff": float("nan"), "ci": [float("nan"), float("nan")], "significant": False, "n": 0}
        low, high = self.interval(diff[self.indices(len(diff))].mean(1))
        return {
            "diff": float(diff.mean()),
            "ci": [low, high],
            "significant": bool(low > 0 or high < 0),
            "n": int(len(diff)),
        }


def corpus_bleu_ci(outputs: list[str], references: list[str], bootstrap: Bootstrap) -> list[float]:
    """Bootstrap interval of corpus BLEU from per-sentence n-gram statistics (one extraction, cheap resamples)."""
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    stats = np.array(metric._extract_corpus_statistics(outputs, [references]), dtype=float)  # (n, 2 + 4 * 2)
    return bootstrap.statistic_ci(
        len(outputs), lambda idx: metric._compute_score_from_stats(stats[idx].sum(0).tolist()).score
    )
