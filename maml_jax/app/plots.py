"""Plots of training runs (matplotlib, headless)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def learning_curve(metrics_path, png_path, *, title: str = "") -> Path:
    """Plots the meta-training curves logged by ``fit`` to a PNG.

    Left: the meta-loss (query loss after adaptation) per logged step. Right: the
    query accuracy before/after adaptation on training tasks and, where logged,
    the validation accuracy (``eval/val_accuracy``); if no accuracy was logged,
    the query loss before/after adaptation instead.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(metrics_path)
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    losses = [r["loss"] for r in records if "loss" in r]
    ax_loss.plot([r["step"] for r in records if "loss" in r], losses, lw=0.8)
    ax_loss.set_xlabel("meta-step")
    ax_loss.set_ylabel("meta-loss")
    if losses and min(losses) > 0:  # a log axis needs positive values
        ax_loss.set_yscale("log")
    has_accuracy = bool(records) and "query_accuracy_post" in records[0]
    name = "query_accuracy" if has_accuracy else "query_loss"
    for suffix, label in (("_pre", "before adaptation"), ("_post", "after adaptation")):
        if not any(name + suffix in r for r in records):  # pre: if asked for
            continue
        ax_acc.plot(
            steps,
            [r.get(name + suffix, float("nan")) for r in records],
            lw=0.8,
            label=f"train {label}",
        )
    evals = [
        (r["step"], r["eval/val_accuracy"]) for r in records if "eval/val_accuracy" in r
    ]
    if evals:
        ax_acc.plot(*zip(*evals, strict=True), "o-", label="validation")
    ax_acc.set_xlabel("meta-step")
    ax_acc.set_ylabel(name.replace("_", " "))
    if ax_acc.get_legend_handles_labels()[0]:  # an empty log has no series
        ax_acc.legend(fontsize=8)
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)


def read_records(metrics_path) -> list[dict]:
    """The records of a metrics log; malformed lines are skipped with a warning.

    A line is a record if it is a JSON object with a numeric ``step``; anything
    else (a line cut short by a crash, an edited line) is skipped, and one
    warning names how many lines were and the first of them.
    """
    records, bad = [], []
    for number, line in enumerate(Path(metrics_path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int | float):
            bad.append(number)
            continue
        records.append(record)
    if bad:
        logger.warning(
            "%s: skipped %d malformed line(s) (not a JSON record with a 'step'; "
            "first: line %d).",
            metrics_path,
            len(bad),
            bad[0],
        )
    return records
