"""Typed configuration with environment overrides.

Every setting lives in one of the dataclasses below; nothing is read from the
environment anywhere else. ``load_config()`` applies overrides:

* hyper-parameters by ``<PREFIX><FIELD>`` (``LGBM_NUM_LEAVES``, ``TORCH_EPOCHS``,
  ``KERAS_EPOCHS``, ``CMI_SEED`` ...); a member's prefix is its section name
  upper-cased (section ``torch`` -> ``TORCH_``);
* for every member section (a ``MemberConfig``): the original notebook's
  switches ``USE_<MEMBER>`` and ``<MEMBER>_TRAIN``, and its default blend weight
  ``ENSEMBLE_W_<MEMBER>``, all derived from the section, plus ``STRICT``;
* the older ``DL_*`` names of the torch section, and the former names of
  ``deprecated_variables`` (``KERAS_MAX_EPOCHS``, ``<M>_EARLY_EXIT_IF_BEST_EXISTS``),
  kept as documented aliases that log a warning.

A new member adds one ``MemberConfig`` dataclass and one ``Config`` field; its
prefix, switches and weight variable follow from them.

Each section describes itself: a field's doc is the string right below it
(``field_docs``; docs/SETTINGS.md and the README's short table are rendered
from them by ``settings_markdown``), its rules are its ``checks()`` (``validate``
gathers them; a message names the variable and its value), and ``resolved()``
makes deferred values explicit (BranchNet's preset, ``Config.resolved``).

A variable with one of our prefixes that names no field, or a value that does
not parse as the field's type, raises ``ConfigError`` naming the variable.
Variables that belong to the libraries themselves (``KERAS_HOME``,
``KERAS_BACKEND``) are left alone. This module imports nothing of ours; torch
only inside ``auto_preset``, when a config is resolved.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import tempfile
import textwrap
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An environment override or config value that cannot be used."""


# A rule on one field's value: (field, holds, what the value must be). ``what`` may name other fields of the
# section as ``{field}``: the message shows their variables.
Rule = tuple[str, bool, str]


class Section:
    """What every settings section has: rules on its values (``checks``) and a resolution step (``resolved``).

    A field's doc is the string literal right below it (an attribute docstring, as Sphinx and IDEs read
    them); ``field_docs`` collects them and ``settings_markdown`` renders docs/SETTINGS.md from them.
    """

    def checks(self) -> list[Rule]:
        """The rules on this section's values (values that parse but make no sense break one)."""
        return []

    def resolved(self) -> Self:
        """A copy with every "take it from elsewhere" value made explicit; here: an unchanged copy."""
        return copy.deepcopy(self)


@dataclass
class RunConfig(Section):
    """Paths, folds and seeds shared by every stage (prefix ``CMI_``)."""

    data_dir: str = ""
    """competition layout: train.csv, test.csv, *_demographics.csv"""
    out_dir: str = "outputs"
    """where every output goes (`--out`)"""
    bundle_dir: str = ""
    """where trained bundles are read from; defaults to <out_dir>/bundles"""
    n_folds: int = 5
    """subject-grouped folds (`folds.csv`)"""
    seed: int = 42
    """model seeds (initialisation, bagging, augmentation), the gateway's order; not the folds"""
    fold_seed: int = 42
    """the subject-grouped folds: fixed while `CMI_SEED` varies, so seeds are compared on equal folds"""
    debug: bool = False
    """tiny epochs/rounds: covers every stage in minutes"""
    profile: str = "full"
    """`full`: every field at its default (what training on the real data should use); `quick`: the
    newcomer's `make run` sizes (`PROFILES`: fewer epochs and rounds, narrower networks, folds two at a
    time) — set before any other variable, which wins over it; the effective values go to `config.json`"""
    n_threads: int = 0
    """0 = auto: the cores this process may use (threads.py); CMI_N_THREADS=k fixes k"""
    strict: bool = False
    """STRICT=1: a member failing on a sequence raises instead of being skipped"""
    # How the (member, fold) training jobs run (executors.py). None of these changes what is trained,
    # so none is part of a bundle's fingerprint.
    executor: str = "local"
    """how the (member, fold) training jobs run (`--executor`): `local` in this process (or `CMI_N_JOBS`
    processes), `ray` as Ray tasks (`pip install -r requirements-ray.txt`)"""
    n_jobs: int = 1
    """local executor: folds trained at once in separate processes (joblib); 1 = in this process"""
    ray_address: str = ""
    """ray executor: the cluster to join (`ray.init(address=...)`, e.g. `ray://head:10001` or `auto`);
    empty = start a local Ray"""
    job_cpus: int = 1
    """CPUs each job asks Ray for; also its thread count under `ray` or `CMI_N_JOBS` > 1"""
    job_gpus: float = 0.0
    """GPUs each Ray job asks for (fractions share one GPU)"""
    ddp_timeout_min: int = 60
    """under `torchrun`: minutes a rank waits at a collective (e.g. while rank 0 alone trains a member
    without DDP)"""
    kaggle_input: str = "/kaggle/input"
    """Kaggle: where datasets are attached; searched for a `bundles/` folder when `CMI_BUNDLE_DIR` is unset
    (the hidden-test re-run starts with an empty working folder)"""
    rerun_train: str = "lgbm"
    """Kaggle re-run with no loadable bundle: these members (comma-separated) are trained at debug size so
    the submission is not lost (minutes; the gateway waits 15 min for the server); `""` = stop with a
    message"""

    def resolved_bundle_dir(self) -> Path:
        return Path(self.bundle_dir) if self.bundle_dir else Path(self.out_dir) / "bundles"

    def checks(self) -> list[Rule]:
        return [
            ("n_folds", self.n_folds >= 2, "must be at least 2"),
            ("profile", self.profile in PROFILES, f"must be one of {', '.join(PROFILES)}"),
            ("n_threads", self.n_threads >= 0, "must be >= 0 (0 = every core this process may use)"),
            ("executor", self.executor in ("local", "ray"), "must be 'local' or 'ray'"),
            ("n_jobs", self.n_jobs >= 1, "must be >= 1"),
            ("job_cpus", self.job_cpus >= 1, "must be >= 1"),
            ("job_gpus", self.job_gpus >= 0, "must be >= 0"),
            ("ddp_timeout_min", self.ddp_timeout_min >= 1, "must be >= 1"),
        ]


@dataclass
class FeatureConfig(Section):
    """Frame features, padding and aggregates (prefix ``FEAT_``)."""

    pad_len: int = 0
    """0 = the `FEAT_PAD_PERCENTILE` percentile of training lengths"""
    pad_percentile: float = 95.0
    """pad length percentile when `FEAT_PAD_LEN=0`"""
    min_pad_len: int = 32
    """smallest pad length"""
    tail_fraction: float = 0.4
    """aggregates also over the final part of a sequence (the gesture)"""
    dt: float = 0.1
    """seconds between samples (~10 Hz)"""
    mirror_left_handed: bool = True
    """map left-hand wearers onto the right-hand signal (needs demographics)"""
    rot_fallback: str = "gravity"
    """a sequence without rotation: `gravity` estimates tilt from low-passed acceleration, `identity`
    assumes none"""
    gravity_window: int = 5
    """samples (0.5 s at 10 Hz) of the gravity low-pass; least tilt error at 3-5 (generated)"""

    def checks(self) -> list[Rule]:
        return [
            ("pad_len", self.pad_len >= 0, "must be >= 0 (0 = percentile of training lengths)"),
            ("pad_percentile", 0 < self.pad_percentile <= 100, "must be in (0, 100]"),
            ("tail_fraction", 0 < self.tail_fraction <= 1, "must be in (0, 1]"),
            ("dt", self.dt > 0, "must be positive"),
            ("rot_fallback", self.rot_fallback in ("gravity", "identity"), "must be 'gravity' or 'identity'"),
            ("gravity_window", self.gravity_window >= 1, "must be >= 1"),
        ]


@dataclass
class MemberConfig(Section):
    """What every member section has: its switches, where its bundle is read from, its default blend weight.

    None of these fields changes what is trained (``SWITCH_FIELDS``), so none is part of a bundle's fingerprint.
    """

    use: bool = True
    """fitted into the blend and served (0: neither, nor trained by default)"""
    train: bool = True
    """trained by `train` / the notebook"""
    weight: float = 0.0
    """blend weight used only without a fitted `ensemble/weights.json`"""
    bundle_path: str = ""
    """read this member's bundle from this folder instead of <bundle dir>/<member> (e.g. an attached
    Kaggle dataset)"""
    folds_in_memory: bool = True
    """0: the original notebooks' low-memory mode: every `predict()` call reloads each fold from disk
    (logged at start-up; `main.py bench` measures it)"""
    fail_if_missing: bool = False
    """1: a missing or unloadable bundle stops start-up with an error naming it, instead of a logged,
    renormalised blend without it"""
    skip_if_trained: bool = True
    """`train` skips the member when its bundle is complete for the same data, folds, settings and code
    (`train --force` retrains)"""

    def checks(self) -> list[Rule]:
        return [("weight", self.weight >= 0, "must be >= 0")]


SWITCH_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MemberConfig))


@dataclass
class LGBMConfig(MemberConfig):
    """LightGBM member (prefix ``LGBM_``)."""

    weight: float = 0.20
    num_leaves: int = 15
    """leaves per tree"""
    learning_rate: float = 0.07
    """shrinkage per boosting round"""
    n_estimators: int = 400
    """boosting rounds at most (18 trees a round: more cost latency and bundle size for little gain)"""
    stopping: str = "inner"
    """`inner`: early stopping on a subject-grouped inner split of the training folds picks the rounds,
    then a refit on all of them; `fixed`: `LGBM_N_ESTIMATORS` rounds. Never the scored fold"""
    inner_folds: int = 4
    """the inner validation split is one of this many subject-grouped folds"""
    early_stopping_rounds: int = 40
    """patience of the early stopping on the inner split (`LGBM_STOPPING=inner`)"""
    min_child_samples: int = 10
    """fewest sequences in a leaf"""
    feature_fraction: float = 0.5
    """share of the features each tree may split on"""
    bagging_fraction: float = 0.8
    """share of the training sequences each bagging round draws"""
    bagging_freq: int = 1
    """redraw the bagging sample every k rounds (0 = no bagging)"""
    lambda_l2: float = 1.0
    """L2 penalty on leaf values"""
    debug_n_estimators: int = 60
    """boosting rounds under `CMI_DEBUG=1`"""

    def checks(self) -> list[Rule]:
        return super().checks() + [
            ("learning_rate", self.learning_rate > 0, "must be positive"),
            ("stopping", self.stopping in ("inner", "fixed"), "must be 'inner' or 'fixed'"),
            ("inner_folds", self.inner_folds >= 2, "must be >= 2"),
        ]


@dataclass
class TorchConfig(MemberConfig):
    """PyTorch member (prefix ``TORCH_``; the older ``DL_`` prefix is an alias)."""

    weight: float = 0.45
    epochs: int = 30
    """epochs per fold, every one run (one-cycle learning rate; the last epoch's weights are kept)"""
    batch_size: int = 64
    """training batch (split over the ranks under `torchrun`)"""
    lr: float = 1e-3
    """peak learning rate of the one-cycle schedule (AdamW)"""
    weight_decay: float = 1e-2
    """AdamW weight decay"""
    dropout: float = 0.2
    """dropout in the network"""
    label_smoothing: float = 0.05
    """label smoothing of the cross-entropy"""
    grad_accum_steps: int = 1
    """batches whose gradients are summed before each optimiser step"""
    conv1_channels: int = 128
    """channels of the first Conv1d"""
    conv2_channels: int = 256
    """channels of the second Conv1d"""
    rnn_hidden: int = 128
    """hidden size per direction of the BiLSTM and the BiGRU"""
    head_hidden: int = 256
    """hidden units of the classification head"""
    modality_dropout: float = 0.4
    """share of training samples shown with thm/tof removed (the IMU-only view)"""
    time_mask_prob: float = 0.3
    """share of training samples with one span of up to 10 % of their steps zeroed"""
    channel_dropout_prob: float = 0.1
    """chance of each input channel being zeroed in a training sample"""
    amp: bool = True
    """mixed precision; only ever on CUDA"""
    data_parallel: bool = True
    """DataParallel; only when more than one GPU"""
    debug_epochs: int = 2
    """epochs under `CMI_DEBUG=1`"""

    def checks(self) -> list[Rule]:
        return super().checks() + [
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum_steps", self.grad_accum_steps >= 1, "must be >= 1"),
            ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("modality_dropout", 0 <= self.modality_dropout <= 1, "must be in [0, 1]"),
        ]


DLConfig = TorchConfig  # the class's former name


@dataclass
class KerasConfig(MemberConfig):
    """Keras member (prefix ``KERAS_``)."""

    weight: float = 0.35
    epochs: int = 40
    """epochs per fold, every one run: no early stopping on the fold whose OOF is scored"""
    batch_size: int = 64
    """training batch"""
    lr: float = 1e-3
    """initial learning rate (Adam)"""
    lr_min_ratio: float = 0.05
    """cosine decay from `KERAS_LR` to `KERAS_LR` × this over all epochs"""
    dropout: float = 0.3
    """dropout in both branches and the head"""
    label_smoothing: float = 0.1
    """label smoothing of the cross-entropy"""
    imu_filters: tuple[int, ...] = (128, 256, 256)
    """filters of the IMU branch's residual SE blocks, one per block"""
    imu_kernels: tuple[int, ...] = (7, 5, 3)
    """kernel sizes of those blocks, one per block"""
    tof_filters: tuple[int, ...] = (64, 128)
    """filters of the ToF/thermopile branch's conv blocks"""
    rnn_units: int = 128
    """units per direction of the BiLSTM and BiGRU (the IMU-only light model: half)"""
    debug_epochs: int = 2
    """epochs under `CMI_DEBUG=1`"""

    def checks(self) -> list[Rule]:
        return super().checks() + [
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("lr_min_ratio", 0 <= self.lr_min_ratio <= 1, "must be in [0, 1]"),
            ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            (
                "imu_kernels",
                len(self.imu_kernels) == len(self.imu_filters),
                "must have as many values as {imu_filters}",
            ),
        ]


@dataclass
class BranchNetConfig(MemberConfig):
    """BranchNet member (prefix ``BRANCHNET_``): per-sensor-group first layers, a ToF 2-D CNN, auxiliary heads,
    mixup / time stretch / z-rotation / sensor dropout, a fixed cosine schedule, seeds per fold.

    Fields at 0 take the value of ``preset`` (``PRESETS``); any other value is used as given. ``resolved()``
    fills them in (``preset=auto`` becomes ``gpu`` when torch sees CUDA, else ``cpu``).
    """

    # The values of the fields left at 0. Explicit settings (any non-zero value) win over the preset.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # 12 generated subjects on a 2-core CPU: about 0.6x the torch member's training time at 10 epochs
        # (one epoch here costs ~0.6 of a torch epoch; docs/BRANCHNET_NOTES.md).
        "cpu": {
            "epochs": 10,
            "seeds": 1,
            "width": 64,
            "rnn_hidden": 64,
            "tof_channels": 8,
            "batch_size": 64,
            "ema_decay": 0.98,
        },
        # Real data on a GPU (Kaggle T4 / P100): the top teams' regime (60-220 epochs, several seeds).
        "gpu": {
            "epochs": 80,
            "seeds": 3,
            "width": 128,
            "rnn_hidden": 128,
            "tof_channels": 16,
            "batch_size": 64,
            "ema_decay": 0.999,
        },
    }
    NORMS: ClassVar[tuple[str, ...]] = ("batchnorm", "scaler")  # branchnet_model.NORMS (a test keeps them equal)

    weight: float = 0.0
    """blend weight used only without a fitted `ensemble/weights.json` (0: the three original members keep
    their default blend)"""
    preset: str = "auto"
    """`cpu` or `gpu`: the values of the `BRANCHNET_*` fields left at 0 (explicit values win); `auto`: `gpu`
    when torch sees CUDA, else `cpu` (resolved when training starts, logged, and saved in `config.json`)"""
    epochs: int = 0
    """fixed epochs per model, no early stopping"""
    seeds: int = 0
    """models per fold, their probabilities averaged for the OOF and at serving"""
    width: int = 0
    """channels of the IMU branch and the fusion; thermopiles get 1/4, ToF 1/2"""
    rnn_hidden: int = 0
    """BiGRU hidden size per direction"""
    tof_channels: int = 0
    """first-layer channels of the ToF grid CNN"""
    batch_size: int = 0
    """training batch"""
    ema_decay: float = 0.0
    """weight EMA decay per optimiser step"""
    lr: float = 3e-3
    """peak learning rate (AdamW), reached after the warm-up, then cosine decay to 1 % of it"""
    weight_decay: float = 1e-2
    """AdamW weight decay"""
    warmup_epochs: int = 1
    """linear learning-rate warm-up from 10 %"""
    dropout: float = 0.2
    """dropout before the GRU and in the head"""
    label_smoothing: float = 0.05
    """label smoothing of the gesture and 9-class losses"""
    norm: str = "batchnorm"
    """`batchnorm`: raw features into a first masked BatchNorm per branch (no fitted scaler); `scaler`: the
    training fold's scaler"""
    branches: bool = True
    """separate first layers per sensor group (IMU, thermopiles, ToF); 0: one first layer over every
    channel"""
    tof_cnn: bool = True
    """the raw 8×8 ToF grids through a 2-D CNN per frame and sensor; 0: ToF aggregates only"""
    mixup_alpha: float = 0.4
    """mixup weight drawn from Beta(α, α) (tails aligned)"""
    mixup_prob: float = 0.5
    """share of training batches mixed"""
    stretch: float = 0.5
    """time stretch factor drawn in [1 − s, 1 + s]"""
    stretch_prob: float = 0.5
    """share of training sequences stretched"""
    shift: float = 0.1
    """time shift: up to this share of a sequence's first steps dropped (the tail is kept)"""
    rotate_deg: float = 45.0
    """rotation of the world-frame vectors (linear acceleration) about world z, uniform in ±deg"""
    sensor_dropout: float = 0.5
    """share of training sequences shown as IMU-only (thm/tof zeroed, has-ToF flag off)"""
    aux_nine: float = 0.3
    """loss weight of the 9-class head (8 targets + non-target); 0 = no head"""
    aux_binary: float = 0.3
    """loss weight of the target vs non-target head; 0 = no head"""
    aux_orientation: float = 0.0
    """loss weight of the orientation head (train.csv's `orientation`; derived from the rest-pose gravity
    direction when the data have no such column); 0 = no head, the default: it cost 0.007 test-like on
    generated data (docs/RESULTS.md; the 1st-place write-up used 0.5 on real data)"""
    aux_phase: float = 0.2
    """loss weight of the per-step phase head (train.csv's `phase`, Transition vs Gesture, at the GRU's
    quarter rate); 0 = no head"""
    ema: bool = False
    """1: serve and score the EMA of the weights (`BRANCHNET_EMA_DECAY`); 0: the final raw weights (the
    default: at the cpu preset's 10 epochs the EMA cost 0.016 test-like on generated data, docs/RESULTS.md;
    the write-ups' 0.999 over 60-220 epochs is unmeasured here)"""
    amp: bool = True
    """mixed precision; only ever on CUDA"""
    log_every: int = 5
    """score the validation fold every k epochs, for the log only (0 = never); nothing is selected on it"""
    debug_epochs: int = 2
    """epochs under `CMI_DEBUG=1`"""

    def checks(self) -> list[Rule]:
        presets = ", ".join(("auto", *self.PRESETS))
        return super().checks() + [
            ("preset", self.preset in ("auto", *self.PRESETS), f"must be one of {presets}"),
            ("norm", self.norm in self.NORMS, f"must be one of {', '.join(self.NORMS)}"),
            *((f, getattr(self, f) >= 0, "must be >= 0 (0 = the preset's)") for f in self.PRESETS["cpu"]),
            ("ema_decay", self.ema_decay < 1, "must be < 1 (0 = the preset's)"),
            ("log_every", self.log_every >= 0, "must be >= 0 (0 = never)"),
            ("debug_epochs", self.debug_epochs >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("warmup_epochs", self.warmup_epochs >= 0, "must be >= 0"),
            ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            *((f, 0 <= getattr(self, f) <= 1, "must be in [0, 1]") for f in _BRANCHNET_SHARES),
            ("stretch", 0 <= self.stretch < 1, "must be in [0, 1)"),
            ("mixup_alpha", self.mixup_alpha >= 0, "must be >= 0"),
            ("rotate_deg", self.rotate_deg >= 0, "must be >= 0"),
            *((f, getattr(self, f) >= 0, "must be >= 0 (0 = no head)") for f in _BRANCHNET_AUX),
        ]

    def resolved(self) -> BranchNetConfig:
        """A copy with ``preset=auto`` made ``cpu`` or ``gpu`` (logged) and every field left at 0 set from it."""
        out = copy.deepcopy(self)
        if out.preset == "auto":
            out.preset, why = auto_preset()
            log.info("BRANCHNET_PRESET=auto: %s (%s)", out.preset, why)
        if out.preset not in self.PRESETS:
            return out  # validate() names it
        for name, value in self.PRESETS[out.preset].items():
            if not getattr(out, name):
                setattr(out, name, value)
        return out


_BRANCHNET_SHARES = ("mixup_prob", "stretch_prob", "sensor_dropout", "shift")
_BRANCHNET_AUX = ("aux_nine", "aux_binary", "aux_orientation", "aux_phase")


def auto_preset() -> tuple[str, str]:
    """``("gpu", why)`` when torch sees a CUDA device, else ``("cpu", why)``; torch is imported here, lazily."""
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return "cpu", "torch is not installed"
    import torch

    if torch.cuda.is_available():
        return "gpu", f"torch sees CUDA: {torch.cuda.get_device_name(0)}"
    return "cpu", "torch sees no CUDA device"


@dataclass
class EnsembleConfig(Section):
    """Blending (prefix ``ENSEMBLE_``). Default member weights live in the member sections (``ENSEMBLE_W_<M>``)."""

    n_starts: int = 8
    """starts of the coordinate ascent over blend weights"""
    random_search_draws: int = 4096
    """draws of the original notebook's random weight search (reported beside ours)"""
    calibration_min_gain: float = 0.002
    """a class-bias calibration is kept only if it raises the cross-fitted OOF score by more than this"""
    subject_pp: bool = True
    """1: answer each sequence by the online assignment of its subject's sequences to the protocol slots
    learned from training (`subject_pp.py`); 0: plain argmax"""
    subject_pp_min_share: float = 0.8
    """share of training subjects that must follow a protocol for it to be used"""
    subject_pp_max_history: int = 400
    """sequences remembered per subject (bounded memory and cost per call)"""
    subject_pp_orders: int = 20
    """random arrival orders in the OOF simulation"""
    wear_detect: bool = True
    """1: detect subjects wearing the device rotated 180° about z and rotate their rows back, in training
    and at serving (`wear.py`); 0: off"""
    wear_correct_training: bool = True
    """rotate back the training subjects the detector finds (on serving's evidence: at least
    `ENSEMBLE_WEAR_MIN_SEQUENCES` sequences and summed held-out log-odds above the threshold)"""
    wear_min_sequences: int = 2
    """a subject is never taken as rotated on fewer sequences, in training as at serving"""
    wear_min_log_odds: float = 6.9
    """floor of the evidence threshold (summed log-odds; 6.9 = 1000:1)"""
    wear_threshold_margin: float = 1.5
    """threshold = margin x the highest evidence a held-out normal subject reached"""
    wear_max_train_share: float = 0.1
    """training rotates back at most max(1, ⌊share × subjects⌋) subjects; when more look rotated, none is
    rotated and a warning names the count (the real train set: 2 of 81, docs/REAL_DATA_FACTS)"""
    predict_threads: int = 0
    """serving: members answer each call concurrently in this many threads (LightGBM, torch and XLA run
    outside the GIL); 1 = one after another; 0 = one per member, at most the CPU count"""
    # Real sequences are a few hundred rows at most (p95 ~127), so 20,000 is ~30x the longest yet bounds one
    # call (~0.5 s, +0.06 GB with a LightGBM bundle here; uncut, 1e6 rows cost ~3 s and +2.6 GB in the input
    # repair alone, ~58 s / ~6.5 GB end to end).
    serve_max_rows: int = 20_000
    """serving: a longer sequence is cut to its last rows by `sequence_counter` before anything else
    (logged, counted, listed as degraded; `STRICT=1`: an error). Real sequences are a few hundred rows at
    most (p95 ≈ 127): 20,000 is ~30× the longest and still bounds one call's time and memory (README
    "Serving bounds")"""
    serve_max_subjects: int = 1000
    """serving: per-subject state (wear evidence, slot assignment) kept for at most this many subjects; the
    least recently seen is forgotten beyond it (counted, logged now and then). The hidden test has ~51
    subjects"""
    wear_max_history: int = 400
    """serving: sequence ids remembered per subject by the wear evidence (a retried id counts once among
    them); older sequences stay in the subject's summed evidence"""

    def checks(self) -> list[Rule]:
        return [
            ("subject_pp_min_share", 0 < self.subject_pp_min_share <= 1, "must be in (0, 1]"),
            ("subject_pp_max_history", self.subject_pp_max_history >= 1, "must be >= 1"),
            ("subject_pp_orders", self.subject_pp_orders >= 1, "must be >= 1"),
            ("wear_min_sequences", self.wear_min_sequences >= 1, "must be >= 1"),
            ("wear_threshold_margin", self.wear_threshold_margin >= 1, "must be >= 1"),
            ("wear_max_train_share", 0 < self.wear_max_train_share <= 1, "must be in (0, 1]"),
            ("serve_max_rows", self.serve_max_rows >= 1, "must be >= 1"),
            ("serve_max_subjects", self.serve_max_subjects >= 1, "must be >= 1"),
            ("wear_max_history", self.wear_max_history >= 1, "must be >= 1"),
        ]


# Named sets of values applied before the environment's variables (``CMI_PROFILE``; explicit variables win).
# ``quick`` sizes every member for the newcomer's `make run` (12 generated subjects, 2 CPU cores, about ten
# minutes with the install): its scores are below full training's, and the README says so.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {},
    "quick": {
        # two folds at a time, one thread each: small networks use two processes better than two threads
        "run": {"n_jobs": 2},
        # fixed rounds at a higher rate instead of the inner early-stopping split and its refit
        "lgbm": {"stopping": "fixed", "n_estimators": 120, "learning_rate": 0.12},
        "torch": {"epochs": 10, "conv1_channels": 64, "conv2_channels": 128, "rnn_hidden": 64, "head_hidden": 128},
        "keras": {
            "epochs": 10,
            "lr": 2e-3,
            "imu_filters": (48, 96, 96),
            "tof_filters": (24, 48),
            "rnn_units": 48,
        },
        "branchnet": {"epochs": 8},
    },
}
PROFILE_VARIABLE = "CMI_PROFILE"
PROFILE_USE: dict[str, str] = {
    "full": "training on the real data, `make run-full`, the Kaggle notebook (the default)",
    "quick": "`make run` (a newcomer's first run; lower scores than full training)",
}


def apply_profile(cfg: Config, name: str) -> Config:
    """Set the values of profile ``name`` on ``cfg`` (in place); an unknown name is a ConfigError."""
    if name not in PROFILES:
        raise ConfigError(f"{PROFILE_VARIABLE}={name!r}: must be one of {', '.join(PROFILES)}")
    cfg.run.profile = name
    for section_name, values in PROFILES[name].items():
        section = getattr(cfg, section_name)
        for key, value in values.items():
            if key not in _field_types(section):
                raise ConfigError(f"profile {name!r}: {section_name} has no field {key!r}")
            setattr(section, key, value)
    return cfg


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    lgbm: LGBMConfig = field(default_factory=LGBMConfig)
    torch: TorchConfig = field(default_factory=TorchConfig)
    keras: KerasConfig = field(default_factory=KerasConfig)
    branchnet: BranchNetConfig = field(default_factory=BranchNetConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def member_names(self) -> list[str]:
        """The member sections, in declaration order."""
        return [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), MemberConfig)]

    def member(self, name: str) -> MemberConfig:
        """The config section of member ``name``."""
        section = getattr(self, name, None)
        if not isinstance(section, MemberConfig):
            raise ConfigError(f"no config section for member {name!r}; member sections: {self.member_names()}")
        return section

    def resolved(self) -> Self:
        """A copy with every section resolved (``Section.resolved``: BranchNet's preset filled in), checked.

        What a run trains with and what its ``config.json`` shows; idempotent. The member scaffold
        resolves before training, ``main`` before writing the run's ``config.json`` (after the thread
        set-up: ``preset=auto`` imports torch, whose OpenMP runtime reads its settings when it loads).
        """
        out = copy.copy(self)
        for f in dataclasses.fields(self):
            setattr(out, f.name, getattr(self, f.name).resolved())
        validate(out)
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the effective config as JSON, atomically (config.py imports nothing of ours)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


# Sections that are not members, and their environment prefixes; a member's prefix is its name upper-cased.
FIXED_PREFIXES: dict[str, str] = {"run": "CMI_", "features": "FEAT_", "ensemble": "ENSEMBLE_"}
# Older prefixes that users' notebooks may still set: prefix -> section.
LEGACY_PREFIXES: dict[str, str] = {"DL_": "torch"}
STRICT_VARIABLE = "STRICT"


def prefixes(cfg: Config) -> dict[str, str]:
    """section -> environment prefix, for every section of ``cfg``."""
    return {**FIXED_PREFIXES, **{m: f"{m.upper()}_" for m in cfg.member_names()}}


def aliases(cfg: Config) -> dict[str, tuple[str, str]]:
    """Whole variable names that set one field: the original notebooks' switches, the weights, STRICT."""
    out: dict[str, tuple[str, str]] = {STRICT_VARIABLE: ("run", "strict")}
    for m in cfg.member_names():
        up = m.upper()
        out[f"USE_{up}"] = (m, "use")
        out[f"{up}_TRAIN"] = (m, "train")
        out[f"ENSEMBLE_W_{up}"] = (m, "weight")
        out[f"LOAD_{up}_FOLDS_IN_MEMORY"] = (m, "folds_in_memory")
        out[f"FAIL_IF_{up}_MISSING"] = (m, "fail_if_missing")
    return out


def deprecated_variables(cfg: Config) -> dict[str, tuple[str | None, str]]:
    """Former names users' notebooks may still set: name -> (the variable that replaced it, why).

    Each is accepted with one warning and sets its replacement; setting both is an error naming both.
    A replacement of None: the setting is gone and the value is ignored (with the warning).
    """
    names = variable_names(cfg)
    out: dict[str, tuple[str | None, str]] = {}
    for m in cfg.member_names():
        out[f"{m.upper()}_EARLY_EXIT_IF_BEST_EXISTS"] = (
            names[(m, "skip_if_trained")],
            "the original notebooks' name; no 'best' is kept any more: a bundle complete for the same data, "
            "folds, settings and code is skipped",
        )
    if "keras" in cfg.member_names():
        out["KERAS_MAX_EPOCHS"] = (names[("keras", "epochs")], "every epoch runs: there is no early stopping")
    if "torch" in cfg.member_names():
        for prefix in ("TORCH_", *(p for p, s in LEGACY_PREFIXES.items() if s == "torch")):
            out[f"{prefix}NUM_WORKERS"] = (
                None,
                "never read: the torch member's batches are index slices of tensors already in memory",
            )
    return out


# Variables of the original notebooks that our design replaces: accepted, mapped, and logged when set.
MAPPED_NOTE: dict[str, str] = {
    "FOLDS_IN_MEMORY": "0 = every predict() call reloads each fold from disk (slow; the benchmarks measure it)",
}
ENSEMBLE_WEIGHTS_VARIABLE = "ENSEMBLE_WEIGHTS"  # "member:weight,...": every member's weight at once
# Prefixes and suffixes users of the notebooks try: an unknown name under them is an error, never ignored.
WATCHED_PREFIXES: tuple[str, ...] = ("USE_", "LOAD_", "FAIL_IF_")
WATCHED_SUFFIXES: tuple[str, ...] = ("_TRAIN",)


def canonical_variables(cfg: Config) -> dict[str, tuple[str, str]]:
    """The one variable name of every setting (the ``DL_*`` aliases aside): name -> (section, field)."""
    out = dict(aliases(cfg))
    taken = set(out.values())
    for section, prefix in prefixes(cfg).items():
        for f in _field_types(getattr(cfg, section)):
            if (section, f) not in taken:
                out[prefix + f.upper()] = (section, f)
    return out


def variable_names(cfg: Config) -> dict[tuple[str, str], str]:
    """(section, field) -> the setting's variable (``canonical_variables`` the other way round)."""
    return {target: name for name, target in canonical_variables(cfg).items()}


def known_variables(cfg: Config) -> list[str]:
    """Every environment variable that sets something (deprecated names included)."""
    return sorted({*canonical_variables(cfg), ENSEMBLE_WEIGHTS_VARIABLE, *deprecated_variables(cfg)})


def _closest(name: str, cfg: Config) -> str:
    import difflib

    current = sorted({*canonical_variables(cfg), ENSEMBLE_WEIGHTS_VARIABLE})
    close = difflib.get_close_matches(name, current, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def parse_member_weights(name: str, raw: str, cfg: Config) -> dict[str, float]:
    """``"lgbm:0.4,torch:0.6"`` -> weights renormalised to sum 1; members not named get 0."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in raw.split(",") if p.strip()):
        member, sep, value = part.partition(":")
        member = member.strip().lower()
        if not sep:
            raise ConfigError(f"environment variable {name}={raw!r}: {part!r} is not member:weight")
        if member not in cfg.member_names():
            raise ConfigError(
                f"environment variable {name}: unknown member {member!r}; members: {', '.join(cfg.member_names())}"
            )
        weights[member] = parse_value(name, value, float)
    if not weights or sum(weights.values()) <= 0 or min(weights.values()) < 0:
        raise ConfigError(f"environment variable {name}={raw!r}: needs non-negative weights with a positive sum")
    total = sum(weights.values())
    return {m: weights.get(m, 0.0) / total for m in cfg.member_names()}


# Variables under our prefixes that belong to the libraries, not to us (PyTorch reads many TORCH_* ones).
FOREIGN: frozenset[str] = frozenset(
    {
        "KERAS_HOME",
        "KERAS_BACKEND",
        "KERAS_NUM_THREADS",
        "TORCH_HOME",
        "TORCH_LOGS",
        "TORCH_CUDA_ARCH_LIST",
        "TORCH_EXTENSIONS_DIR",
        "TORCH_SHOW_CPP_STACKTRACES",
        "TORCH_CPP_LOG_LEVEL",
        "TORCH_USE_CUDA_DSA",
        "TORCH_DISTRIBUTED_DEBUG",
        "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
        "TORCH_FORCE_WEIGHTS_ONLY_LOAD",
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",
        "TORCH_DISABLE_ADDR2LINE",
    }
)
FOREIGN_PREFIXES: tuple[str, ...] = ("TORCH_NCCL_", "TORCH_COMPILE_", "TORCH_CUDNN_", "TORCH_BLAS_", "TORCH_CUDA_")


def is_foreign(name: str) -> bool:
    return name in FOREIGN or name.startswith(FOREIGN_PREFIXES)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_value(name: str, raw: str, typ: Any) -> Any:
    """Parse ``raw`` as ``typ``; raise ConfigError naming ``name`` on failure."""
    text = raw.strip()
    try:
        if typ is bool:
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected 0/1/true/false")
        if typ is int:
            return int(text)
        if typ is float:
            value = float(text)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError("not a finite number")
            return value
        if typ is str:
            return raw
        if typing.get_origin(typ) is tuple:
            (inner, *_rest) = typing.get_args(typ)
            return tuple(parse_value(name, part, inner) for part in text.split(",") if part.strip())
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={raw!r} is not a valid {_type_name(typ)}: {e}") from None
    raise ConfigError(f"environment variable {name}: unsupported field type {typ!r}")


def _type_name(typ: Any) -> str:
    return getattr(typ, "__name__", str(typ))


def _field_types(section: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def apply_overrides(cfg: Config, env: Mapping[str, str]) -> Config:
    """Apply every override found in ``env`` to ``cfg`` (in place) and return it."""
    whole = aliases(cfg)
    by_prefix = [(p, s) for s, p in prefixes(cfg).items()] + list(LEGACY_PREFIXES.items())
    legacy = {p for p in LEGACY_PREFIXES}
    renamed = deprecated_variables(cfg)
    canonical_of = canonical_variables(cfg)
    if PROFILE_VARIABLE in env:  # first: every explicit variable below wins over the profile's values
        apply_profile(cfg, env[PROFILE_VARIABLE].strip())
    for old, (new, _why) in renamed.items():
        if old in env and new in env:
            raise ConfigError(f"{old} and {new} are both set: {old} is the former name of {new}; set only {new}")
    for name, raw in sorted(env.items()):
        if name == ENSEMBLE_WEIGHTS_VARIABLE:
            continue  # applied last, over every member at once
        if name in renamed:
            new, why = renamed[name]
            if new is None:
                log.warning("%s=%s is no longer a setting (%s): ignored", name, raw, why)
                continue
            log.warning("%s is the former name of %s (%s): set %s instead", name, new, why, new)
            section_name, field_name = canonical_of[new]
        elif name in whole:
            section_name, field_name = whole[name]
            note = next((v for k, v in MAPPED_NOTE.items() if name.endswith(k)), None)
            if note:
                log.info("%s=%s is mapped to %s.%s: %s", name, raw, section_name, field_name, note)
        else:
            matches = [(s, p) for p, s in by_prefix if name.startswith(p)]
            if is_foreign(name):
                continue
            if not matches:
                if name.startswith(WATCHED_PREFIXES) or name.endswith(WATCHED_SUFFIXES):
                    raise ConfigError(f"unknown environment variable {name}{_closest(name, cfg)}")
                continue
            section_name, prefix = max(matches, key=lambda m: len(m[1]))  # the most specific prefix
            field_name = name[len(prefix) :].lower()
            section = getattr(cfg, section_name)
            if field_name not in _field_types(section):
                known = ", ".join(prefix + f.upper() for f in _field_types(section))
                raise ConfigError(
                    f"unknown environment variable {name}{_closest(name, cfg)} (known {prefix}* variables: {known})"
                )
            canonical = next((v for v, target in whole.items() if target == (section_name, field_name)), None)
            if (
                canonical
                and canonical != name
                and not (prefix in legacy and canonical == f"TORCH_{field_name.upper()}")
            ):
                raise ConfigError(f"{name}: this setting's variable is {canonical}")
            if prefix in legacy:
                log.info("%s is the older name of %s%s", name, section_name.upper() + "_", field_name.upper())
        section = getattr(cfg, section_name)
        typ = _field_types(section)[field_name]
        setattr(section, field_name, parse_value(name, raw, typ))
    if ENSEMBLE_WEIGHTS_VARIABLE in env:
        single = [n for n in env if n.startswith("ENSEMBLE_W_")]
        if single:
            raise ConfigError(
                f"{ENSEMBLE_WEIGHTS_VARIABLE} and {', '.join(sorted(single))} both set blend weights: "
                "set one or the other"
            )
        for m, w in parse_member_weights(ENSEMBLE_WEIGHTS_VARIABLE, env[ENSEMBLE_WEIGHTS_VARIABLE], cfg).items():
            cfg.member(m).weight = w
    validate(cfg)
    return cfg


def env_text(value: Any) -> str:
    """``value`` as it is written in the environment: 1/0 for a bool, comma-separated for a tuple."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def problems(cfg: Config) -> list[str]:
    """What breaks a rule of some section (``Section.checks``), each naming the variable and its value."""
    names = variable_names(cfg)
    out = []
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        variables = {k: names.get((f.name, k), f"{f.name}.{k}") for k in _field_types(section)}
        for field_name, holds, what in section.checks():
            if not holds:
                value = getattr(section, field_name)
                shown = repr(value) if isinstance(value, str) else env_text(value)
                out.append(f"{variables[field_name]}={shown}: {what.format_map(variables)}")
    return out


def validate(cfg: Config) -> None:
    """Reject values that parse but make no sense: one ConfigError listing every broken rule."""
    found = problems(cfg)
    if found:
        raise ConfigError("; ".join(found))


def load_config(
    env: Mapping[str, str] | None = None, config_class: type[Config] | None = None, **run_overrides: Any
) -> Config:
    """The effective config: defaults, then environment overrides, then explicit run overrides (CLI)."""
    cfg = apply_overrides((config_class or Config)(), os.environ if env is None else env)
    for key, value in run_overrides.items():
        if value is None:
            continue
        if not hasattr(cfg.run, key):
            raise ConfigError(f"unknown run setting {key!r}")
        setattr(cfg.run, key, value)
    validate(cfg)
    return cfg


# Fields of earlier config.json layouts: the weights before they moved into the member sections, renamed
# fields (KERAS_MAX_EPOCHS -> KERAS_EPOCHS) and removed ones (None: dropped; TORCH_NUM_WORKERS was never read).
_LEGACY_FIELDS: dict[tuple[str, str], tuple[str, str] | None] = {
    ("ensemble", "w_lgbm"): ("lgbm", "weight"),
    ("ensemble", "w_torch"): ("torch", "weight"),
    ("ensemble", "w_keras"): ("keras", "weight"),
    ("keras", "max_epochs"): ("keras", "epochs"),
    ("torch", "num_workers"): None,
}


def config_from_dict(data: Mapping[str, Any], config_class: type[Config] | None = None) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. a saved config.json, older layouts included)."""
    cfg = (config_class or Config)()
    moved: dict[str, dict[str, Any]] = {}
    for (sec, key), target in _LEGACY_FIELDS.items():
        if key in (data.get(sec) or {}) and target is not None:
            new_sec, new_key = target
            moved.setdefault(new_sec, {})[new_key] = data[sec][key]
    data = {s: {k: v for k, v in vals.items() if (s, k) not in _LEGACY_FIELDS} for s, vals in data.items()}
    for sec, vals in moved.items():
        data.setdefault(sec, {}).update(vals)
    for section_name, values in data.items():
        if not hasattr(cfg, section_name):
            raise ConfigError(f"unknown config section {section_name!r}")
        section = getattr(cfg, section_name)
        types_ = _field_types(section)
        for key, value in values.items():
            if key not in types_:
                raise ConfigError(f"unknown config field {section_name}.{key}")
            if typing.get_origin(types_[key]) is tuple:
                value = tuple(value)
            setattr(section, key, value)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- the settings docs

# The variables the README's short table shows (every one: docs/SETTINGS.md).
README_VARIABLES: tuple[str, ...] = (
    "CMI_DATA_DIR",
    "CMI_OUT_DIR",
    "CMI_SEED",
    "CMI_DEBUG",
    "CMI_N_THREADS",
    "STRICT",
    "LGBM_N_ESTIMATORS",
    "TORCH_EPOCHS",
    "KERAS_EPOCHS",
    "BRANCHNET_PRESET",
    "BRANCHNET_EPOCHS",
)


def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's doc: the string literal right below it in the class body (a subclass's own
    doc wins; a field it only re-declares keeps its base class's). Reads the source: for docs, not at run time."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _markdown(text: str) -> str:
    """A table cell: ``|`` escaped, ``<``/``>`` outside code spans as entities, ``x`` spans as `x`."""
    parts = re.split(r"(``?[^`]+``?)", text.replace("|", "\\|"))
    return "".join(
        "`" + p.strip("`") + "`" if p.startswith("`") else p.replace("<", "&lt;").replace(">", "&gt;") for p in parts
    )


def _default_cell(value: Any) -> str:
    return '""' if value == "" else env_text(value)


def _rows(cfg: Config, section_name: str, only: set[str] | None = None) -> list[str]:
    section = getattr(cfg, section_name)
    docs = field_docs(type(section))
    names = variable_names(cfg)
    presets = getattr(section, "PRESETS", {})
    rows = []
    for f in dataclasses.fields(section):
        name = names[(section_name, f.name)]
        if only is not None and name not in only:
            continue
        doc = docs.get(f.name, "")
        if presets and f.name in next(iter(presets.values())):
            doc += " (0 = the preset's: " + ", ".join(f"{p} {v[f.name]:g}" for p, v in presets.items()) + ")"
        rows.append(f"| `{name}` | `{_default_cell(getattr(section, f.name))}` | {_markdown(doc)} |")
    return rows


_TABLE_HEAD = ["| variable | default | effect |", "|---|---|---|"]


def profiles_markdown() -> list[str]:
    """The profiles' values (``PROFILES``), one row per profile and section, as markdown lines."""
    names = variable_names(Config())
    out = [
        f"### Profiles (`{PROFILE_VARIABLE}`)",
        "",
        "Values set before every other variable (an explicit variable wins); `full` changes nothing.",
        "",
        "| profile | used by | values |",
        "|---|---|---|",
    ]
    for name, sections in PROFILES.items():
        cells = [f"`{names[(s, k)]}={env_text(v)}`" for s, values in sections.items() for k, v in values.items()]
        out.append(
            f"| `{name}` | {_markdown(PROFILE_USE.get(name, ''))} | {', '.join(cells) or 'the defaults above'} |"
        )
    return out


def settings_markdown(what: str = "all", cfg: Config | None = None) -> str:
    """The generated settings docs (``main.py results`` writes them into their blocks; a test compares):

    ``all``: every section, its doc and a table of its variables, defaults and field docs (docs/SETTINGS.md);
    ``readme``: one table of ``README_VARIABLES``; ``deprecated``: the former names and what replaced them.
    """
    cfg = cfg or Config()
    if what == "all":
        out = []
        for f in dataclasses.fields(cfg):
            section = getattr(cfg, f.name)
            doc = " ".join((inspect.getdoc(type(section)) or "").split("\n\n")[0].split())
            out += [f"### `{f.name}` ({type(section).__name__})", "", _markdown(doc), "", *_TABLE_HEAD]
            out += _rows(cfg, f.name) + [""]
        return "\n".join(out + profiles_markdown()) + "\n"
    if what == "readme":
        wanted = set(README_VARIABLES)
        rows = [r for f in dataclasses.fields(cfg) for r in _rows(cfg, f.name, wanted)]
        return "\n".join([*_TABLE_HEAD, *rows]) + "\n"
    if what == "deprecated":
        rows = [
            f"| `{old}` | {f'`{new}`' if new else 'nothing (ignored)'} | {_markdown(why)} |"
            for old, (new, why) in deprecated_variables(cfg).items()
        ]
        return "\n".join(["| former name | now | why |", "|---|---|---|", *rows]) + "\n"
    raise ConfigError(f"settings_markdown: unknown part {what!r} (all, readme, deprecated)")


__all__ = [
    "Config",
    "ConfigError",
    "RunConfig",
    "FeatureConfig",
    "MemberConfig",
    "LGBMConfig",
    "TorchConfig",
    "DLConfig",
    "KerasConfig",
    "BranchNetConfig",
    "EnsembleConfig",
    "load_config",
    "apply_overrides",
    "apply_profile",
    "PROFILES",
    "config_from_dict",
    "parse_value",
    "settings_markdown",
]
