"""PyTorch member: CV training of ``TimeSeriesNet`` (network in ``timeseries_model``), bundle, prediction.

Data path: ``features.pad_batch`` arrays (tail kept, front padded, scaled with
the training fold's scaler) are built once per fold and kept as tensors; the
network compacts real steps, pools the mask with the activations and packs the
recurrent layers, so padding neither leaks into the output nor depends on the
pad side. Sequences without ToF/THM are the IMU-only view, which training shows
through modality dropout. What both torch members share (devices, checkpoints,
chunked prediction, bundle reading) is ``torch_common``. Imports only the layers
below it (never another pipeline); nothing heavy runs at import.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import bundle
import distributed
import features
import metric
from config import Config
from member_base import FoldResult, FoldSplit, TrainingData, eta_text, fit_fold_scaler
from timeseries_model import TimeSeriesNet, model_args_from_config
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
    strip_module_prefix,
    use_amp,
    write_checkpoint,
)

MEMBER = "torch"

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- device helpers


def amp_enabled(device: torch.device, cfg: Config) -> bool:
    """``TORCH_AMP``, on CUDA only (``torch_common.use_amp``)."""
    return use_amp(device, cfg.torch.amp)


def unwrap_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A CPU copy of the weights of ``model`` (DataParallel, DistributedDataParallel or bare), without ``module.``."""
    return strip_module_prefix(cpu_state_dict(distributed.unwrap(model)))


# ----------------------------------------------------------------------------- training data


@dataclass
class FoldArrays:
    """Padded, scaled arrays of one fold's sequences, built once (full view and IMU-only view)."""

    x_full: torch.Tensor  # (n, L, C) float32
    x_imu: torch.Tensor  # (n, L, C) float32, the same sequences with ToF/THM removed
    mask: torch.Tensor  # (n, L) bool; identical for both views (same rows)
    y: torch.Tensor  # (n,) int64

    def to(self, device: torch.device) -> FoldArrays:
        """Move once per fold (GPU: batches are then gathered on the device, no per-batch copies)."""
        return FoldArrays(*(t.to(device) for t in (self.x_full, self.x_imu, self.mask, self.y)))


def build_fold_arrays(
    table: features.FrameTable,
    imu_table: features.FrameTable,
    idx: np.ndarray,
    y: np.ndarray,
    pad_len: int,
    scaler: features.ScalerStats,
) -> FoldArrays:
    """Both views padded with the same scaler (IMU-only rows are the unscaled IMU-only values, scaled)."""
    x_full, mask = features.pad_batch(table, idx, pad_len, scaler)
    x_imu, mask_imu = features.pad_batch(imu_table, idx, pad_len, scaler)
    if not np.array_equal(mask, mask_imu):
        raise ValueError("table and imu_table disagree on sequence lengths: they must hold the same sequences")
    return FoldArrays(
        x_full=torch.from_numpy(np.ascontiguousarray(x_full, dtype=np.float32)),
        x_imu=torch.from_numpy(np.ascontiguousarray(x_imu, dtype=np.float32)),
        mask=torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)),
        y=torch.from_numpy(np.asarray(y[idx], dtype=np.int64)),
    )


AUG_DRAWS = 4  # uniform draws per sample besides one per channel: modality swap, span length, span end, span on/off


def augment_batch(
    x_full: torch.Tensor,
    x_imu: torch.Tensor,
    mask: torch.Tensor,
    cfg: Config,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Training view of one batch: modality dropout, then optional time mask and channel dropout.

    Modality dropout swaps in the IMU-only row for a share of the samples, so the
    model sees exactly what an IMU-only test sequence looks like after scaling.
    Masked values become 0, i.e. the training mean after scaling. ``uniforms``
    (n, AUG_DRAWS + C): the samples' own random draws (training draws them per
    sample and epoch, so a sample's augmentation does not depend on its batch or
    rank); without them they are drawn here from ``generator``.
    """
    t = cfg.torch
    n, length, n_ch = x_full.shape
    dev = x_full.device
    if uniforms is None:  # uniform draws on CPU (reproducible), moved to the batch's device
        uniforms = torch.rand(n, AUG_DRAWS + n_ch, generator=generator)
    u = uniforms.to(dev)

    x = x_full
    if t.modality_dropout > 0:
        swap = u[:, 0] < t.modality_dropout
        x = torch.where(swap[:, None, None], x_imu, x_full)
    if t.time_mask_prob > 0:
        # One contiguous span of up to 10% of the real steps; positions are counted among real steps
        # from the end (1 = last real step), so it never touches padding whatever the pad side.
        rank_back = torch.flip(torch.cumsum(torch.flip(mask.long(), [1]), 1), [1]).float()
        lengths = mask.sum(dim=1).float()
        span = (u[:, 1] * 0.1 * lengths).floor().clamp(min=1)
        end = (u[:, 2] * (lengths - span + 1).clamp(min=1)).floor() + span  # span covers (end - span, end]
        hit = mask & (rank_back <= end[:, None]) & (rank_back > (end - span)[:, None])
        hit &= (u[:, 3] < t.time_mask_prob)[:, None]
        x = x.masked_fill(hit[:, :, None], 0.0)
    if t.channel_dropout_prob > 0:
        drop = u[:, AUG_DRAWS : AUG_DRAWS + n_ch] < t.channel_dropout_prob
        x = x.masked_fill(drop[:, None, :], 0.0)
    return x


def epochs_for(cfg: Config) -> int:
    return cfg.torch.debug_epochs if cfg.run.debug else cfg.torch.epochs


def _tqdm(iterable: Any, **kwargs: Any) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional at run time
        return iterable
    return tqdm(iterable, disable=not sys.stderr.isatty(), leave=False, **kwargs)


def predict_arrays(
    model: nn.Module, x: torch.Tensor, mask: torch.Tensor, device: torch.device, amp: bool, batch_size: int
) -> np.ndarray:
    """Softmax probabilities for padded arrays, in batches (model must already be in eval mode)."""

    def inputs(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return x[rows].to(device, non_blocking=True), mask[rows].to(device, non_blocking=True)

    return softmax_batches(x.shape[0], batch_size, inputs, model, device, amp)


@dataclass
class FoldFit:
    """A fold's final weights and its OOF; nothing here was chosen with the validation labels."""

    state_dict: OrderedDict[str, torch.Tensor]
    epochs: int
    score_full: float
    score_imu: float
    proba_full: np.ndarray
    proba_imu: np.ndarray

    @property
    def score_mean(self) -> float:
        return 0.5 * (self.score_full + self.score_imu)


def train_fold(
    fold: int,
    train: FoldArrays,
    val: FoldArrays,
    model_args: dict[str, Any],
    cfg: Config,
    device: torch.device,
) -> FoldFit:
    """Train one fold for a fixed schedule and keep the final weights.

    The validation fold is scored after every epoch for the log only: choosing
    the epoch on it would make its OOF optimistic (issue 12), and the model
    served is the one that produced the OOF.

    Under torchrun (``distributed.py``) every rank trains the same fold with
    DistributedDataParallel: ``batch / world`` samples per rank from one global
    order, batch norm over the global batch, gradients averaged, so N ranks
    train what one process trains (dropout masks aside, drawn per rank).
    Validation runs on rank 0 only; its OOF is sent to every rank at the end.
    """
    t = cfg.torch
    seed = cfg.run.seed + fold
    seed_everything(seed)
    model: nn.Module = TimeSeriesNet(**model_args).to(device)
    if distributed.is_distributed():
        model = distributed.wrap_model(model, device)
    elif device.type == "cuda" and t.data_parallel and torch.cuda.device_count() > 1:
        model = nn.DataParallel(model)
    amp = amp_enabled(device, cfg)
    n_epochs = epochs_for(cfg)
    n_train = train.y.shape[0]
    # One seeded order per epoch; each rank takes its share (one process: all of it, in the same order).
    sampler = distributed.sampler(n_train, seed)
    loader = torch.utils.data.DataLoader(
        range(n_train), batch_size=distributed.local_batch(t.batch_size), sampler=sampler, num_workers=0
    )
    batches_per_epoch = len(loader)
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=t.lr, total_steps=max(1, n_epochs * steps_per_epoch)
    )
    grad_scaler = torch.amp.GradScaler("cuda", enabled=amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    aug_gen = torch.Generator().manual_seed(seed + 1_000_003)
    y_val = val.y.numpy()
    if device.type == "cuda":
        train = train.to(device)
    p_full = p_imu = np.zeros((0, metric.N_CLASSES), dtype=np.float32)
    s_full = s_imu = float("nan")
    t_fold = time.perf_counter()
    for epoch in range(1, n_epochs + 1):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        uniforms = torch.rand(n_train, AUG_DRAWS + train.x_full.shape[2], generator=aug_gen)  # per sample
        model.train()
        optimizer.zero_grad(set_to_none=True)
        total_loss, seen = 0.0, 0
        for step, idx in enumerate(_tqdm(loader, desc=f"torch fold {fold} epoch {epoch}", unit="batch")):
            u = uniforms[idx]
            idx = idx.to(train.y.device)
            mb = train.mask[idx]
            xb = augment_batch(train.x_full[idx], train.x_imu[idx], mb, cfg, uniforms=u)
            yb = train.y[idx]
            with autocast_context(device, amp):
                loss = criterion(model(xb, mb).float(), yb)
            grad_scaler.scale(loss / t.grad_accum_steps).backward()
            if (step + 1) % t.grad_accum_steps == 0 or step + 1 == batches_per_epoch:
                grad_scaler.step(optimizer)
                grad_scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if scheduler.last_epoch < scheduler.total_steps:  # OneCycleLR raises past its last step
                    scheduler.step()
            total_loss += float(loss.detach()) * len(idx)
            seen += len(idx)
        total_loss, seen = distributed.all_reduce_sum([total_loss, seen])
        if not distributed.is_main():
            continue  # validation (for the log, and the final OOF) is rank 0's
        model.eval()
        scoring = distributed.unwrap(model) if distributed.is_distributed() else model  # no collectives in eval
        p_full = predict_arrays(scoring, val.x_full, val.mask, device, amp, t.batch_size * 2)
        p_imu = predict_arrays(scoring, val.x_imu, val.mask, device, amp, t.batch_size * 2)
        s_full = metric.score_proba(y_val, p_full)
        s_imu = metric.score_proba(y_val, p_imu)
        log.info(
            "torch fold %d epoch %d/%d: train loss %.4f, val score full %.4f imu %.4f (log only), lr %.2e, %.1f s, "
            "fold %s",
            fold,
            epoch,
            n_epochs,
            total_loss / max(seen, 1),
            s_full,
            s_imu,
            optimizer.param_groups[0]["lr"],
            time.perf_counter() - started,
            eta_text(epoch, n_epochs, time.perf_counter() - t_fold),
        )
    p_full, p_imu, s_full, s_imu = distributed.broadcast_object((p_full, p_imu, s_full, s_imu))
    return FoldFit(unwrap_state_dict(model), n_epochs, s_full, s_imu, p_full, p_imu)


def save_checkpoint(path: Path, model_args: dict[str, Any], state_dict: Mapping[str, torch.Tensor]) -> None:
    """A fold's checkpoint carries its constructor arguments beside the weights (tensors and plain values only)."""
    write_checkpoint(path, {"model_args": dict(model_args), "state_dict": strip_module_prefix(state_dict)})


def load_checkpoint(path: Path, device: torch.device, fallback_args: dict[str, Any]) -> nn.Module:
    """Rebuild a fold's network from its checkpoint (``weights_only``: a bundle is data, never code).

    Bundles written before checkpoints carried their arguments hold a bare state dict;
    those take the arguments from ``metadata.json`` (``fallback_args``).
    """
    obj = read_checkpoint(path, device)
    if isinstance(obj, Mapping) and "state_dict" in obj and "model_args" in obj:
        args, state = obj["model_args"], obj["state_dict"]
    else:
        args, state = fallback_args, obj
    if not isinstance(args, Mapping) or not isinstance(state, Mapping):
        raise bundle.BundleError(f"{path}: not a checkpoint of this member (model_args / state_dict not mappings)")
    args = dict(args)
    if args.get("n_channels") != len(features.FRAME_FEATURES):
        raise bundle.BundleError(
            f"{path}: model expects {args.get('n_channels')} channels, features give {len(features.FRAME_FEATURES)}"
        )
    return build_model(path, lambda a: TimeSeriesNet(**a), args, strip_module_prefix(state), device)


class TorchPipeline(TorchMemberPipeline):
    """``TimeSeriesNet`` per fold; one checkpoint per fold in the bundle."""

    name = MEMBER
    supports_ddp = True  # torchrun: DistributedDataParallel over the ranks (distributed.py)
    code_modules = ("torch_pipeline", "timeseries_model", "torch_common", "distributed")  # code in the fingerprint

    def prepare(self, data: TrainingData, cfg: Config) -> TorchContext:
        device = select_device(cfg)
        model_args = model_args_from_config(len(data.table.feature_names), cfg)
        log.info(
            "torch member: %d sequences, %d channels, device %s, %d epochs",
            data.n_sequences,
            len(data.table.feature_names),
            device,
            epochs_for(cfg),
        )
        return TorchContext(device, model_args)

    def fit_fold(self, ctx: TorchContext, data: TrainingData, split: FoldSplit, cfg: Config, work: Path) -> FoldResult:
        scaler = fit_fold_scaler(data, split)  # training folds only
        pad_len = features.resolve_pad_len(data.table.lengths[split.train], cfg.features)
        train_arr = build_fold_arrays(data.table, data.imu_table, split.train, data.y, pad_len, scaler)
        val_arr = build_fold_arrays(data.table, data.imu_table, split.valid, data.y, pad_len, scaler)
        result = train_fold(split.fold, train_arr, val_arr, ctx.model_args, cfg, ctx.device)
        save_checkpoint(work / fold_file(split.fold), ctx.model_args, result.state_dict)
        record = {
            "epochs": result.epochs,
            "score_full": result.score_full,
            "score_imu": result.score_imu,
            "score_mean": result.score_mean,
            "pad_len": int(pad_len),
            "scaler": scaler.to_dict(),
        }
        return FoldResult(result.proba_full, result.proba_imu, record)

    def summary_extra(self, ctx: TorchContext, records: dict[int, dict], cfg: Config) -> dict[str, Any]:
        return {"epochs": epochs_for(cfg), "folds": {str(k): fold_scores(r, "epochs") for k, r in records.items()}}

    def bundle_extra(self, ctx: TorchContext, records: dict[int, dict], cfg: Config) -> dict[str, Any]:
        return {
            **self.torch_bundle_fields(ctx, records, "epochs"),
            "epochs": {str(k): records[k]["epochs"] for k in sorted(records)},  # fixed: the final weights are kept
        }

    def load(self, bundle_dir: Path, cfg: Config) -> TorchMember:
        return load_member(bundle_dir, cfg)


# ----------------------------------------------------------------------------- prediction


class TorchMember(TorchFoldMember):
    """Every fold's network, built once and kept in memory in eval mode; softmax averaged over folds.

    IMU-only sequences need no special case: their ToF/THM columns are the
    missing-modality values, exactly what the IMU-only training view holds.
    """

    member = MEMBER

    def __init__(
        self,
        models: list[nn.Module],
        scalers: list[features.ScalerStats],
        pad_lens: list[int],
        feature_names: tuple[str, ...],
        device: torch.device,
        amp: bool,
        metadata: dict[str, Any],
    ) -> None:
        super().__init__(pad_lens, feature_names, device, amp, metadata)
        self.models = models
        self.scalers = scalers

    def chunk_proba(self, table: features.FrameTable, idx: np.ndarray) -> np.ndarray:
        acc = np.zeros((len(idx), metric.N_CLASSES), dtype=np.float64)
        for model, scaler, pad_len in zip(self.models, self.scalers, self.pad_lens):
            x, mask = features.pad_batch(table, idx, pad_len, scaler)
            # The network ignores padding (tested), so drop the columns no sequence here uses.
            keep = max(int(mask.sum(axis=1).max()), 1)
            xb = torch.from_numpy(np.ascontiguousarray(x[:, -keep:])).to(self.device)
            mb = torch.from_numpy(np.ascontiguousarray(mask[:, -keep:])).to(self.device)
            with autocast_context(self.device, self.amp):
                logits = model(xb, mb)
            acc += torch.softmax(logits.float(), dim=1).cpu().numpy()
        return acc / len(self.models)


def load_member(bundle_dir: Path, cfg: Config) -> TorchMember:
    """Read and check the bundle, build every fold's model once (eval mode, on the device)."""
    fb = read_fold_bundle(TorchPipeline(), bundle_dir)
    model_args = fb.field("model_args", dict)
    scalers = []
    for fold in fb.folds:  # every field checked before any file is opened
        d = fb.field(("scalers", str(fold)), dict)
        scalers.append(bundle.parse_field(fb.where, f"scalers.{fold}", features.ScalerStats.from_dict, d))
    device, models = fb.load_models(lambda path, dev: load_checkpoint(path, dev, model_args), cfg)
    amp = amp_enabled(device, cfg)
    return TorchMember(models, scalers, fb.pad_lens, tuple(fb.meta["feature_names"]), device, amp, fb.meta)


__all__ = [
    "MEMBER",
    "TorchMember",
    "TorchPipeline",
    "load_member",
    "amp_enabled",
    "unwrap_state_dict",
    "augment_batch",
    "build_fold_arrays",
    "predict_arrays",
    "save_checkpoint",
    "load_checkpoint",
    "train_fold",
]
