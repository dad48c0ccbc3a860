"""Summary statistics for evaluation: means with 95% confidence intervals."""

from __future__ import annotations

import numpy as np

Z_95 = 1.959963984540054


def mean_ci95(values, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and half-width of the normal-approximation 95% confidence interval.

    ``ci = 1.96 · std(values, ddof=1) / sqrt(n)`` along ``axis``.

    Examples:
      >>> mean, ci = mean_ci95([1.0, 2.0, 3.0])
      >>> float(mean), round(float(ci), 4)
      (2.0, 1.1316)
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[axis]
    if n < 2:
        raise ValueError(f"need at least 2 values for a confidence interval; got {n}.")
    mean = values.mean(axis=axis)
    ci = Z_95 * values.std(axis=axis, ddof=1) / np.sqrt(n)
    return mean, ci
