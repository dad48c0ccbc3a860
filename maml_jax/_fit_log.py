"""What ``fit`` reports after each chunk: means, the progress bar, the log file."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def means(metrics: Mapping[str, np.ndarray], applied: np.ndarray) -> dict:
    """Each metric's mean over the applied steps (NaN if every step was skipped)."""
    if not applied.any():
        return {k: math.nan for k in metrics}
    return {k: float(np.mean(np.asarray(v)[applied])) for k, v in metrics.items()}


def raise_if_nonfinite(metrics: Mapping[str, np.ndarray], start: int) -> None:
    """Raises ``FloatingPointError`` at the chunk's first non-finite step."""
    loss = np.asarray(metrics["loss"], np.float64)
    norm = np.asarray(metrics["grad_norm"], np.float64)
    bad = ~(np.isfinite(loss) & np.isfinite(norm))
    if not bad.any():
        return
    i = int(np.argmax(bad))
    step = start + i + 1
    if not np.isfinite(loss[i]):
        what = f"meta-loss became {loss[i]} at step {step}"
    else:
        what = (
            f"meta-gradient norm became {norm[i]} at step {step} "
            f"(meta-loss {loss[i]:.6g})"
        )
    raise FloatingPointError(f"{what}; lower the learning rates or check the data.")


def bar_fields(record: dict[str, Any]) -> dict[str, str]:
    fields = {"loss": f"{record['loss']:.4g}"}
    if "query_accuracy_post" in record:
        fields["acc"] = f"{record['query_accuracy_post']:.3f}"
    if "skipped_steps" in record:
        fields["skipped"] = str(record["skipped_steps"])
    for name, value in record.items():
        if name.startswith("eval/"):
            fields[name[5:]] = f"{value:.4g}"
    fields["tasks/s"] = f"{record['tasks_per_s']:.0f}"
    return fields


def write(log, record: dict[str, Any]) -> None:
    if log is not None:
        log.write(json.dumps(record) + "\n")
        log.flush()


def progress_bar(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
