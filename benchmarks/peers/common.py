"""Paths and the exported-workload format shared by the peer benchmark (no jax)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PEERS_PYTHON = ROOT / ".peers-venv" / "bin" / "python"
DATA_DIR = Path(__file__).resolve().parent / "data"  # exported npz (git-ignored)
RESULTS_DIR = ROOT / "benchmarks" / "results" / "peers"
OMNIGLOT_DIR = Path(
    os.environ.get("MAML_JAX_OMNIGLOT_DIR")
    or ROOT.parent / "shared" / "data" / "omniglot"
)
WORKLOADS = ("sinusoid", "omniglot-5w1s-q15-maxpool")
PEERS = ("learn2learn", "higher", "torchfunc")
PARAM_PREFIX = "param:"


@dataclass(frozen=True)
class Exported:
    """One workload as ``export.py`` wrote it.

    Attributes:
      params: flattened Flax parameters (``"head/kernel"``-style keys).
      support_x, support_y, query_x, query_y: ``(batches, tasks, examples, ...)``;
        images NHWC, labels int64 (Omniglot) or targets ``(..., 1)`` (sinusoid).
      kind: ``"omniglot"`` or ``"sinusoid"``.
      ways: classes per task (0 for sinusoid).
      inner_lr: the workload's inner learning rate α.
      loss_scale: the constant multiplying the mean loss (``ways`` for Omniglot).
      meta_batch: tasks per meta-batch.
    """

    params: dict[str, np.ndarray]
    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray
    kind: str
    ways: int
    inner_lr: float
    loss_scale: float
    meta_batch: int

    @property
    def num_batches(self) -> int:
        return self.support_x.shape[0]


def export_path(workload: str) -> Path:
    """Where ``export.py`` writes ``workload``."""
    return DATA_DIR / f"{workload}.npz"


def load_export(workload: str, path: Path | None = None) -> Exported:
    """Reads an exported workload (run ``python -m benchmarks.peers.export`` first)."""
    import numpy as np

    path = path or export_path(workload)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; run `{PEERS_PYTHON} -m benchmarks.peers.export "
            f"--workloads {workload}` from {ROOT}."
        )
    with np.load(path) as f:
        params = {
            k[len(PARAM_PREFIX) :]: f[k] for k in f.files if k.startswith(PARAM_PREFIX)
        }
        return Exported(
            params=params,
            support_x=f["support_x"],
            support_y=f["support_y"],
            query_x=f["query_x"],
            query_y=f["query_y"],
            kind=str(f["kind"]),
            ways=int(f["ways"]),
            inner_lr=float(f["inner_lr"]),
            loss_scale=float(f["loss_scale"]),
            meta_batch=int(f["meta_batch"]),
        )
