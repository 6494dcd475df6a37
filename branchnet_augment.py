"""BranchNet's training augmentations, on raw padded batches (no training loop here; that is ``branchnet_pipeline``).

One training batch (``augment_batch``): z-rotation of the world-frame vectors, mixup, time stretch and
shift, sensor dropout to the IMU-only view; every random draw on CPU from the caller's generator, so a
run is reproducible whatever the device. The per-sequence targets (gesture, nine, binary, orientation)
are built here as soft probabilities so that mixup mixes them with the inputs; the per-step phase target
rides along as one more input channel. Reads only the frame table's channel order (``features``) and
the ToF grid codes (``branchnet_model``).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
from torch import nn

import branchnet_model as bm
import features
import metric

# Channel groups of the frame table (features.FRAME_FEATURES order): the model's branches read them
# (branchnet_pipeline.model_args), sensor dropout zeroes the thermopile/ToF ones.
IMU_IDX = [int(i) for i in features.feature_index(features.IMU_FEATURES)]
THM_IDX = [int(i) for i in features.feature_index(features.THM_FEATURES)]
TOF_IDX = [int(i) for i in features.feature_index(features.TOF_FEATURES)]
TOFTHM_IDX = THM_IDX + TOF_IDX
# The world-frame vectors of the frame table: only linear acceleration (gravity removed, in the world frame).
# acc, body_linear_acc and omega are device-frame, gravity_* is world "up" seen from the device: a turn
# of the world about its vertical axis leaves all of those unchanged.
_LINEAR = [int(i) for i in features.feature_index(["linear_acc_x", "linear_acc_y", "linear_acc_z"])]
WORLD_VECTORS: tuple[tuple[int, int, int], ...] = ((_LINEAR[0], _LINEAR[1], _LINEAR[2]),)


class Batch(Protocol):
    """What ``augment_batch`` reads of a batch (``branchnet_pipeline.FoldArrays``)."""

    x: torch.Tensor  # (B, P, C) float32, raw frame features, front padded
    mask: torch.Tensor  # (B, P) bool
    grids: torch.Tensor | None  # (B, P, 5, 65) uint8 ToF grid codes; None: no ToF
    has_tof: torch.Tensor  # (B,) bool
    y: torch.Tensor  # (B,) int64
    orientation: torch.Tensor  # (B,) int64, -1 = unknown
    phase: torch.Tensor | None  # (B, P) float32 per-step phase target; None: none
    phase_known: torch.Tensor | None  # (B,) float32

    @property
    def n(self) -> int: ...


class AugmentSettings(Protocol):
    """The settings ``augment_batch`` reads (a resolved ``config.BranchNetConfig``)."""

    tof_cnn: bool
    aux_phase: float
    rotate_deg: float
    mixup_alpha: float
    mixup_prob: float
    stretch: float
    stretch_prob: float
    shift: float
    sensor_dropout: float


def rotate_z(
    x: torch.Tensor, angle: torch.Tensor, vectors: tuple[tuple[int, int, int], ...] = WORLD_VECTORS
) -> torch.Tensor:
    """Rotate each sample's world-frame vectors by ``angle`` (B,) radians about world z (x, y turn; z kept)."""
    out = x.clone()
    c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    for ix, iy, _iz in vectors:
        vx, vy = x[:, :, ix], x[:, :, iy]
        out[:, :, ix] = c * vx - s * vy
        out[:, :, iy] = s * vx + c * vy
    return out


def time_stretch(
    x: torch.Tensor, mask: torch.Tensor, grids: torch.Tensor | None, factor: torch.Tensor, crop: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Resample each sequence: drop its first ``crop`` (B,) real steps, stretch the rest by ``factor`` (B,).

    Input front padded (tail kept, as ``features.pad_batch``). The new length is round((n - crop) *
    factor), at least 1 and at most the pad length (a longer result keeps its tail). Output start
    aligned (real steps first, as the network compacts them) and trimmed to the longest result. ``x``
    is linearly interpolated, ``grids`` take the nearest frame (one gather on the largest tensor).
    factor 1 and crop 0 copy the sequence exactly.
    """
    b, p = mask.shape
    n = mask.sum(dim=1)
    last = (n - 1).clamp(min=0)
    crop = torch.minimum(crop.long(), last)
    src_n = (n - crop).clamp(min=1)
    m = torch.round(src_n.float() * factor).long().clamp(min=1)
    kept = m.clamp(max=p)
    width = int(kept.max()) if b else 1
    j = torch.arange(width, device=x.device)[None, :]
    valid = j < kept[:, None]
    jj = j + (m - kept)[:, None]  # index in the stretched sequence (its tail kept)
    scale = (src_n - 1).float() / (m - 1).clamp(min=1).float()
    t = crop[:, None].float() + jj.float() * scale[:, None]  # position among the real steps
    lo = torch.minimum(t.floor().long(), last[:, None])
    hi = torch.minimum(lo + 1, last[:, None])
    w = (t - lo.float()).clamp(0, 1)
    first = (p - n)[:, None]  # where the first real step sits in the padded input

    def take(v: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
        flat = v.reshape(b, p, -1)
        return torch.gather(flat, 1, (first + ix).clamp(max=p - 1)[:, :, None].expand(-1, -1, flat.shape[2]))

    keep = valid[:, :, None].to(x.dtype)
    x_new = (torch.lerp(take(x, lo), take(x, hi), w[:, :, None].to(x.dtype)) * keep).reshape(b, width, *x.shape[2:])
    g_new = None
    if grids is not None:
        near = torch.minimum(torch.round(t).long(), last[:, None])
        g_new = (take(grids, near) * keep.to(grids.dtype)).reshape(b, width, *grids.shape[2:])
    return x_new, valid, g_new


def mixup(
    x: torch.Tensor,
    mask: torch.Tensor,
    grids: torch.Tensor | None,
    has_tof: torch.Tensor,
    targets: dict[str, torch.Tensor],
    lam: torch.Tensor,
    perm: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
    """Mix each sample with ``perm``'s: tails aligned (front padded), ``lam`` (B,) on the sample's side.

    Where both sequences have a step the inputs are mixed; where only one has, its values are kept; the
    mask is their union. Thermopiles/ToF count as present only if both had them. Every target (soft
    probabilities; a row of zeros = unknown) is mixed with the same weights.
    """
    m1, m2 = mask, mask[perm]
    both = m1 & m2

    def mix(a: torch.Tensor) -> torch.Tensor:
        flat_a = a.reshape(*a.shape[:2], -1)
        flat_c = flat_a[perm]
        lw = lam[:, None, None].to(flat_a.dtype)
        out = torch.where(both[:, :, None], torch.lerp(flat_c, flat_a, lw), torch.where(m1[:, :, None], flat_a, flat_c))
        return out.reshape(a.shape)

    def mix_target(v: torch.Tensor) -> torch.Tensor:
        lw = lam.view(-1, *([1] * (v.dim() - 1))).to(v.dtype)
        return lw * v + (1 - lw) * v[perm]

    t_new = {k: mix_target(v) for k, v in targets.items()}
    return mix(x), m1 | m2, (mix(grids) if grids is not None else None), has_tof & has_tof[perm], t_new


def sensor_dropout(
    x: torch.Tensor, grids: torch.Tensor | None, has_tof: torch.Tensor, drop: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The IMU-only view for the samples where ``drop`` (B,): thm/tof channels and grids zeroed, flag off."""
    x = x.clone()
    cols = torch.tensor(TOFTHM_IDX, device=x.device)
    x[:, :, cols] = torch.where(drop[:, None, None], torch.zeros((), device=x.device), x[:, :, cols])
    if grids is not None and bool(drop.any()):
        grids = grids.clone()
        grids[drop] = 0.0
    return x, grids, has_tof & ~drop


def one_hot_targets(
    y: torch.Tensor, orientation: torch.Tensor, phase_known: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Soft per-sequence targets: gesture (18), nine (8 targets + non-target), binary, orientation (0 if
    unknown) and the weight of the per-step phase target (0 without one)."""
    gesture = nn.functional.one_hot(y, metric.N_CLASSES).float()
    nine = torch.cat([gesture[:, : bm.N_TARGETS], gesture[:, bm.N_TARGETS :].sum(dim=1, keepdim=True)], dim=1)
    known = orientation >= 0
    orient = nn.functional.one_hot(orientation.clamp(min=0), bm.N_ORIENTATIONS).float() * known[:, None].float()
    phase_w = torch.zeros(len(y), device=y.device) if phase_known is None else phase_known.float()
    return {
        "gesture": gesture,
        "nine": nine,
        "binary": nine[:, : bm.N_TARGETS].sum(dim=1),
        "orientation": orient,
        "phase_weight": phase_w,
    }


def phase_target(phase: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start-aligned per-step phase (B, L) -> the fraction of "Gesture" per quarter-rate step (B, ceil(L/4)),
    and which of those steps are real: the network's time grid after its two poolings by 2."""
    m = mask.float()[:, None, :]
    total = nn.functional.avg_pool1d(phase.float()[:, None, :] * m, 4, 4, ceil_mode=True)
    count = nn.functional.avg_pool1d(m, 4, 4, ceil_mode=True)
    real = count[:, 0] > 0
    return (total / count.clamp(min=1e-6))[:, 0].clamp(0, 1), real


def augment_batch(
    batch: Batch, s: AugmentSettings, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
    """One training batch: z-rotation, mixup, time stretch/shift, sensor dropout (draws on CPU: reproducible).

    Returns start-aligned inputs (the stretch's output; factor 1 where a sequence is not stretched). The
    per-step phase target rides along as one more channel of ``x`` (so mixup mixes it, the stretch
    resamples it) and comes back as ``targets["phase"]`` with ``targets["phase_mask"]`` (quarter rate).
    """
    b = batch.n

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(device)

    x, mask, has_tof = batch.x.to(device), batch.mask.to(device), batch.has_tof.to(device)
    grids = bm.grids_of(batch.grids, tuple(mask.shape), device) if s.tof_cnn else None
    known = None if batch.phase_known is None else batch.phase_known.to(device)
    targets = one_hot_targets(batch.y.to(device), batch.orientation.to(device), known)
    with_phase = batch.phase is not None and s.aux_phase > 0
    if with_phase:
        x = torch.cat([x, batch.phase.to(device)[:, :, None]], dim=2)
    if s.rotate_deg > 0:
        x = rotate_z(x, (draw(b) * 2 - 1) * math.radians(s.rotate_deg))
    if s.mixup_prob > 0 and s.mixup_alpha > 0 and float(torch.rand(1, generator=gen)) < s.mixup_prob:
        rng = np.random.default_rng(int(torch.randint(2**31 - 1, (1,), generator=gen)))
        lam = torch.from_numpy(rng.beta(s.mixup_alpha, s.mixup_alpha, b).astype(np.float32)).to(device)
        perm = torch.randperm(b, generator=gen).to(device)
        x, mask, grids, has_tof, targets = mixup(x, mask, grids, has_tof, targets, lam, perm)
    n = mask.sum(dim=1).float()
    stretched = draw(b) < s.stretch_prob
    factor = torch.where(stretched, 1 - s.stretch + 2 * s.stretch * draw(b), torch.ones(b, device=device))
    crop = torch.floor(draw(b) * s.shift * n)
    x, mask, grids = time_stretch(x, mask, grids, factor, crop)
    if with_phase:
        targets["phase"], targets["phase_mask"] = phase_target(x[:, :, -1], mask)
        x = x[:, :, :-1]
    if s.sensor_dropout > 0:
        x, grids, has_tof = sensor_dropout(x, grids, has_tof, draw(b) < s.sensor_dropout)
    return x, mask, grids, has_tof, targets


__all__ = [
    "IMU_IDX",
    "THM_IDX",
    "TOF_IDX",
    "TOFTHM_IDX",
    "WORLD_VECTORS",
    "augment_batch",
    "mixup",
    "one_hot_targets",
    "phase_target",
    "rotate_z",
    "sensor_dropout",
    "time_stretch",
]
