"""BranchNet: the network definitions of the ``branchnet`` member (no training code here).

Separate first layers per sensor group (the 1st-place "key part"), at the sampling rate:

* IMU: the frame table's acceleration and rotation-derived channels -> Conv1d (k5), then (at half
  rate) a residual Conv1d block;
* thermopiles: Conv1d (k5); ToF aggregates of the frame table: Conv1d (k5);
* ToF grids: every second frame's five 8x8 proximity grids through one small 2-D CNN (weights shared
  over sensors and frames; only the real frames of sequences with ToF are computed, batched together),
  the per-sensor vectors concatenated in sensor order (a sensor's place on the device carries
  information) with a "sensor reported" flag each -> Conv1d (k3) at half rate;

merged: masked max-pool by 2 -> Conv1d + residual block -> masked max-pool by 2 -> packed BiGRU ->
masked attention + mean pooling -> a shared layer and the heads (18 gestures; optional auxiliary heads:
9-class target/non-target, binary, orientation; and a per-step phase head on the GRU's outputs). A
per-sequence flag ``has_tof`` gates the thermopile and ToF branches: with the flag 0 their contribution is
exactly zero, so the IMU-only view (sensor dropout in training, IMU-only sequences at serving) is the
same network with those branches off.

Input normalisation is part of the network: ``norm="batchnorm"`` puts a masked BatchNorm first in every
branch (raw frame features in, no fitted scaler; 1st place's "largest improvement early on");
``norm="scaler"`` subtracts the training fold's mean and divides by its std, stored as buffers so a
checkpoint is self-contained.

Padding never leaks: the network moves the real steps to the front (whatever the pad side), keeps
padded steps at zero after every layer, computes BatchNorm statistics over real steps only, pools
the mask with the activations and packs the GRU. In eval mode the output depends only on the real steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import metric

N_TOF_SENSORS = 5
TOF_GRID = 8
N_TARGETS = len(metric.TARGET_GESTURES)  # gestures 0..7 are the targets (metric.GESTURES order)
N_NINE = N_TARGETS + 1  # 8 targets + "non-target"
N_ORIENTATIONS = 4
HEADS = ("nine", "binary", "orientation", "phase")  # the auxiliary heads a model may have
NORMS = ("batchnorm", "scaler")


class MaskedBatchNorm(nn.Module):
    """BatchNorm1d over the channels of ``x`` (B, C, L) whose statistics use only the steps where ``mask``.

    Padded steps leave the statistics alone and come out as 0. A batch with fewer than two real steps
    (e.g. every sequence of the batch without ToF in the ToF branch) normalises with the running
    statistics and does not update them. Computed in float32 (safe under autocast).
    """

    def __init__(self, n_channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(n_channels))
        self.bias = nn.Parameter(torch.zeros(n_channels))
        self.register_buffer("running_mean", torch.zeros(n_channels))
        self.register_buffer("running_var", torch.ones(n_channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, None, :].to(torch.float32)
        xf = x.float() * m
        if self.training:
            n = m.sum()
            denom = n.clamp(min=1.0)
            mean = xf.sum(dim=(0, 2)) / denom
            var = ((xf * xf).sum(dim=(0, 2)) / denom - mean * mean).clamp(min=0.0)  # one pass over the data
            enough = n >= 2
            with torch.no_grad():
                unbiased = var * n / (n - 1).clamp(min=1.0)
                new_mean = torch.lerp(self.running_mean, mean.detach(), self.momentum)
                new_var = torch.lerp(self.running_var, unbiased.detach(), self.momentum)
                self.running_mean.copy_(torch.where(enough, new_mean, self.running_mean))
                self.running_var.copy_(torch.where(enough, new_var, self.running_var))
            mean = torch.where(enough, mean, self.running_mean)
            var = torch.where(enough, var, self.running_var)
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return ((xf * scale[None, :, None] + shift[None, :, None]) * m).to(x.dtype)


class ConvBlock(nn.Module):
    """Conv1d -> masked BatchNorm -> SiLU; padded steps stay 0 (as the next conv's own zero padding)."""

    def __init__(self, c_in: int, c_out: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
        self.bn = MaskedBatchNorm(c_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x), mask)) * mask[:, None, :].to(x.dtype)


class ResBlock(nn.Module):
    """Two masked conv blocks with a skip connection."""

    def __init__(self, c: int, kernel: int) -> None:
        super().__init__()
        self.a = ConvBlock(c, c, kernel)
        self.conv = nn.Conv1d(c, c, kernel, padding=kernel // 2, bias=False)
        self.bn = MaskedBatchNorm(c)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(self.a(x, mask)), mask)
        return self.act(x + h) * mask[:, None, :].to(x.dtype)


class InputNorm(nn.Module):
    """The first layer of a branch: masked BatchNorm on raw input, or the fitted scaler (buffers)."""

    def __init__(self, n_channels: int, norm: str) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        self.bn = MaskedBatchNorm(n_channels) if norm == "batchnorm" else None
        self.register_buffer("mean", torch.zeros(n_channels))
        self.register_buffer("std", torch.ones(n_channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x (B, C, L)
        if self.bn is not None:
            return self.bn(x, mask)
        return ((x - self.mean[None, :, None]) / self.std[None, :, None]) * mask[:, None, :].to(x.dtype)


class GridConv(nn.Module):
    """A 3x3 convolution with stride 2 and zero padding on small square grids, computed as one matmul.

    The kernel (c_out, c_in, 3, 3) is a real convolution's (weights shared over the grid); the layer
    expands it into the equivalent dense (c_in*s*s, c_out*(s/2)^2) matrix once per forward and multiplies:
    on CPU that is several times faster than ``conv2d`` on tens of thousands of 8x8 images with a
    handful of channels, and it gives the same numbers.
    """

    def __init__(self, c_in: int, c_out: int, size: int) -> None:
        super().__init__()
        self.c_in, self.c_out, self.size = c_in, c_out, size
        self.weight = nn.Parameter(torch.empty(c_out, c_in, 3, 3))
        self.bias = nn.Parameter(torch.zeros(c_out))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.register_buffer("basis", torch.eye(c_in * size * size).view(-1, c_in, size, size), persistent=False)

    def dense(self) -> torch.Tensor:
        """(c_in*s*s, c_out*(s/2)^2): row i is the convolution of the i-th unit input.

        Cached while gradients are off (serving, OOF prediction) and the kernel is unchanged (its
        version counter moves on every in-place update: optimiser steps, ``load_state_dict``).
        """
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return nn.functional.conv2d(self.basis, self.weight, stride=2, padding=1).flatten(1)
        key = (self.weight._version, self.weight.data_ptr(), self.weight.device)
        if getattr(self, "_dense_key", None) != key:
            with torch.no_grad():
                self._dense = nn.functional.conv2d(self.basis, self.weight, stride=2, padding=1).flatten(1)
            self._dense_key = key
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, c_in*s*s) -> (N, c_out*(s/2)^2), channel-major
        s2 = (self.size // 2) ** 2
        return x @ self.dense().to(x.dtype) + self.bias.repeat_interleave(s2).to(x.dtype)


class TofFrameCNN(nn.Module):
    """One sensor's 8x8 proximity grid of one frame -> a vector.

    Conv3x3/2 -> SiLU -> Conv3x3/2 -> SiLU -> flatten (the 2x2 cells are kept: where in the grid
    something is near) -> Linear -> SiLU. Shared by the five sensors and every frame.
    """

    def __init__(self, channels: int = 8, out: int = 16) -> None:
        super().__init__()
        self.conv1 = GridConv(1, channels, TOF_GRID)
        self.conv2 = GridConv(channels, 2 * channels, TOF_GRID // 2)
        self.fc = nn.Linear(2 * channels * (TOF_GRID // 4) ** 2, out)
        self.act = nn.SiLU()
        self.out = out

    def forward(self, grids: torch.Tensor) -> torch.Tensor:  # (N, 64) row-major 8x8 -> (N, out)
        h = self.act(self.conv1(grids))
        h = self.act(self.conv2(h))
        return self.act(self.fc(h))


GRID_WIDTH = TOF_GRID * TOF_GRID + 1  # per sensor and frame: 64 proximity values, then "sensor reported"


def encode_tof(pixels: np.ndarray) -> np.ndarray:
    """Raw ToF readings (..., 5, 64) (NaN missing, -1 nothing in range, 0-254) -> uint8 (..., 5, 65).

    Values 0-63 are proximity, 255 - reading for a reading in range (1..255, nearer is larger) and 0 for
    nothing in range or missing; value 64 is 255 when the sensor reported any pixel of the frame, else 0
    (a missing sensor and one that sees nothing both read proximity 0; this tells them apart).
    ``decode_tof`` maps to float in [0, 1]. One byte per value keeps a fold's grids small.
    """
    p = np.asarray(pixels, dtype=np.float32)
    present = ~np.isnan(p)
    prox = np.where(present & (p >= 0), 255.0 - np.clip(p, 0.0, 254.0), 0.0)
    out = np.empty((*p.shape[:-1], GRID_WIDTH), dtype=np.uint8)
    out[..., :-1] = np.rint(np.nan_to_num(prox)).astype(np.uint8)
    out[..., -1] = np.where(present.any(axis=-1), 255, 0).astype(np.uint8)
    return out


def decode_tof(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes of ``encode_tof`` -> float32 in [0, 1] (same shape)."""
    return codes.to(torch.float32) * (1.0 / 255.0)


def grids_of(codes: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(B, L, 5, 65) float grids of uint8 codes; zeros (nothing reported) when there are none."""
    if codes is None:
        return torch.zeros(*shape, N_TOF_SENSORS, GRID_WIDTH, device=device)
    return decode_tof(codes.to(device))


def compact(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move each row's real steps (dim 1) to the front, in order; padding goes to the back, zeroed."""
    lengths = mask.sum(dim=1)
    steps = torch.arange(mask.shape[1], device=mask.device)
    new_mask = steps[None, :] < lengths[:, None]
    if torch.equal(new_mask, mask):
        return (mask, *tensors)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    out = []
    for t in tensors:
        idx = order.view(*order.shape, *([1] * (t.dim() - 2))).expand(*order.shape, *t.shape[2:])
        g = torch.gather(t, 1, idx)
        keep = new_mask.view(*new_mask.shape, *([1] * (t.dim() - 2)))
        out.append(torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device)))
    return (new_mask, *out)


def prepare_inputs(
    x: torch.Tensor, mask: torch.Tensor, grids: torch.Tensor | None, has_tof: torch.Tensor | None, tof_cnn: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Checked inputs with their real steps moved to the front: (x, mask, grids, has_tof as float (B,))."""
    if x.dim() != 3 or mask.shape != x.shape[:2]:
        raise ValueError(f"expected x (B, L, C) and mask (B, L); got {tuple(x.shape)} and {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    flag = torch.ones(x.shape[0], device=x.device) if has_tof is None else has_tof.to(x.device).float()
    if tof_cnn:
        if grids is None:  # nothing reported: proximity and presence 0
            grids = torch.zeros(*x.shape[:2], N_TOF_SENSORS, GRID_WIDTH, device=x.device)
        if grids.shape != (*x.shape[:2], N_TOF_SENSORS, GRID_WIDTH):
            raise ValueError(f"expected grids (B, L, 5, {GRID_WIDTH}); got {tuple(grids.shape)}")
        mask, x, grids = compact(mask, x, grids)
    else:
        mask, x = compact(mask, x)
        grids = None
    # An all-padding row (never produced by the member) keeps one zero step so packing stays valid.
    lengths = mask.sum(dim=1)
    mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.clamp(min=1)[:, None]
    return x, mask, grids, flag


def masked_max_pool(h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, L) right-padded -> (B, C, ceil(L/2)); a pooled step is real if any of its two inputs is."""
    h = h.masked_fill(~mask[:, None, :], float("-inf"))
    h = nn.functional.max_pool1d(h, 2, 2, ceil_mode=True)
    pooled = nn.functional.max_pool1d(mask[:, None, :].to(torch.float32), 2, 2, ceil_mode=True)[:, 0] > 0
    return h.masked_fill(~pooled[:, None, :], 0.0), pooled


class BranchNet(nn.Module):
    """``forward(x (B, L, C), mask (B, L), grids (B, L, 5, 65) | None, has_tof (B,)) -> dict of logits``.

    ``x`` holds the frame-table channels, raw (``norm="scaler"`` scales them with its buffers);
    ``imu_idx`` / ``thm_idx`` / ``tof_idx`` say which of them feed which branch. ``grids`` are the ToF
    grids, ``decode_tof(encode_tof(raw readings))`` (None: nothing reported).
    Outputs: ``gesture`` (B, n_classes) and, when their heads exist, ``nine`` (B, 9), ``binary`` (B,),
    ``orientation`` (B, 4) and ``phase`` (B, ceil(L/4)): per quarter-rate step, the logit of "Gesture"
    (vs "Transition"), start aligned (step i covers real input steps 4i..4i+3; 0 past the sequence's end).

    Time resolution: the first layer of each branch runs at the sampling rate (10 Hz), the ToF CNN (on
    every second frame) and the fusion at half of it, the GRU at a quarter (as the torch member's).
    """

    def __init__(
        self,
        imu_idx: list[int],
        thm_idx: list[int],
        tof_idx: list[int],
        n_classes: int = metric.N_CLASSES,
        width: int = 64,
        rnn_hidden: int = 64,
        tof_channels: int = 8,
        tof_cnn: bool = True,
        branches: bool = True,
        norm: str = "batchnorm",
        dropout: float = 0.2,
        heads: tuple[str, ...] = ("nine", "binary", "orientation", "phase"),
    ) -> None:
        super().__init__()
        self.imu_idx, self.thm_idx, self.tof_idx = list(imu_idx), list(thm_idx), list(tof_idx)
        self.tof_cnn, self.branches = bool(tof_cnn), bool(branches)
        self.heads = tuple(heads)
        unknown = set(self.heads) - set(HEADS)
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}")
        w_imu, w_thm, w_tof = width, max(width // 4, 4), max(width // 2, 4)
        self.register_buffer("imu_index", torch.tensor(self.imu_idx, dtype=torch.long), persistent=False)
        self.register_buffer("thm_index", torch.tensor(self.thm_idx, dtype=torch.long), persistent=False)
        self.register_buffer("tof_index", torch.tensor(self.tof_idx, dtype=torch.long), persistent=False)
        all_idx = self.imu_idx + self.thm_idx + self.tof_idx
        self.register_buffer("all_index", torch.tensor(all_idx, dtype=torch.long), persistent=False)
        if self.branches:
            self.imu_norm = InputNorm(len(imu_idx), norm)
            self.thm_norm = InputNorm(len(thm_idx), norm)
            self.tof_norm = InputNorm(len(tof_idx), norm)
            self.imu_in = ConvBlock(len(imu_idx), w_imu, 5)
            self.thm_in = ConvBlock(len(thm_idx), w_thm, 5)
            self.tof_in = ConvBlock(len(tof_idx), w_tof, 5)
            merged = w_imu + w_thm + w_tof
        else:  # the ablation: one first layer over every dense channel, no gating by sensor group
            self.all_norm = InputNorm(len(all_idx), norm)
            self.all_in = ConvBlock(len(all_idx), w_imu + w_thm + w_tof, 5)
            merged = w_imu + w_thm + w_tof
        if self.tof_cnn:
            self.grid_cnn = TofFrameCNN(tof_channels, 2 * tof_channels)
            # per sensor: its CNN vector and whether it reported (tells "missing" from "nothing in range")
            self.grid_mix = ConvBlock(N_TOF_SENSORS * (self.grid_cnn.out + 1), w_tof, 3)
            merged += w_tof
        self.imu_res = ResBlock(w_imu, 5) if self.branches else None
        self.fuse = ConvBlock(merged + 1, width, 3)  # + the has_tof flag
        self.fuse_res = ResBlock(width, 3)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(width, rnn_hidden, batch_first=True, bidirectional=True)
        self.attn = nn.Sequential(nn.Linear(2 * rnn_hidden, rnn_hidden), nn.Tanh(), nn.Linear(rnn_hidden, 1))
        self.shared = nn.Sequential(nn.Linear(4 * rnn_hidden + 1, 2 * width), nn.SiLU(), nn.Dropout(dropout))
        self.out_gesture = nn.Linear(2 * width, n_classes)
        self.out_nine = nn.Linear(2 * width, N_NINE) if "nine" in self.heads else None
        self.out_binary = nn.Linear(2 * width, 1) if "binary" in self.heads else None
        self.out_orientation = nn.Linear(2 * width, N_ORIENTATIONS) if "orientation" in self.heads else None
        self.out_phase = nn.Linear(2 * rnn_hidden, 1) if "phase" in self.heads else None

    def set_scaler(self, mean: Any, std: Any) -> None:
        """Store the training fold's scaler (per frame-table channel) in the input layers (norm="scaler")."""
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        norms = (
            [(self.imu_norm, self.imu_idx), (self.thm_norm, self.thm_idx), (self.tof_norm, self.tof_idx)]
            if self.branches
            else [(self.all_norm, self.imu_idx + self.thm_idx + self.tof_idx)]
        )
        for layer, idx in norms:
            layer.mean.copy_(mean[idx])
            layer.std.copy_(std[idx])

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        grids: torch.Tensor | None = None,
        has_tof: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        x, mask, grids, flag = prepare_inputs(x, mask, grids, has_tof, self.tof_cnn)
        gate = flag[:, None, None].to(x.dtype)
        on = flag[:, None] > 0
        sensor_mask = mask & on  # real steps of sequences whose thm/tof the model may use
        h = x.transpose(1, 2)  # (B, C, L)
        if self.branches:
            hi = self.imu_in(self.imu_norm(h[:, self.imu_index], mask), mask)
            ht = self.thm_in(self.thm_norm(h[:, self.thm_index] * gate, sensor_mask), sensor_mask)
            ha = self.tof_in(self.tof_norm(h[:, self.tof_index] * gate, sensor_mask), sensor_mask)
            hf = torch.cat([hi, ht * gate, ha * gate], dim=1)
        else:
            hf = self.all_in(self.all_norm(h[:, self.all_index], mask), mask)
        hf, pmask = masked_max_pool(hf, mask)  # half rate from here
        if self.branches:
            n_imu = self.imu_res.a.conv.in_channels
            hf = torch.cat([self.imu_res(hf[:, :n_imu], pmask), hf[:, n_imu:]], dim=1)
        parts = [hf]
        if self.tof_cnn:
            # every second frame (frame 2i for pooled step i: real exactly when the pooled step is)
            psensor = pmask & on
            grid = self._grid_features(grids[:, ::2], psensor).transpose(1, 2)  # (B, 5*(out+1), L/2)
            parts.append(self.grid_mix(grid, psensor) * gate)
        parts.append(gate.expand(-1, 1, hf.shape[2]) * pmask[:, None, :].to(hf.dtype))
        hf = self.fuse_res(self.fuse(torch.cat(parts, dim=1), pmask), pmask)
        hf, pmask = masked_max_pool(hf, pmask)  # quarter rate
        hf = self.drop(hf.transpose(1, 2))  # (B, L/4, width)

        plen = pmask.sum(dim=1)
        if bool(pmask.all()):
            hr, _ = self.gru(hf)
        else:  # packing keeps padded steps out of both directions
            packed = pack_padded_sequence(hf, plen.cpu(), batch_first=True, enforce_sorted=False)
            packed, _ = self.gru(packed)
            hr, _ = pad_packed_sequence(packed, batch_first=True, total_length=hf.shape[1])
        scores = self.attn(hr).squeeze(-1).float().masked_fill(~pmask, float("-inf"))
        weights = torch.softmax(scores, dim=1).to(hr.dtype)
        att = torch.bmm(weights[:, None, :], hr).squeeze(1)
        mean = (hr * pmask[:, :, None].to(hr.dtype)).sum(dim=1) / plen.clamp(min=1)[:, None].to(hr.dtype)
        z = self.shared(torch.cat([att, mean, flag[:, None].to(hr.dtype)], dim=1))
        out = {"gesture": self.out_gesture(z)}
        if self.out_nine is not None:
            out["nine"] = self.out_nine(z)
        if self.out_binary is not None:
            out["binary"] = self.out_binary(z).squeeze(-1)
        if self.out_orientation is not None:
            out["orientation"] = self.out_orientation(z)
        if self.out_phase is not None:
            out["phase"] = self.out_phase(hr).squeeze(-1).masked_fill(~pmask, 0.0)
        return out

    def _grid_features(self, grids: torch.Tensor, sensor_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, 5, 65) grids -> (B, L, 5 * (out + 1)): the CNN on every real frame with ToF, 0 elsewhere."""
        b, length = sensor_mask.shape
        sel = grids[sensor_mask]  # (N, 5, 65): only the frames the model may use
        width = N_TOF_SENSORS * (self.grid_cnn.out + 1)
        feats = torch.zeros(b, length, width, device=grids.device, dtype=grids.dtype)
        if sel.shape[0]:
            v = self.grid_cnn(sel[..., :-1].reshape(-1, TOF_GRID * TOF_GRID)).reshape(*sel.shape[:2], -1)
            v = torch.cat([v, sel[..., -1:].to(v.dtype)], dim=2).reshape(sel.shape[0], width)
            feats = feats.to(v.dtype)
            feats[sensor_mask] = v
        return feats


# ----------------------------------------------------------------------------- several models in one pass


def _affine_of(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel of an eval-mode ``MaskedBatchNorm`` or ``InputNorm``: y = x * scale + shift."""
    if isinstance(layer, InputNorm):
        if layer.bn is not None:
            return _affine_of(layer.bn)
        return 1.0 / layer.std, -layer.mean / layer.std
    scale = layer.weight * torch.rsqrt(layer.running_var + layer.eps)
    return scale, layer.bias - layer.running_mean * scale


class _StackedAffine(nn.Module):
    """M per-channel affine maps side by side on (B, M*C, L) fold-major channels; padded steps stay 0."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        pairs = [_affine_of(x) for x in layers]
        self.register_buffer("scale", torch.cat([a for a, _ in pairs]).detach().float()[None, :, None])
        self.register_buffer("shift", torch.cat([b for _, b in pairs]).detach().float()[None, :, None])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, None, :].to(torch.float32)
        return ((x.float() * self.scale + self.shift) * m).to(x.dtype)


def _grouped_conv(convs: list[nn.Conv1d]) -> nn.Conv1d:
    """M convolutions of the same shape as one grouped convolution (groups=M) on fold-major channels."""
    c = convs[0]
    out = nn.Conv1d(
        c.in_channels * len(convs),
        c.out_channels * len(convs),
        c.kernel_size[0],
        padding=c.padding[0],
        groups=len(convs),
        bias=False,
    )
    out.weight.data.copy_(torch.cat([x.weight.detach() for x in convs]))
    return out


class _StackedConvBlock(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.conv = _grouped_conv([b.conv for b in blocks])
        self.bn = _StackedAffine([b.bn for b in blocks])
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x), mask)) * mask[:, None, :].to(x.dtype)


class _StackedResBlock(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.a = _StackedConvBlock([b.a for b in blocks])
        self.conv = _grouped_conv([b.conv for b in blocks])
        self.bn = _StackedAffine([b.bn for b in blocks])
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(self.a(x, mask)), mask)
        return self.act(x + h) * mask[:, None, :].to(x.dtype)


def _stack_linear(layers: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, in, out) weights and (M, out) biases of M linear layers (y = x @ W + b per model)."""
    w = torch.stack([x.weight.detach().T for x in layers])
    b = torch.stack([x.bias.detach() for x in layers])
    return w, b


def _block_diagonal_gru(grus: list[nn.GRU]) -> nn.GRU:
    """M one-layer GRUs of the same shape as one GRU with block-diagonal weights: M independent GRUs.

    PyTorch stacks the gates as rows [reset; update; new]; each gate's block of the big matrix holds the
    M models' blocks on its diagonal, so every hidden unit only ever sees its own model's inputs and state.
    """
    g0, m = grus[0], len(grus)
    h, w_in = g0.hidden_size, g0.input_size
    big = nn.GRU(m * w_in, m * h, batch_first=True, bidirectional=g0.bidirectional)
    for suffix in ("", "_reverse") if g0.bidirectional else ("",):
        w_ih = torch.zeros(3 * m * h, m * w_in)
        w_hh = torch.zeros(3 * m * h, m * h)
        b_ih = torch.zeros(3 * m * h)
        b_hh = torch.zeros(3 * m * h)
        for k, g in enumerate(grus):
            for gate in range(3):
                rows = slice(gate * m * h + k * h, gate * m * h + (k + 1) * h)
                src = slice(gate * h, (gate + 1) * h)
                w_ih[rows, k * w_in : (k + 1) * w_in] = getattr(g, f"weight_ih_l0{suffix}").detach()[src]
                w_hh[rows, k * h : (k + 1) * h] = getattr(g, f"weight_hh_l0{suffix}").detach()[src]
                b_ih[rows] = getattr(g, f"bias_ih_l0{suffix}").detach()[src]
                b_hh[rows] = getattr(g, f"bias_hh_l0{suffix}").detach()[src]
        getattr(big, f"weight_ih_l0{suffix}").data.copy_(w_ih)
        getattr(big, f"weight_hh_l0{suffix}").data.copy_(w_hh)
        getattr(big, f"bias_ih_l0{suffix}").data.copy_(b_ih)
        getattr(big, f"bias_hh_l0{suffix}").data.copy_(b_hh)
    return big


class StackedBranchNet(nn.Module):
    """M trained ``BranchNet`` models (same constructor arguments) evaluated in one forward pass.

    Serving cost is dominated by per-layer overhead on one short sequence, not by arithmetic, so the M
    models (folds x seeds) run side by side: their channels fold-major, convolutions grouped, BatchNorm
    as per-channel affine maps (eval mode), the GRUs as one block-diagonal GRU and the linear layers as
    batched matrix products. ``forward(x, mask, grids, has_tof) -> (B, M, n_classes)`` gesture logits,
    equal to each model's own ``forward(...)["gesture"]`` up to float rounding (tested). Inference only:
    the weights are copied at construction.
    """

    def __init__(self, models: list[BranchNet]) -> None:
        super().__init__()
        if not models:
            raise ValueError("StackedBranchNet needs at least one model")
        first = models[0]
        self.m = len(models)
        self.branches, self.tof_cnn = first.branches, first.tof_cnn
        for other in models[1:]:
            if (other.branches, other.tof_cnn, other.imu_idx, other.thm_idx, other.tof_idx) != (
                first.branches,
                first.tof_cnn,
                first.imu_idx,
                first.thm_idx,
                first.tof_idx,
            ):
                raise ValueError("StackedBranchNet: the models' constructor arguments differ")
        for name in ("imu_index", "thm_index", "tof_index", "all_index"):
            self.register_buffer(name, getattr(first, name).clone(), persistent=False)
        if self.branches:
            self.imu_norm = _StackedAffine([x.imu_norm for x in models])
            self.thm_norm = _StackedAffine([x.thm_norm for x in models])
            self.tof_norm = _StackedAffine([x.tof_norm for x in models])
            self.imu_in = _StackedConvBlock([x.imu_in for x in models])
            self.thm_in = _StackedConvBlock([x.thm_in for x in models])
            self.tof_in = _StackedConvBlock([x.tof_in for x in models])
            self.imu_res = _StackedResBlock([x.imu_res for x in models])
            self.n_imu = first.imu_res.a.conv.in_channels
        else:
            self.all_norm = _StackedAffine([x.all_norm for x in models])
            self.all_in = _StackedConvBlock([x.all_in for x in models])
        if self.tof_cnn:
            cnns = [x.grid_cnn for x in models]
            self.grid_out = first.grid_cnn.out
            for i, conv in enumerate(("conv1", "conv2")):
                layers = [getattr(c, conv) for c in cnns]
                s2 = (layers[0].size // 2) ** 2
                with torch.no_grad():
                    dense = torch.stack(
                        [nn.functional.conv2d(x.basis, x.weight, stride=2, padding=1).flatten(1) for x in layers]
                    )
                self.register_buffer(f"grid_w{i}", dense.float())
                self.register_buffer(f"grid_b{i}", torch.stack([x.bias.detach().repeat_interleave(s2) for x in layers]))
            w, b = _stack_linear([c.fc for c in cnns])
            self.register_buffer("grid_fc_w", w)
            self.register_buffer("grid_fc_b", b)
            self.grid_mix = _StackedConvBlock([x.grid_mix for x in models])
        self.fuse = _StackedConvBlock([x.fuse for x in models])
        self.fuse_res = _StackedResBlock([x.fuse_res for x in models])
        self.gru = _block_diagonal_gru([x.gru for x in models])
        self.hidden = first.gru.hidden_size
        for name, layers in (
            ("attn1", [x.attn[0] for x in models]),
            ("attn2", [x.attn[2] for x in models]),
            ("shared", [x.shared[0] for x in models]),
            ("head", [x.out_gesture for x in models]),
        ):
            w, b = _stack_linear(layers)
            self.register_buffer(f"{name}_w", w)
            self.register_buffer(f"{name}_b", b)
        self.eval()

    def _folds(self, h: torch.Tensor) -> torch.Tensor:
        """(B, C, L) shared input -> (B, M*C, L), one copy per model."""
        return h.repeat(1, self.m, 1)

    def _cat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-model concatenation of fold-major (B, M*C_i, L) tensors -> (B, M*sum(C_i), L)."""
        b, length = parts[0].shape[0], parts[0].shape[2]
        return torch.cat([p.reshape(b, self.m, -1, length) for p in parts], dim=2).reshape(b, -1, length)

    def _grid_features(self, grids: torch.Tensor, sensor_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, 5, 65) -> (B, M * 5 * (out + 1), L): every model's ToF CNN on the real frames with ToF."""
        b, length = sensor_mask.shape
        width = N_TOF_SENSORS * (self.grid_out + 1)
        feats = torch.zeros(b, length, self.m, width, device=grids.device, dtype=grids.dtype)
        sel = grids[sensor_mask]  # (N, 5, 65)
        if sel.shape[0]:
            pix = sel[..., :-1].reshape(-1, TOF_GRID * TOF_GRID)  # (N*5, 64), the same input for every model
            h = nn.functional.silu(torch.einsum("nf,mfo->mno", pix, self.grid_w0.to(pix.dtype)) + self.grid_b0[:, None])
            h = nn.functional.silu(torch.bmm(h, self.grid_w1.to(h.dtype)) + self.grid_b1[:, None])
            h = nn.functional.silu(torch.bmm(h, self.grid_fc_w.to(h.dtype)) + self.grid_fc_b[:, None])
            v = h.reshape(self.m, sel.shape[0], N_TOF_SENSORS, self.grid_out)
            flag = sel[..., -1:].to(v.dtype).expand(self.m, -1, -1, -1)
            v = torch.cat([v, flag], dim=3).reshape(self.m, sel.shape[0], width)
            feats = feats.to(v.dtype)
            feats[sensor_mask] = v.transpose(0, 1)
        return feats.permute(0, 2, 3, 1).reshape(b, self.m * width, length)

    @torch.no_grad()
    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        grids: torch.Tensor | None = None,
        has_tof: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = x.shape[0]
        x, mask, grids, flag = prepare_inputs(x, mask, grids, has_tof, self.tof_cnn)
        gate = flag[:, None, None].to(x.dtype)
        on = flag[:, None] > 0
        sensor_mask = mask & on
        h = x.transpose(1, 2)
        if self.branches:
            hi = self.imu_in(self.imu_norm(self._folds(h[:, self.imu_index]), mask), mask)
            ht = self.thm_in(self.thm_norm(self._folds(h[:, self.thm_index] * gate), sensor_mask), sensor_mask)
            ha = self.tof_in(self.tof_norm(self._folds(h[:, self.tof_index] * gate), sensor_mask), sensor_mask)
            hf = self._cat([hi, ht * gate, ha * gate])
        else:
            hf = self.all_in(self.all_norm(self._folds(h[:, self.all_index]), mask), mask)
        hf, pmask = masked_max_pool(hf, mask)
        l2 = hf.shape[2]
        if self.branches:
            per = hf.reshape(b, self.m, -1, l2)
            imu = self.imu_res(per[:, :, : self.n_imu].reshape(b, -1, l2), pmask)
            hf = self._cat([imu, per[:, :, self.n_imu :].reshape(b, -1, l2)])
        parts = [hf]
        if self.tof_cnn:
            psensor = pmask & on
            grid = self._grid_features(grids[:, ::2], psensor)
            parts.append(self.grid_mix(grid, psensor) * gate)
        parts.append((gate.expand(-1, 1, l2) * pmask[:, None, :].to(hf.dtype)).repeat(1, self.m, 1))
        hf = self.fuse_res(self.fuse(self._cat(parts), pmask), pmask)
        hf, pmask = masked_max_pool(hf, pmask)
        hf = hf.transpose(1, 2)  # (B, L/4, M*width), fold-major features
        plen = pmask.sum(dim=1)
        if bool(pmask.all()):
            hr, _ = self.gru(hf)
        else:
            packed = pack_padded_sequence(hf, plen.cpu(), batch_first=True, enforce_sorted=False)
            packed, _ = self.gru(packed)
            hr, _ = pad_packed_sequence(packed, batch_first=True, total_length=hf.shape[1])
        t = hr.shape[1]
        hr = hr.reshape(b, t, 2, self.m, self.hidden).permute(0, 1, 3, 2, 4).reshape(b, t, self.m, 2 * self.hidden)
        a = torch.tanh(torch.einsum("btmc,mch->btmh", hr, self.attn1_w.to(hr.dtype)) + self.attn1_b)
        scores = (torch.einsum("btmh,mho->btmo", a, self.attn2_w.to(a.dtype)) + self.attn2_b)[..., 0]
        scores = scores.float().masked_fill(~pmask[:, :, None], float("-inf"))
        weights = torch.softmax(scores, dim=1).to(hr.dtype)
        att = torch.einsum("btm,btmc->bmc", weights, hr)
        mean = (hr * pmask[:, :, None, None].to(hr.dtype)).sum(dim=1) / plen.clamp(min=1)[:, None, None].to(hr.dtype)
        z = torch.cat([att, mean, flag[:, None, None].to(hr.dtype).expand(b, self.m, 1)], dim=2)
        z = nn.functional.silu(torch.einsum("bmc,mco->bmo", z, self.shared_w.to(z.dtype)) + self.shared_b)
        return torch.einsum("bmc,mco->bmo", z, self.head_w.to(z.dtype)) + self.head_b


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(model_args: dict[str, Any]) -> BranchNet:
    """The network from its constructor arguments (as stored in every checkpoint)."""
    args = dict(model_args)
    if "heads" in args:
        args["heads"] = tuple(args["heads"])
    return BranchNet(**args)


__all__ = [
    "BranchNet",
    "StackedBranchNet",
    "MaskedBatchNorm",
    "TofFrameCNN",
    "encode_tof",
    "decode_tof",
    "grids_of",
    "GRID_WIDTH",
    "compact",
    "masked_max_pool",
    "build",
    "count_parameters",
    "N_NINE",
    "N_ORIENTATIONS",
    "HEADS",
    "N_TARGETS",
    "NORMS",
]
