"""Bootstrap confidence intervals over examples, and paired bootstrap tests between two runs.

Small-scale comparisons of release policies differ by a point or two; these say when that is more than the
luck of which examples were drawn. Percentile bootstrap, seeded, vectorised over resamples.

The unit of resampling is the example. Where several values belong to one unit (rows of one prompt scored against
different references, in predictions files written before repeated prompts were grouped), `groups` labels each
value's unit: whole units are drawn, and each resample's statistic is the mean over the values of the units drawn,
so n rows of k copies give the interval of n / k examples, not one sqrt(k) too narrow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from adore.checks import check_integer, check_share


@dataclass(frozen=True)
class Bootstrap:
    """Resampling settings (config `bootstrap`): `resamples` draws of n examples with replacement."""

    resamples: int = 1000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self):
        check_integer("bootstrap.resamples", self.resamples, fix=": e.g. 1000 (no intervals wanted: set it to 1)")
        check_share("bootstrap.level", self.level, fix=": e.g. 0.95")

    def indices(self, n: int) -> np.ndarray:
        """(resamples, n) example indices; the same seed gives the same draws to every run (paired)."""
        return np.random.default_rng(self.seed).integers(0, n, size=(self.resamples, n))

    def interval(self, replicates: np.ndarray) -> list[float]:
        tail = (1 - self.level) / 2 * 100
        low, high = np.nanpercentile(replicates, [tail, 100 - tail])
        return [float(low), float(high)]

    def means(self, values: np.ndarray, groups=None) -> tuple[np.ndarray, int]:
        """(resamples,) means of `values` over resampled units, and the number of units. `groups`: one label per
        value, values with the same label are one unit (None, or all labels distinct: every value is one)."""
        if groups is not None:
            labels: dict = {}
            units = np.array([labels.setdefault(g, len(labels)) for g in groups], dtype=np.intp)
            if len(units) != len(values):
                raise ValueError(f"bootstrap groups need one label per value: got {len(units)} for {len(values)}")
            if len(labels) < len(values):
                sums = np.bincount(units, weights=values, minlength=len(labels))
                counts = np.bincount(units, minlength=len(labels)).astype(float)
                idx = self.indices(len(labels))
                return sums[idx].sum(1) / counts[idx].sum(1), len(labels)
        return values[self.indices(len(values))].mean(1), len(values)

    def mean_ci(self, values, groups=None) -> list[float]:
        """Interval of the mean of per-example values (NaNs, e.g. examples without a score, are left out);
        `groups`: the resampling unit of each value (see `means`)."""
        values = np.asarray(values, dtype=float)
        keep = ~np.isnan(values)
        if len(values) == 0 or not keep.any():
            return [float("nan"), float("nan")]
        groups = None if groups is None else [g for g, k in zip(groups, keep) if k]
        return self.interval(self.means(values[keep], groups)[0])

    def statistic_ci(self, n: int, statistic: Callable[[np.ndarray], float]) -> list[float]:
        """Interval of any statistic of a subset of examples (e.g. corpus BLEU), given their indices."""
        return self.interval(np.array([statistic(idx) for idx in self.indices(n)]))

    def paired(self, a, b, groups=None) -> dict:
        """Paired test of mean(a) - mean(b) over the same examples: significant when the interval excludes 0.
        `groups`: the resampling unit of each pair (see `means`); `n` counts units."""
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if a.shape != b.shape:
            raise ValueError(f"paired bootstrap needs scores of the same examples: got {a.shape} and {b.shape}")
        keep = ~(np.isnan(a) | np.isnan(b))
        diff = a[keep] - b[keep]
        if len(diff) == 0:
            return {"diff": float("nan"), "ci": [float("nan"), float("nan")], "significant": False, "n": 0}
        groups = None if groups is None else [g for g, k in zip(groups, keep) if k]
        replicates, n = self.means(diff, groups)
        low, high = self.interval(replicates)
        return {"diff": float(diff.mean()), "ci": [low, high], "significant": bool(low > 0 or high < 0), "n": int(n)}


def corpus_bleu_ci(outputs: list[str], references: list, bootstrap: Bootstrap) -> list[float]:
    """Bootstrap interval of corpus BLEU from per-sentence n-gram statistics (one extraction, cheap resamples).
    `references`: one text, or a list of texts (multi-reference BLEU), per output."""
    from sacrebleu.metrics import BLEU

    from adore.eval.metrics import reference_streams

    metric = BLEU()
    stats = metric._extract_corpus_statistics(outputs, reference_streams(references))
    stats = np.array(stats, dtype=float)  # (n, 2 + 4 * 2)
    return bootstrap.statistic_ci(
        len(outputs), lambda idx: metric._compute_score_from_stats(stats[idx].sum(0).tolist()).score
    )
