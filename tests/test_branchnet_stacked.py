"""StackedBranchNet (serving's one-pass fusion of M BranchNets) against the models it was built from.

Random constructor arguments (branches on/off, the ToF CNN on/off, both input norms, widths, hidden
sizes, ToF channels, heads, class counts, channel groups) and random weights and running statistics:
the stacked network's logits must be each model's own ``forward(...)["gesture"]``.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch

import branchnet_model as bm

ATOL = 1e-5


# Every combination of the switches that change the network's structure, each with two random draws of the rest.
LAYOUTS = [
    {"branches": b, "tof_cnn": t, "norm": n, "seed": k}
    for (b, t, n), k in itertools.product(itertools.product([True, False], [True, False], bm.NORMS), range(2))
]


def random_args(rng: np.random.Generator, **layout: Any) -> dict[str, Any]:
    """BranchNet constructor arguments drawn from everything the constructor accepts (``layout`` fixes some)."""
    n_ch = int(rng.integers(6, 16))
    order = rng.permutation(n_ch).tolist()
    cut1, cut2 = sorted(rng.choice(np.arange(1, n_ch), size=2, replace=False).tolist())
    heads = [h for h in bm.HEADS if rng.random() < 0.5]
    return {
        "imu_idx": order[:cut1],
        "thm_idx": order[cut1:cut2],
        "tof_idx": order[cut2:],
        "n_classes": int(rng.choice([5, 18])),
        "width": int(rng.choice([4, 8, 12, 16, 24])),
        "rnn_hidden": int(rng.choice([3, 8, 16])),
        "tof_channels": int(rng.choice([2, 4, 8])),
        "tof_cnn": bool(rng.random() < 0.5),
        "branches": bool(rng.random() < 0.5),
        "norm": str(rng.choice(bm.NORMS)),
        "dropout": float(rng.choice([0.0, 0.3])),
        "heads": heads,
        **layout,
    }


def random_model(args: dict[str, Any], seed: int) -> bm.BranchNet:
    """A model of ``args`` with random weights and non-trivial normalisation (eval mode)."""
    torch.manual_seed(seed)
    model = bm.build(args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, bm.MaskedBatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
        if args["norm"] == "scaler":
            n_ch = 1 + max(args["imu_idx"] + args["thm_idx"] + args["tof_idx"])
            model.set_scaler(torch.randn(n_ch, generator=g), torch.rand(n_ch, generator=g) + 0.5)
    return model.eval()


def random_inputs(args: dict[str, Any], rng: np.random.Generator, grids: bool = True) -> tuple[torch.Tensor, ...]:
    """Front-padded x, mask, grids (None without ``grids``) and has_tof, lengths from 1 step to the full width."""
    n_ch = 1 + max(args["imu_idx"] + args["thm_idx"] + args["tof_idx"])
    b, length = int(rng.integers(2, 6)), int(rng.integers(5, 30))
    lengths = rng.integers(1, length + 1, size=b)
    lengths[0] = length  # one row without padding
    mask = torch.from_numpy(np.arange(length)[None, :] >= (length - lengths)[:, None])
    x = torch.from_numpy(rng.normal(size=(b, length, n_ch)).astype(np.float32)) * mask[:, :, None]
    codes = rng.integers(0, 256, size=(b, length, bm.N_TOF_SENSORS, bm.GRID_WIDTH), dtype=np.uint8)
    has_tof = torch.from_numpy(rng.random(b) < 0.6)
    return x, mask, bm.decode_tof(torch.from_numpy(codes)) if grids else None, has_tof


def one_by_one(models: list[bm.BranchNet], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([m(*inputs)["gesture"] for m in models], dim=1)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_stacked_gives_the_models_own_logits(layout):
    seed = LAYOUTS.index(layout)
    rng = np.random.default_rng(seed)
    args = random_args(rng, **{k: v for k, v in layout.items() if k != "seed"})
    models = [random_model(args, 100 * seed + k) for k in range(int(rng.integers(1, 5)))]
    stacked = bm.StackedBranchNet(models)
    inputs = random_inputs(args, rng, grids=layout["seed"] == 0)  # the second draw: no grids ("nothing reported")

    expected = one_by_one(models, inputs)
    got = stacked(*inputs)
    assert got.shape == (inputs[0].shape[0], len(models), args["n_classes"])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=lambda m: f"{args}: {m}")

    # The comparison is sharp: one weight of one model moved by 1e-3 after stacking shows (the stacked
    # network copied the weights), and only in that model's logits.
    with torch.no_grad():
        models[-1].out_gesture.bias[0] += 1e-3
    changed = one_by_one(models, inputs)
    assert not torch.allclose(changed, got, atol=ATOL, rtol=0)
    torch.testing.assert_close(changed[:, :-1], got[:, :-1], atol=ATOL, rtol=0)


def test_models_with_other_arguments_do_not_stack():
    args = random_args(np.random.default_rng(0))
    other = {**args, "branches": not args["branches"]}
    with pytest.raises(ValueError, match="constructor arguments differ"):
        bm.StackedBranchNet([random_model(args, 0), random_model(other, 1)])
    with pytest.raises(ValueError, match="at least one model"):
        bm.StackedBranchNet([])
