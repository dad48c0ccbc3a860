"""PyTorch twins of maml_jax's benchmark models, with the same maths and weights.

* :class:`Conv4`: ``maml_jax.models.Conv4(downsample="maxpool", head="mean",
  norm="transductive")``: four blocks of 3×3 ``SAME`` convolution (with bias) →
  batch norm with the statistics of the current batch over (N, H, W), biased
  variance, ``eps = 1e-5``, learned scale and offset → ReLU → 2×2 max-pool (stride
  2, floored); then the mean over space and a linear head. Built from ``torch.nn``
  layers, as learn2learn's own examples are, in NCHW layout.
* :class:`MLP`: the sinusoid regressor, Linear-ReLU-Linear-ReLU-Linear (40-40).

:func:`load_flax_params` copies a flattened Flax parameter dict (``"a/b"`` keys, as
``export.py`` writes them) into such a module: conv kernels HWIO → OIHW, dense
kernels ``(in, out)`` → ``(out, in)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

EPS = 1e-5  # maml_jax.models.Conv4.eps


class Conv4(nn.Module):
    """The Conv4 of maml_jax with max-pool downsampling and a mean head (NCHW)."""

    def __init__(
        self, num_classes: int, in_channels: int = 1, filters: int = 64
    ) -> None:
        super().__init__()
        blocks = []
        for block in range(4):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(
                        in_channels if block == 0 else filters,
                        filters,
                        kernel_size=3,
                        padding=1,  # SAME for a 3×3 kernel at stride 1
                    ),
                    # Batch statistics always (no running averages), biased variance.
                    nn.BatchNorm2d(filters, eps=EPS, track_running_stats=False),
                    nn.ReLU(),
                    nn.MaxPool2d(kernel_size=2, stride=2),
                )
            )
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(filters, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images → ``(N, num_classes)`` logits."""
        return self.head(self.features(x).mean(dim=(2, 3)))


class MLP(nn.Module):
    """A ReLU MLP; ``sizes=(1, 40, 40, 1)`` is the MAML paper's sinusoid regressor."""

    def __init__(self, sizes: tuple[int, ...] = (1, 40, 40, 1)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, sizes[0])`` → ``(N, sizes[-1])``."""
        return self.net(x)


def _dense_layers(flax: Mapping[str, np.ndarray]) -> list[str]:
    """``Dense_0, Dense_1, ...`` in order."""
    names = {k.split("/")[0] for k in flax}
    return sorted(names, key=lambda n: int(n.split("_")[1]))


def flax_to_torch_names(flax: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps flattened Flax parameters to torch ``state_dict`` names and layouts."""
    out: dict[str, np.ndarray] = {}
    if "conv0_kernel" in flax:  # Conv4
        for block in range(4):
            prefix = f"features.{block}"
            kernel = flax[f"conv{block}_kernel"]  # (kh, kw, in, out)
            out[f"{prefix}.0.weight"] = kernel.transpose(3, 2, 0, 1)
            out[f"{prefix}.0.bias"] = flax[f"conv{block}_bias"]
            out[f"{prefix}.1.weight"] = flax[f"norm{block}_scale"]
            out[f"{prefix}.1.bias"] = flax[f"norm{block}_offset"]
        out["head.weight"] = flax["head/kernel"].T
        out["head.bias"] = flax["head/bias"]
    else:  # MLP: Dense_0, Dense_1, ... → net.0, net.2, ... (ReLUs in between)
        for i, name in enumerate(_dense_layers(flax)):
            out[f"net.{2 * i}.weight"] = flax[f"{name}/kernel"].T
            out[f"net.{2 * i}.bias"] = flax[f"{name}/bias"]
    if len(out) != len(flax):
        raise ValueError(f"unexpected Flax parameters: {sorted(flax)}")
    return out


def load_flax_params(
    module: nn.Module,
    flax: Mapping[str, np.ndarray],
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Copies flattened Flax parameters into ``module`` (all of them, exactly)."""
    state = {
        k: torch.from_numpy(np.array(v, copy=True)).to(dtype)
        for k, v in flax_to_torch_names(flax).items()
    }
    module.to(dtype).load_state_dict(state, strict=True)
    return module


def torch_to_flax_names(grads: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flax_to_torch_names` for gradients (or parameters)."""
    arrays = {k: v.detach().cpu().numpy() for k, v in grads.items()}
    out: dict[str, np.ndarray] = {}
    if "head.weight" in arrays:
        for block in range(4):
            prefix = f"features.{block}"
            out[f"conv{block}_kernel"] = arrays[f"{prefix}.0.weight"].transpose(
                2, 3, 1, 0
            )
            out[f"conv{block}_bias"] = arrays[f"{prefix}.0.bias"]
            out[f"norm{block}_scale"] = arrays[f"{prefix}.1.weight"]
            out[f"norm{block}_offset"] = arrays[f"{prefix}.1.bias"]
        out["head/kernel"] = arrays["head.weight"].T
        out["head/bias"] = arrays["head.bias"]
    else:
        for i in range(len(arrays) // 2):
            out[f"Dense_{i}/kernel"] = arrays[f"net.{2 * i}.weight"].T
            out[f"Dense_{i}/bias"] = arrays[f"net.{2 * i}.bias"]
    return out


def build_model(flax: Mapping[str, np.ndarray], num_classes: int | None) -> nn.Module:
    """A :class:`Conv4` (``num_classes`` given) or :class:`MLP` with these weights."""
    if num_classes is None:
        kernels = [flax[f"{name}/kernel"] for name in _dense_layers(flax)]
        sizes = (kernels[0].shape[0], *(k.shape[1] for k in kernels))
        model: nn.Module = MLP(sizes)
    else:
        model = Conv4(
            num_classes,
            in_channels=flax["conv0_kernel"].shape[2],
            filters=flax["conv0_kernel"].shape[3],
        )
    return load_flax_params(model, flax)
