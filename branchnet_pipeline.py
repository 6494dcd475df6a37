"""BranchNet member: training loop, pipeline hooks and prediction (network in ``branchnet_model``,
augmentation in ``branchnet_augment``, what both torch members share in ``torch_common``).

Honest by construction: every fold trains a fixed schedule (warm-up, then cosine decay) and keeps its
final weights (their EMA when ``BRANCHNET_EMA=1``). The validation fold is scored only for the log
(``BRANCHNET_LOG_EVERY``); nothing about training (epochs, learning rate, which weights are kept) ever
reads the validation fold's labels, so the OOF probabilities of a fold are those of the very models the
bundle serves. ``N`` seeds per fold are trained the same way and averaged, for the OOF as at serving.

Data path: ``features.pad_batch`` (raw frame features, tail kept, front padded) and
``features.pad_tof_pixels`` (the raw 8x8 ToF grids, aligned with it) are built once per fold; each
batch is augmented on raw values (``branchnet_augment``: z-rotation of the world-frame vectors, time
stretch and shift, mixup, sensor dropout to the IMU-only view) and normalised inside the network
(masked BatchNorm, or the fold's scaler stored as buffers). Imports only the layers below it (never another pipeline).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import branchnet_model as bm
import bundle
import features
import io_utils
import metric
from branchnet_augment import IMU_IDX, THM_IDX, TOF_IDX, augment_batch
from config import SWITCH_FIELDS, BranchNetConfig, Config
from member_base import FoldResult, FoldSplit, TrainingData, eta_text, fit_fold_scaler
from torch_common import (
    TorchContext,
    TorchFoldMember,
    TorchMemberPipeline,
    autocast_context,
    build_model,
    cpu_state_dict,
    fold_file,
    fold_scores,
    read_checkpoint,
    read_fold_bundle,
    seed_everything,
    select_device,
    softmax_batches,
    use_amp,
    write_checkpoint,
)

MEMBER = "branchnet"
CHECKPOINT_FORMAT = 1

log = logging.getLogger(__name__)

# The values of the fields left at 0 (explicit settings win), per preset: config.py's, next to the fields.
PRESETS: dict[str, dict[str, Any]] = BranchNetConfig.PRESETS

# The gravity direction of the frame table (features.FRAME_FEATURES order): the derived orientation target.
# The branches' channel groups (IMU_IDX, THM_IDX, TOF_IDX) are branchnet_augment's.
GRAVITY_IDX = [int(i) for i in features.feature_index(["gravity_x", "gravity_y", "gravity_z"])]


# ----------------------------------------------------------------------------- settings


# Not settings of what is trained: the switches (config.SWITCH_FIELDS) and the debug epochs (``epochs`` holds
# the epochs this run trains).
_NOT_RECORDED = frozenset({*SWITCH_FIELDS, "debug_epochs"})


def resolve_settings(cfg: Config) -> BranchNetConfig:
    """The settings this run trains with: the section resolved in config (``BranchNetConfig.resolved``: the
    preset's values in the fields left at 0, ``preset=auto`` made cpu/gpu), ``debug_epochs`` under CMI_DEBUG."""
    s = cfg.resolved().branchnet  # checked: an unknown preset or norm names its variable
    return dataclasses.replace(s, epochs=s.debug_epochs) if cfg.run.debug else s


def settings_record(s: BranchNetConfig) -> dict[str, Any]:
    """The effective settings as the bundle (``settings``), effective_settings.json and the fingerprint keep them."""
    return {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name not in _NOT_RECORDED}


def model_args(s: BranchNetConfig) -> dict[str, Any]:
    """Constructor arguments of ``branchnet_model.BranchNet``, stored in every checkpoint."""
    weights = {"nine": s.aux_nine, "binary": s.aux_binary, "orientation": s.aux_orientation, "phase": s.aux_phase}
    heads = tuple(h for h in bm.HEADS if weights[h])
    return {
        "imu_idx": IMU_IDX,
        "thm_idx": THM_IDX,
        "tof_idx": TOF_IDX,
        "n_classes": metric.N_CLASSES,
        "width": s.width,
        "rnn_hidden": s.rnn_hidden,
        "tof_channels": s.tof_channels,
        "tof_cnn": s.tof_cnn,
        "branches": s.branches,
        "norm": s.norm,
        "dropout": s.dropout,
        "heads": list(heads),
    }


# ----------------------------------------------------------------------------- fold arrays


@dataclass
class FoldArrays:
    """Raw padded inputs of one view of a fold's sequences (tail kept, front padded), built once."""

    x: torch.Tensor  # (n, P, C) float32, raw frame features (0 on padding)
    mask: torch.Tensor  # (n, P) bool
    grids: torch.Tensor | None  # (n, P, 5, 65) uint8 ToF grid codes (branchnet_model.encode_tof); None: no ToF
    has_tof: torch.Tensor  # (n,) bool: thm/tof present (the table's has_tof_thm)
    y: torch.Tensor  # (n,) int64
    orientation: torch.Tensor  # (n,) int64, -1 = unknown
    phase: torch.Tensor | None = None  # (n, P) float32: 1 Gesture, 0 Transition or padding; None: no phase labels
    phase_known: torch.Tensor | None = None  # (n,) float32: 1 where every real step has a phase label

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device) -> FoldArrays:
        move = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return FoldArrays(**{k: (v.to(device) if v is not None else None) for k, v in move.items()})


def build_arrays(
    table: features.FrameTable,
    idx: np.ndarray,
    y: np.ndarray,
    pad_len: int,
    orientation: np.ndarray | None = None,
    with_grids: bool = True,
    chunk: int = 512,
    phase: np.ndarray | None = None,
) -> FoldArrays:
    """``idx``'s sequences of ``table`` padded to ``pad_len`` (raw values: normalisation is in the network).

    ``orientation`` (per sequence) and ``phase`` (per table row, ``TrainingData.phase``) are auxiliary
    targets: pass them for training rows only.
    """
    idx = np.asarray(idx, dtype=np.int64)
    x, mask = features.pad_batch(table, idx, pad_len, None)
    grids = None
    if with_grids and table.tof_pixels is not None:
        codes = np.zeros((len(idx), pad_len, bm.N_TOF_SENSORS, bm.GRID_WIDTH), dtype=np.uint8)
        for start in range(0, len(idx), chunk):  # the float temporaries stay small on real data
            part = idx[start : start + chunk]
            codes[start : start + len(part)] = bm.encode_tof(features.pad_tof_pixels(table, part, pad_len))
        grids = torch.from_numpy(codes)
    orient = np.full(len(idx), -1, dtype=np.int64) if orientation is None else np.asarray(orientation)[idx]
    phase_pad = phase_known = None
    if phase is not None:
        phase_pad, known = pad_row_labels(table, idx, pad_len, phase)
        phase_pad, phase_known = torch.from_numpy(phase_pad), torch.from_numpy(known)
    return FoldArrays(
        x=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        mask=torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)),
        grids=grids,
        has_tof=torch.from_numpy(np.asarray(table.has_tof_thm[idx], dtype=bool)),
        y=torch.from_numpy(np.asarray(y[idx], dtype=np.int64)),
        orientation=torch.from_numpy(orient.astype(np.int64)),
        phase=phase_pad,
        phase_known=phase_known,
    )


def pad_row_labels(
    table: features.FrameTable, idx: np.ndarray, pad_len: int, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row 0/1 labels (-1 unknown) of ``idx``'s sequences, aligned with ``features.pad_batch``.

    Returns (n, pad_len) float32 (tail kept, front padded with 0; unknown steps 0) and (n,) float32, 1 for
    a sequence whose kept steps all have a label.
    """
    out = np.zeros((len(idx), pad_len), dtype=np.float32)
    known = np.zeros(len(idx), dtype=np.float32)
    for i, k in enumerate(np.asarray(idx, dtype=np.int64)):
        start, stop = int(table.offsets[k]), int(table.offsets[k + 1])
        rows = labels[max(start, stop - pad_len) : stop]
        out[i, pad_len - len(rows) :] = np.maximum(rows, 0)
        known[i] = float(len(rows) > 0 and bool((rows >= 0).all()))
    return out, known


def length_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Batches of similar lengths (less padding to compute), in random order; new groupings every epoch.

    Sequences are sorted by their length times a random factor in [0.8, 1.25], cut into batches, and the
    batches shuffled.
    """
    n = len(lengths)
    noisy = lengths.float() * torch.exp((torch.rand(n, generator=gen) - 0.5) * 0.45)
    order = torch.argsort(noisy, stable=True)
    batches = list(torch.split(order, batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


# ----------------------------------------------------------------------------- orientation (auxiliary target)


def orientation_targets(data: TrainingData, split: FoldSplit, seed: int) -> tuple[np.ndarray, str]:
    """Per-sequence orientation class for the auxiliary head, -1 where unknown; and where it came from.

    ``TrainingData.orientation`` (the labels' ``orientation`` column, indices into
    ``schema.ORIENTATIONS``) is used where the data have it. Without it (data with no orientation
    column), the posture is derived from what the member has: k-means (4 clusters) of each sequence's
    mean gravity direction over its first third (the rest pose, before the reach), fitted on the
    training fold's sequences only. Validation rows get -1: the fold being scored never gives a target.
    """
    given = data.orientation
    out = np.full(data.n_sequences, -1, dtype=np.int64)
    if given is not None:
        given = np.asarray(given, dtype=np.int64)
        out[split.train] = given[split.train]
        return out, "labels"
    from sklearn.cluster import KMeans

    table = data.table
    head = np.maximum(1, table.lengths // 3)
    starts = table.offsets[:-1]
    rows = features._ranges(starts, head)
    g = table.values[rows][:, GRAVITY_IDX].astype(np.float64)
    seg = np.concatenate([[0], np.cumsum(head)]).astype(np.int64)
    mean_g = np.add.reduceat(g, seg[:-1], axis=0) / head[:, None]
    mean_g /= np.maximum(np.linalg.norm(mean_g, axis=1, keepdims=True), 1e-9)
    train = split.train
    k = min(bm.N_ORIENTATIONS, len(np.unique(np.round(mean_g[train], 3), axis=0)))
    if k < 2:
        return out, "none (fewer than 2 postures)"
    km = KMeans(n_clusters=k, n_init=4, random_state=seed % (2**31)).fit(mean_g[train])
    out[train] = km.labels_.astype(np.int64)
    return out, "derived (k-means of the rest-pose gravity direction, training fold only)"


# ----------------------------------------------------------------------------- loss and training


def soft_ce(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with soft targets (per row; a zero target row counts 0)."""
    k = logits.shape[1]
    mass = target.sum(dim=1, keepdim=True)
    t = target * (1 - smoothing) + smoothing * mass / k
    return -(t * torch.log_softmax(logits.float(), dim=1)).sum(dim=1)


def loss_fn(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], s: BranchNetConfig) -> torch.Tensor:
    loss = soft_ce(out["gesture"], targets["gesture"], s.label_smoothing).mean()
    if "nine" in out:
        loss = loss + s.aux_nine * soft_ce(out["nine"], targets["nine"], s.label_smoothing).mean()
    if "binary" in out:
        bce = nn.functional.binary_cross_entropy_with_logits(out["binary"].float(), targets["binary"])
        loss = loss + s.aux_binary * bce
    if "orientation" in out:
        known = targets["orientation"].sum()  # rows without a target count 0 (no device sync to test for them)
        ce = soft_ce(out["orientation"], targets["orientation"])
        loss = loss + s.aux_orientation * ce.sum() / known.clamp(min=1e-6)
    if "phase" in out and "phase" in targets:
        weight = targets["phase_mask"].float() * targets["phase_weight"][:, None]
        bce = nn.functional.binary_cross_entropy_with_logits(out["phase"].float(), targets["phase"], reduction="none")
        loss = loss + s.aux_phase * (bce * weight).sum() / weight.sum().clamp(min=1e-6)
    return loss


def predict_arrays(
    model: nn.Module, arr: FoldArrays, device: torch.device, amp: bool, batch_size: int, tof_cnn: bool
) -> np.ndarray:
    """Softmax probabilities of the gesture head for padded arrays (model in eval mode)."""

    def inputs(sl: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        mask = arr.mask[sl].to(device)
        keep = max(int(mask.sum(dim=1).max()), 1)  # the network ignores padding: drop what no row uses
        mask = mask[:, -keep:]
        x = arr.x[sl, -keep:].to(device)
        grids = None
        if tof_cnn:
            codes = arr.grids[sl, -keep:] if arr.grids is not None else None
            grids = bm.grids_of(codes, tuple(mask.shape), device)
        return x, mask, grids, arr.has_tof[sl].to(device)

    return softmax_batches(arr.n, batch_size, inputs, lambda *a: model(*a)["gesture"], device, amp)


@dataclass
class SeedResult:
    state_dict: dict[str, torch.Tensor]
    raw_state_dict: dict[str, torch.Tensor]
    proba_full: np.ndarray
    proba_imu: np.ndarray
    epoch_log: list[dict[str, float]]


def train_one(
    seed: int,
    train: FoldArrays,
    val_full: FoldArrays,
    val_imu: FoldArrays,
    args: dict[str, Any],
    s: BranchNetConfig,
    device: torch.device,
    scaler: features.ScalerStats | None = None,
    tag: str = "",
) -> SeedResult:
    """One model on a fixed schedule; returns its final weights (their EMA when ``s.ema``) and its OOF rows
    for both views.

    The validation arrays are predicted per ``log_every`` epochs for the log only and once at the end
    for the OOF: no decision reads them.
    """
    seed_everything(seed)
    model = bm.build(args)
    if scaler is not None:
        model.set_scaler(scaler.mean, scaler.std)
    model = model.to(device)
    amp = use_amp(device, s.amp)
    n_train = train.n
    steps_per_epoch = max(1, math.ceil(n_train / s.batch_size))
    total = max(1, s.epochs * steps_per_epoch)
    warm = min(total - 1, s.warmup_epochs * steps_per_epoch) if total > 1 else 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warm), eta_min=s.lr * 0.01)
    if warm > 0:
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, end_factor=1.0, total_iters=warm)
        scheduler: Any = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warm])
    else:
        scheduler = cosine
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(s.ema_decay), use_buffers=True) if s.ema else None
    grad_scaler = torch.amp.GradScaler("cuda", enabled=amp)
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1_000_003)
    if device.type == "cuda":
        train = train.to(device)
    y_val = val_full.y.numpy()
    lengths = train.mask.sum(dim=1).cpu()
    epoch_log: list[dict[str, float]] = []
    t_fold = time.perf_counter()
    for epoch in range(1, s.epochs + 1):
        started = time.perf_counter()
        model.train()
        total_loss, seen = 0.0, 0
        for idx in length_batches(lengths, s.batch_size, order_gen):
            idx = idx.to(train.y.device)
            batch = FoldArrays(
                x=train.x[idx],
                mask=train.mask[idx],
                grids=train.grids[idx] if train.grids is not None else None,
                has_tof=train.has_tof[idx],
                y=train.y[idx],
                orientation=train.orientation[idx],
                phase=train.phase[idx] if train.phase is not None else None,
                phase_known=train.phase_known[idx] if train.phase_known is not None else None,
            )
            x, mask, grids, has_tof, targets = augment_batch(batch, s, aug_gen, device)
            with autocast_context(device, amp):
                out = model(x, mask, grids, has_tof)
            loss = loss_fn(out, targets, s)
            optimizer.zero_grad(set_to_none=True)
            grad_scaler.scale(loss).backward()
            grad_scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            grad_scaler.step(optimizer)
            grad_scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            total_loss += float(loss.detach()) * len(idx)
            seen += len(idx)
        entry = {"epoch": epoch, "train_loss": total_loss / max(seen, 1), "seconds": time.perf_counter() - started}
        eta = eta_text(epoch, s.epochs, time.perf_counter() - t_fold)
        if s.log_every and (epoch % s.log_every == 0 or epoch == s.epochs) and epoch < s.epochs:
            served = (ema.module if ema is not None else model).eval()
            pf = predict_arrays(served, val_full, device, amp, 2 * s.batch_size, s.tof_cnn)
            pi = predict_arrays(served, val_imu, device, amp, 2 * s.batch_size, s.tof_cnn)
            entry["val_full"], entry["val_imu"] = metric.score_proba(y_val, pf), metric.score_proba(y_val, pi)
            log.info(
                "branchnet %s epoch %d/%d: loss %.4f, val (log only) full %.4f imu %.4f, lr %.2e, %.1f s, model %s",
                tag,
                epoch,
                s.epochs,
                entry["train_loss"],
                entry["val_full"],
                entry["val_imu"],
                optimizer.param_groups[0]["lr"],
                entry["seconds"],
                eta,
            )
        else:
            log.info(
                "branchnet %s epoch %d/%d: loss %.4f, %.1f s, model %s",
                tag,
                epoch,
                s.epochs,
                entry["train_loss"],
                entry["seconds"],
                eta,
            )
        epoch_log.append(entry)
    served = (ema.module if ema is not None else model).eval()
    proba_full = predict_arrays(served, val_full, device, amp, 2 * s.batch_size, s.tof_cnn)
    proba_imu = predict_arrays(served, val_imu, device, amp, 2 * s.batch_size, s.tof_cnn)
    epoch_log[-1]["val_full"] = metric.score_proba(y_val, proba_full)
    epoch_log[-1]["val_imu"] = metric.score_proba(y_val, proba_imu)
    return SeedResult(
        state_dict=cpu_state_dict(served),
        raw_state_dict=cpu_state_dict(model),
        proba_full=proba_full,
        proba_imu=proba_imu,
        epoch_log=epoch_log,
    )


def seed_of(cfg: Config, fold: int, k: int) -> int:
    """The seed of model ``k`` of ``fold`` (CMI_SEED varies it; folds and seeds never share one)."""
    return int(cfg.run.seed) + 1000 * int(fold) + 7919 * int(k)


@dataclass
class FoldOutcome:
    state_dicts: list[dict[str, torch.Tensor]]
    proba_full: np.ndarray
    proba_imu: np.ndarray
    pad_len: int
    scaler: features.ScalerStats | None
    epoch_logs: list[list[dict[str, float]]]
    orientation_source: str


def train_fold(
    data: TrainingData, split: FoldSplit, cfg: Config, s: BranchNetConfig, device: torch.device
) -> FoldOutcome:
    """Every seed of one fold; OOF = the mean of the seeds' probabilities (the served average)."""
    args = model_args(s)
    scaler = fit_fold_scaler(data, split) if s.norm == "scaler" else None  # training folds only
    pad_len = features.resolve_pad_len(data.table.lengths[split.train], cfg.features)
    orient, source = orientation_targets(data, split, cfg.run.seed + split.fold)
    phase = data.phase if s.aux_phase > 0 else None
    train = build_arrays(data.table, split.train, data.y, pad_len, orient, s.tof_cnn, phase=phase)
    val_full = build_arrays(data.table, split.valid, data.y, pad_len, None, s.tof_cnn)
    val_imu = build_arrays(data.imu_table, split.valid, data.y, pad_len, None, s.tof_cnn)
    states, pf, pi, logs = [], [], [], []
    for k in range(s.seeds):
        r = train_one(
            seed_of(cfg, split.fold, k),
            train,
            val_full,
            val_imu,
            args,
            s,
            device,
            scaler,
            f"fold {split.fold} seed {k}",
        )
        states.append(r.state_dict)
        pf.append(r.proba_full)
        pi.append(r.proba_imu)
        logs.append(r.epoch_log)
    return FoldOutcome(states, np.mean(pf, axis=0), np.mean(pi, axis=0), int(pad_len), scaler, logs, source)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, args: dict[str, Any], state_dicts: list[dict[str, torch.Tensor]]) -> None:
    """One fold's checkpoint: constructor arguments and the weights of its seeds, stacked on a first axis.

    ``{"model_args", "state_dict", "n_seeds", "format"}``: tensors and plain values only, so it loads
    with ``torch.load(weights_only=True)``.
    """
    stacked = {k: torch.stack([sd[k] for sd in state_dicts]) for k in state_dicts[0]}
    obj = {"format": CHECKPOINT_FORMAT, "model_args": dict(args), "n_seeds": len(state_dicts), "state_dict": stacked}
    write_checkpoint(path, obj)


def load_checkpoint(path: Path, device: torch.device) -> list[nn.Module]:
    """Every seed's network of one fold checkpoint, in eval mode (``weights_only``: a bundle is data)."""
    obj = read_checkpoint(path, device)
    if not isinstance(obj, dict) or not {"model_args", "state_dict", "n_seeds"} <= set(obj):
        raise bundle.BundleError(
            f"{path}: not a branchnet checkpoint (keys {sorted(obj) if isinstance(obj, dict) else type(obj)})"
        )
    n_ch = len(features.FRAME_FEATURES)
    try:
        args = dict(obj["model_args"])
        if max(args["imu_idx"] + args["thm_idx"] + args["tof_idx"]) >= n_ch:
            raise bundle.BundleError(f"{path}: model reads channels the features ({n_ch}) do not have")
        n_seeds = int(obj["n_seeds"])
        state = dict(obj["state_dict"])
    except (KeyError, TypeError, ValueError) as e:
        raise bundle.BundleError(f"{path}: malformed branchnet checkpoint ({type(e).__name__}: {e})") from None
    short = [k for k, t in state.items() if not isinstance(t, torch.Tensor) or t.dim() == 0 or len(t) < n_seeds]
    if n_seeds < 1 or short:
        raise bundle.BundleError(
            f"{path}: weights do not fit the model {args}: n_seeds is {n_seeds}, "
            f"stacked weights {short[:3]} hold fewer seeds"
        )
    return [build_model(path, bm.build, args, {k: t[i] for k, t in state.items()}, device) for i in range(n_seeds)]


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class _Context(TorchContext):
    """The torch kit's context and the run's effective settings (the preset filled in)."""

    settings: BranchNetConfig


class BranchNetPipeline(TorchMemberPipeline):
    """BranchNet per fold and seed; one checkpoint per fold (its seeds stacked) in the bundle."""

    name = MEMBER
    uses_aux_labels = True  # the orientation and per-step phase heads
    code_modules = ("branchnet_pipeline", "branchnet_model", "branchnet_augment", "torch_common")  # in the fingerprint

    def prepare(self, data: TrainingData, cfg: Config) -> _Context:
        s = resolve_settings(cfg)
        device = select_device(cfg)
        args = model_args(s)
        n_params = bm.count_parameters(bm.build(args))
        log.info(
            "branchnet member: %d sequences, device %s, preset %s: %d epochs x %d seed(s), width %d, "
            "%d parameters, norm %s, ToF CNN %s, AMP %s",
            data.n_sequences,
            device,
            s.preset,
            s.epochs,
            s.seeds,
            s.width,
            n_params,
            s.norm,
            "on" if s.tof_cnn else "off",
            "on" if use_amp(device, s.amp) else "off",
        )
        return _Context(device=device, model_args=args, settings=s)

    def fingerprint_settings(self, ctx: _Context, cfg: Config) -> dict[str, Any]:
        return {"effective": settings_record(ctx.settings), "checkpoint_format": CHECKPOINT_FORMAT}

    def fit_fold(self, ctx: _Context, data: TrainingData, split: FoldSplit, cfg: Config, work: Path) -> FoldResult:
        r = train_fold(data, split, cfg, ctx.settings, ctx.device)
        save_checkpoint(work / fold_file(split.fold), ctx.model_args, r.state_dicts)
        y_val = data.y[split.valid]
        record = {
            "score_full": metric.score_proba(y_val, r.proba_full),
            "score_imu": metric.score_proba(y_val, r.proba_imu),
            "pad_len": r.pad_len,
            "scaler": r.scaler.to_dict() if r.scaler is not None else None,
            "epochs": ctx.settings.epochs,
            "seeds": ctx.settings.seeds,
            "orientation_source": r.orientation_source,
            "phase_target": bool(ctx.settings.aux_phase > 0 and data.phase is not None),
            "epoch_log": r.epoch_logs,  # for the log only: the kept weights are the final ones
        }
        record["score_mean"] = 0.5 * (record["score_full"] + record["score_imu"])
        log.info(
            "branchnet fold %d (%s, %d seed(s)): full %.4f imu %.4f",
            split.fold,
            kept_weights(ctx.settings),
            ctx.settings.seeds,
            record["score_full"],
            record["score_imu"],
        )
        return FoldResult(r.proba_full, r.proba_imu, record)

    def summary_extra(self, ctx: _Context, records: dict[int, dict], cfg: Config) -> dict[str, Any]:
        return {
            "epochs": ctx.settings.epochs,
            "seeds": ctx.settings.seeds,
            "preset": ctx.settings.preset,
            "selection": f"none: fixed schedule, {kept_weights(ctx.settings)}",
            "folds": {str(k): fold_scores(r) for k, r in records.items()},
        }

    def bundle_extra(self, ctx: _Context, records: dict[int, dict], cfg: Config) -> dict[str, Any]:
        return {
            **self.torch_bundle_fields(ctx, records),
            "settings": settings_record(ctx.settings),
            "seeds": ctx.settings.seeds,
        }

    def write_extra_files(self, bundle_tmp: Path, ctx: _Context, records: dict[int, dict], work: Path) -> None:
        io_utils.write_json(bundle_tmp / "effective_settings.json", settings_record(ctx.settings))

    def load(self, bundle_dir: Path, cfg: Config) -> BranchNetMember:
        return load_member(bundle_dir, cfg)


def kept_weights(s: BranchNetConfig) -> str:
    """Which weights a fold keeps, in words: the final ones, or their EMA (``BRANCHNET_EMA``)."""
    return f"EMA of the weights (decay {s.ema_decay:g}) at the last epoch" if s.ema else "the last epoch's weights"


# ----------------------------------------------------------------------------- prediction


class BranchNetMember(TorchFoldMember):
    """Every fold's seeds, built once and kept in memory in eval mode; softmax averaged over all of them.

    IMU-only sequences (the table's ``has_tof_thm`` False) run with the thermopile/ToF branches gated
    off: the view sensor dropout trained and the IMU-only OOF scored.
    """

    member = MEMBER

    def __init__(
        self,
        models: list[list[nn.Module]],
        pad_lens: list[int],
        feature_names: tuple[str, ...],
        device: torch.device,
        amp: bool,
        tof_cnn: bool,
        metadata: dict[str, Any],
        stacked: bool = True,
    ) -> None:
        super().__init__(pad_lens, feature_names, device, amp, metadata)
        self.models = models  # per fold, per seed
        self.tof_cnn = tof_cnn
        # One forward pass for a group of folds (bm.StackedBranchNet): the same numbers, several times
        # cheaper per call; False runs the models one by one (the reference the tests compare with).
        self.stacked = stacked
        self._stacked: dict[tuple[int, ...], bm.StackedBranchNet] = {}

    @property
    def n_models(self) -> int:
        return sum(len(m) for m in self.models)

    def _stacked_net(self, folds: tuple[int, ...]) -> bm.StackedBranchNet:
        """The stacked network of ``folds``' models (all their seeds), built on first use."""
        if folds not in self._stacked:
            models = [m for f in folds for m in self.models[f]]
            self._stacked[folds] = bm.StackedBranchNet(models).to(self.device)
        return self._stacked[folds]

    def chunk_proba(self, table: features.FrameTable, idx: np.ndarray) -> np.ndarray:
        acc = np.zeros((len(idx), metric.N_CLASSES), dtype=np.float64)
        # Built once for the longest pad length: a shorter one is its tail (pad_batch keeps the tail).
        arr = build_arrays(
            table, idx, np.zeros(table.n_sequences, dtype=np.int64), max(self.pad_lens), None, self.tof_cnn
        )
        real = max(int(arr.mask.sum(dim=1).max()), 1)
        has_tof = arr.has_tof.to(self.device)
        # Folds whose pad length keeps the same steps see the same input: one pass for all of them.
        groups: dict[int, list[int]] = {}
        for fold, pad_len in enumerate(self.pad_lens):
            groups.setdefault(min(real, pad_len), []).append(fold)  # the network ignores padding
        for keep, folds in groups.items():
            mask = arr.mask[:, -keep:].to(self.device)
            grids = None
            if self.tof_cnn:
                codes = arr.grids[:, -keep:] if arr.grids is not None else None
                grids = bm.grids_of(codes, tuple(mask.shape), self.device)
            x = arr.x[:, -keep:].to(self.device)
            with autocast_context(self.device, self.amp):
                if self.stacked:
                    logits = self._stacked_net(tuple(folds))(x, mask, grids, has_tof)  # (B, M, 18)
                else:
                    models = [m for f in folds for m in self.models[f]]
                    logits = torch.stack([m(x, mask, grids, has_tof)["gesture"] for m in models], dim=1)
            acc += torch.softmax(logits.float(), dim=2).sum(dim=1).cpu().numpy()
        return acc / self.n_models


def load_member(bundle_dir: Path, cfg: Config) -> BranchNetMember:
    """Read and check the bundle, build every fold's seeds once (eval mode, on the device)."""
    fb = read_fold_bundle(BranchNetPipeline(), bundle_dir)  # every field checked before any file opens
    amp_setting = fb.field(("settings", "amp"), bool, default=True)
    tof_cnn = fb.field(("model_args", "tof_cnn"), bool, default=True)
    device, models = fb.load_models(load_checkpoint, cfg)
    amp = use_amp(device, amp_setting)
    return BranchNetMember(models, fb.pad_lens, tuple(fb.meta["feature_names"]), device, amp, tof_cnn, fb.meta)


__all__ = [
    "MEMBER",
    "PRESETS",
    "BranchNetMember",
    "BranchNetPipeline",
    "build_arrays",
    "kept_weights",
    "load_checkpoint",
    "load_member",
    "model_args",
    "predict_arrays",
    "resolve_settings",
    "save_checkpoint",
    "settings_record",
    "train_fold",
    "train_one",
]
