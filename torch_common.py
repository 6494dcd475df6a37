"""The torch kit: what both torch members (``torch``, ``branchnet``) share.

Device choice and AMP, seeding, state-dict and version hygiene; the pad side and prediction chunk
size; softmax over padded arrays in batches (the validation passes) and over a frame table in
length-ordered chunks (serving); checkpoint files that carry their constructor arguments beside the
weights; the fold bundle reader and the model loader with their errors; the pipeline base with the
hooks both members answer alike. Kept apart from the pipelines so that no pipeline imports another
(tests/test_main.py).
"""

from __future__ import annotations

import contextlib
import logging
import random
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

import bundle
import features
import io_utils
import metric
import threads
from config import Config
from member_base import MemberPipeline

PAD_SIDE = "left"  # features.pad_batch keeps the tail and pads at the front
PREDICT_CHUNK = 256  # sequences per forward pass at prediction time
SCORE_KEYS = ("score_full", "score_imu", "score_mean")  # a fold's scores, as summaries and bundles list them

log = logging.getLogger(__name__)

M = TypeVar("M")


# ----------------------------------------------------------------------------- device, AMP, seeds


def is_available() -> tuple[bool, str]:
    """torch is imported at module top, so reaching this means it is installed."""
    return True, f"torch {torch.__version__}"


def select_device(cfg: Config) -> torch.device:
    """CUDA when available, else CPU with ``cfg.run.n_threads`` intra-op threads."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    torch.set_num_threads(threads.n_threads(cfg))
    return torch.device("cpu")


def use_amp(device: torch.device, setting: bool) -> bool:
    """AMP only ever on CUDA (CPU autocast to bfloat16 is slower here and changes numerics)."""
    return bool(setting) and device.type == "cuda"


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """float16 autocast on CUDA when enabled; a no-op context otherwise (AMP is never used on CPU)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- state dicts


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that nn.DataParallel / DDP add, so bundles load into a bare model."""
    prefix = "module."
    return OrderedDict((k[len(prefix) :] if k.startswith(prefix) else k, v) for k, v in state_dict.items())


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``model``'s weights and buffers (detached: later training steps leave it alone)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def warn_if_other_torch(member: str, bundle_dir: Path, meta: Mapping[str, Any]) -> None:
    """A bundle written by another torch version usually loads; say so, since numerics may differ."""
    if meta.get("torch_version") != torch.__version__:
        log.warning(
            "%s bundle %s was written by torch %s, running torch %s",
            member,
            bundle_dir,
            meta.get("torch_version"),
            torch.__version__,
        )


# ----------------------------------------------------------------------------- prediction


@torch.inference_mode()
def softmax_batches(
    n: int,
    batch_size: int,
    inputs: Callable[[slice], Sequence[Any]],
    forward: Callable[..., torch.Tensor],
    device: torch.device,
    amp: bool,
) -> np.ndarray:
    """(n, 18) float32 softmax of ``forward(*inputs(rows))`` over row slices of ``batch_size``.

    ``inputs`` builds one batch's tensors on the device (outside autocast); ``forward`` returns its
    logits (B, 18). The model must already be in eval mode.
    """
    out = []
    for start in range(0, n, batch_size):
        args = inputs(slice(start, start + batch_size))
        with autocast_context(device, amp):
            logits = forward(*args)
        out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    if not out:
        return np.zeros((0, metric.N_CLASSES), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


def predict_in_length_order(
    member: str,
    feature_names: tuple[str, ...],
    table: features.FrameTable,
    chunk_proba: Callable[[np.ndarray], np.ndarray],
    chunk: int = PREDICT_CHUNK,
) -> np.ndarray:
    """(n_seq, 18) float32 probabilities of ``table``, ``chunk_proba(idx)`` over chunks of similar lengths.

    The sequences are taken shortest first (stable), so a chunk's common padding is as large as it can
    be and a member that trims it saves the most work; ``chunk_proba`` returns the chunk's (len(idx), 18)
    probabilities (its models' mean), under ``torch.inference_mode``. A table whose frame features
    differ from the bundle's (``feature_names``) is a ValueError naming the first difference.
    """
    if tuple(table.feature_names) != tuple(feature_names):
        diff = bundle.diff_list("feature_names", list(feature_names), list(table.feature_names))
        raise ValueError(f"{member} member: frame features differ from the bundle's ({diff})")
    n = table.n_sequences
    proba = np.zeros((n, metric.N_CLASSES), dtype=np.float64)
    if n == 0:
        return proba.astype(np.float32)
    order = np.argsort(table.lengths, kind="stable")
    with torch.inference_mode():
        for start in range(0, n, chunk):
            idx = order[start : start + chunk]
            proba[idx] = chunk_proba(idx)
    return proba.astype(np.float32)


class TorchFoldMember(ABC):
    """A loaded torch member: every fold's models built once, kept in memory in eval mode on ``device``.

    ``predict_proba`` runs ``chunk_proba`` over length-ordered chunks (``predict_in_length_order``).
    """

    member: ClassVar[str]  # the member's name, for messages

    def __init__(
        self,
        pad_lens: list[int],
        feature_names: tuple[str, ...],
        device: torch.device,
        amp: bool,
        metadata: dict[str, Any],
    ) -> None:
        self.pad_lens = pad_lens
        self.feature_names_ = tuple(feature_names)
        self.classes_ = metric.GESTURES
        self.device = device
        self.amp = amp
        self.metadata = metadata

    @abstractmethod
    def chunk_proba(self, table: features.FrameTable, idx: np.ndarray) -> np.ndarray:
        """(len(idx), 18) probabilities of ``table``'s sequences ``idx``: the mean over the member's models."""

    def predict_proba(self, table: features.FrameTable) -> np.ndarray:
        """(n_seq, 18) float32 probabilities in ``metric.GESTURES`` order."""
        return predict_in_length_order(
            self.member, self.feature_names_, table, lambda idx: self.chunk_proba(table, idx)
        )


# ----------------------------------------------------------------------------- checkpoints


def fold_file(fold: int) -> str:
    """The name of fold ``fold``'s checkpoint in a torch member's bundle."""
    return f"fold{fold}.pt"


def write_checkpoint(path: Path, checkpoint: Mapping[str, Any]) -> None:
    """Save a checkpoint (a dict of tensors and plain values: ``model_args`` beside the weights), atomically."""
    with io_utils.atomic_path(path) as tmp:
        torch.save(dict(checkpoint), tmp)


def read_checkpoint(path: Path, device: torch.device) -> Any:
    """The object of a checkpoint file, read with ``weights_only`` (a bundle is data, never code)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file raises many kinds of error)
        raise bundle.BundleError(f"{path}: not a readable torch checkpoint: {type(e).__name__}: {e}") from None


def build_model(
    path: Path,
    build: Callable[..., nn.Module],
    args: dict[str, Any],
    state: Mapping[str, torch.Tensor],
    device: torch.device,
) -> nn.Module:
    """``build(args)`` with ``state`` loaded (strict), on ``device`` in eval mode; a BundleError naming
    ``path`` when the arguments do not build the network or the weights do not fit it."""
    try:
        model = build(args)
    except (TypeError, ValueError, KeyError) as e:
        raise bundle.BundleError(
            f"{path}: model arguments {args} do not build the network ({type(e).__name__}: {e})"
        ) from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise bundle.BundleError(f"{path}: weights do not fit the model {args}: {e}") from None
    return model.to(device).eval()


# ----------------------------------------------------------------------------- bundles


@dataclass(frozen=True)
class FoldBundle:
    """A torch member's bundle with its common fields checked: per fold, the checkpoint and the pad length."""

    member: str
    dir: Path
    meta: dict[str, Any]
    folds: list[int]
    files: list[str]
    pad_lens: list[int]

    @property
    def where(self) -> Path:
        return self.dir / bundle.METADATA_FILE

    def field(self, key: str | tuple[str | int, ...], kind: type | tuple[type, ...], **kwargs: Any) -> Any:
        """``bundle.field`` on this bundle's metadata (a BundleError naming the file and the field)."""
        return bundle.field(self.meta, key, kind, self.where, **kwargs)

    def load_models(self, load: Callable[[Path, torch.device], M], cfg: Config) -> tuple[torch.device, list[M]]:
        """The device and ``load(checkpoint, device)`` per fold. Call it once every field is checked: the
        model files are opened only here, through ``bundle.sealed_file`` (sealed, inside the bundle,
        digest checked before torch reads it)."""
        warn_if_other_torch(self.member, self.dir, self.meta)
        device = select_device(cfg)
        return device, [load(bundle.sealed_file(self.dir, self.meta, name), device) for name in self.files]


def read_fold_bundle(pipeline: MemberPipeline, bundle_dir: Path) -> FoldBundle:
    """``pipeline.read_bundle`` (classes, features, seal, fold files, pad side), then the fields every
    torch bundle has: ``folds``, per fold ``fold_files`` and ``pad_len`` (at least 1), ``model_args``."""
    bundle_dir = Path(bundle_dir)
    meta = pipeline.read_bundle(bundle_dir, features.FRAME_FEATURES, pad_side=PAD_SIDE)
    where = bundle_dir / bundle.METADATA_FILE
    folds = bundle.field(meta, "folds", list, where, items=int)
    names, pad_lens = [], []
    for fold in folds:
        names.append(bundle.field(meta, ("fold_files", str(fold)), str, where))
        pad_lens.append(bundle.field(meta, ("pad_len", str(fold)), int, where))
        if pad_lens[-1] < 1:
            raise bundle.BundleError(f"{where}: field pad_len.{fold} is {pad_lens[-1]}, expected at least 1")
    bundle.field(meta, "model_args", dict, where)
    return FoldBundle(pipeline.name, bundle_dir, meta, folds, names, pad_lens)


def fold_scores(record: Mapping[str, Any], *extra: str) -> dict[str, Any]:
    """A fold record's ``extra`` fields and scores (``SCORE_KEYS``), for summaries and bundles."""
    return {k: record[k] for k in (*extra, *SCORE_KEYS)}


@dataclass
class TorchContext:
    """What ``prepare`` hands the other hooks: the device and the network's constructor arguments."""

    device: torch.device
    model_args: dict[str, Any]


class TorchMemberPipeline(MemberPipeline):
    """The hooks both torch members answer alike; one checkpoint per fold (``fold_file``)."""

    packages = ("torch",)

    def is_available(self) -> tuple[bool, str]:
        return is_available()

    def fold_files(self, fold: int) -> list[str]:
        return [fold_file(fold)]

    def torch_bundle_fields(self, ctx: TorchContext, records: dict[int, dict], *score_extra: str) -> dict[str, Any]:
        """The bundle fields every torch member writes (``read_fold_bundle`` reads them back)."""
        folds = sorted(records)
        return {
            "model_args": ctx.model_args,
            "fold_files": {str(k): fold_file(k) for k in folds},
            "pad_len": {str(k): int(records[k]["pad_len"]) for k in folds},
            "pad_side": PAD_SIDE,
            "scalers": {str(k): records[k]["scaler"] for k in folds},  # the statistics used in training (or None)
            "torch_version": torch.__version__,
            "fold_scores": {str(k): fold_scores(records[k], *score_extra) for k in folds},
        }
