"""Typed configuration with environment overrides.

Every setting lives in one of the dataclasses below; nothing is read from the
environment anywhere else. ``load_config()`` applies overrides:

* hyper-parameters by ``<PREFIX><FIELD>`` (``LGBM_NUM_LEAVES``, ``DL_EPOCHS``,
  ``KERAS_MAX_EPOCHS``, ``ENSEMBLE_W_TORCH``, ``CMI_SEED`` ...);
* the original notebook's switches ``USE_LGBM/USE_TORCH/USE_KERAS`` and
  ``LGBM_TRAIN/TORCH_TRAIN/KERAS_TRAIN``, plus ``STRICT``.

A variable with one of our prefixes that names no field, or a value that does
not parse as the field's type, raises ``ConfigError`` naming the variable.
Variables that belong to the libraries themselves (``KERAS_HOME``,
``KERAS_BACKEND``) are left alone. This module imports nothing of ours.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """An environment override or config value that cannot be used."""


@dataclass
class RunConfig:
    """Paths, folds and seeds shared by every stage (prefix ``CMI_``)."""

    data_dir: str = ""  # competition layout: train.csv, test.csv, *_demographics.csv
    out_dir: str = "outputs"
    bundle_dir: str = ""  # where trained bundles are read from; defaults to <out_dir>/bundles
    n_folds: int = 5
    seed: int = 42
    debug: bool = False  # tiny epochs/rounds: covers every stage in minutes
    n_threads: int = 0  # 0 = auto: the cores this process may use (threads.py); CMI_N_THREADS=k fixes k
    strict: bool = False  # STRICT=1: a member failing on a sequence raises instead of being skipped

    def resolved_bundle_dir(self) -> Path:
        return Path(self.bundle_dir) if self.bundle_dir else Path(self.out_dir) / "bundles"


@dataclass
class FeatureConfig:
    """Frame features, padding and aggregates (prefix ``FEAT_``)."""

    pad_len: int = 0  # 0 = the 95th percentile of training lengths
    pad_percentile: float = 95.0
    min_pad_len: int = 32
    tail_fraction: float = 0.4  # aggregates also over the final part of a sequence (the gesture)
    dt: float = 0.1  # seconds between samples (~10 Hz)
    mirror_left_handed: bool = True  # map left-hand wearers onto the right-hand signal (needs demographics)


@dataclass
class LGBMConfig:
    """LightGBM member (prefix ``LGBM_``)."""

    use: bool = True
    train: bool = True
    num_leaves: int = 15
    learning_rate: float = 0.07
    n_estimators: int = 400  # 18 trees a round: more rounds cost latency and bundle size for little gain
    early_stopping_rounds: int = 40
    min_child_samples: int = 10
    feature_fraction: float = 0.5
    bagging_fraction: float = 0.8
    bagging_freq: int = 1
    lambda_l2: float = 1.0
    debug_n_estimators: int = 60


@dataclass
class DLConfig:
    """PyTorch member (prefix ``DL_``)."""

    use: bool = True
    train: bool = True
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    dropout: float = 0.2
    label_smoothing: float = 0.05
    grad_accum_steps: int = 1
    conv1_channels: int = 128
    conv2_channels: int = 256
    rnn_hidden: int = 128
    head_hidden: int = 256
    modality_dropout: float = 0.4  # share of training samples shown with thm/tof removed
    time_mask_prob: float = 0.3
    channel_dropout_prob: float = 0.1
    amp: bool = True  # only ever on CUDA
    data_parallel: bool = True  # only when more than one GPU
    num_workers: int = 0
    debug_epochs: int = 2


@dataclass
class KerasConfig:
    """Keras member (prefix ``KERAS_``)."""

    use: bool = True
    train: bool = True
    max_epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    dropout: float = 0.3
    label_smoothing: float = 0.1
    es_patience: int = 8
    rlr_patience: int = 3
    rlr_factor: float = 0.5
    imu_filters: tuple[int, ...] = (128, 256, 256)
    imu_kernels: tuple[int, ...] = (7, 5, 3)
    tof_filters: tuple[int, ...] = (64, 128)
    rnn_units: int = 128
    debug_epochs: int = 2


@dataclass
class EnsembleConfig:
    """Blending (prefix ``ENSEMBLE_``). The weights are defaults used only without a fitted weights.json."""

    w_lgbm: float = 0.20
    w_torch: float = 0.45
    w_keras: float = 0.35
    n_starts: int = 8
    random_search_draws: int = 4096
    # A class-bias calibration is kept only if it raises the cross-fitted OOF score by more than this.
    calibration_min_gain: float = 0.002


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    lgbm: LGBMConfig = field(default_factory=LGBMConfig)
    torch: DLConfig = field(default_factory=DLConfig)
    keras: KerasConfig = field(default_factory=KerasConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

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


# section attribute -> environment prefix
PREFIXES: dict[str, str] = {
    "run": "CMI_",
    "features": "FEAT_",
    "lgbm": "LGBM_",
    "torch": "DL_",
    "keras": "KERAS_",
    "ensemble": "ENSEMBLE_",
}
# The original notebook's switch names.
ALIASES: dict[str, tuple[str, str]] = {
    "USE_LGBM": ("lgbm", "use"),
    "USE_TORCH": ("torch", "use"),
    "USE_KERAS": ("keras", "use"),
    "LGBM_TRAIN": ("lgbm", "train"),
    "TORCH_TRAIN": ("torch", "train"),
    "KERAS_TRAIN": ("keras", "train"),
    "STRICT": ("run", "strict"),
}
# Variables under our prefixes that belong to the libraries, not to us.
FOREIGN: frozenset[str] = frozenset({"KERAS_HOME", "KERAS_BACKEND", "KERAS_NUM_THREADS"})

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
    for name, raw in sorted(env.items()):
        if name in ALIASES:
            section_name, field_name = ALIASES[name]
        else:
            matches = [(s, p) for s, p in PREFIXES.items() if name.startswith(p)]
            if not matches or name in FOREIGN:
                continue
            section_name, prefix = matches[0]
            field_name = name[len(prefix):].lower()
            section = getattr(cfg, section_name)
            if field_name not in _field_types(section):
                known = ", ".join(prefix + f.upper() for f in _field_types(section))
                raise ConfigError(f"unknown environment variable {name}; known {prefix}* variables: {known}")
        section = getattr(cfg, section_name)
        typ = _field_types(section)[field_name]
        setattr(section, field_name, parse_value(name, raw, typ))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject values that parse but make no sense."""
    checks = [
        (cfg.run.n_folds >= 2, "CMI_N_FOLDS must be at least 2"),
        (cfg.run.n_threads >= 0, "CMI_N_THREADS must be >= 0 (0 = every core this process may use)"),
        (cfg.features.pad_len >= 0, "FEAT_PAD_LEN must be >= 0 (0 = percentile of training lengths)"),
        (0 < cfg.features.pad_percentile <= 100, "FEAT_PAD_PERCENTILE must be in (0, 100]"),
        (0 < cfg.features.tail_fraction <= 1, "FEAT_TAIL_FRACTION must be in (0, 1]"),
        (cfg.features.dt > 0, "FEAT_DT must be positive"),
        (cfg.lgbm.learning_rate > 0, "LGBM_LEARNING_RATE must be positive"),
        (cfg.torch.epochs >= 1 and cfg.torch.batch_size >= 1, "DL_EPOCHS and DL_BATCH_SIZE must be >= 1"),
        (cfg.torch.grad_accum_steps >= 1, "DL_GRAD_ACCUM_STEPS must be >= 1"),
        (0 <= cfg.torch.dropout < 1, "DL_DROPOUT must be in [0, 1)"),
        (0 <= cfg.torch.modality_dropout <= 1, "DL_MODALITY_DROPOUT must be in [0, 1]"),
        (cfg.keras.max_epochs >= 1 and cfg.keras.batch_size >= 1, "KERAS_MAX_EPOCHS and KERAS_BATCH_SIZE must be >= 1"),
        (0 <= cfg.keras.dropout < 1, "KERAS_DROPOUT must be in [0, 1)"),
        (0 <= cfg.keras.label_smoothing < 1, "KERAS_LABEL_SMOOTHING must be in [0, 1)"),
        (len(cfg.keras.imu_filters) == len(cfg.keras.imu_kernels), "KERAS_IMU_FILTERS and KERAS_IMU_KERNELS differ in length"),
        (min(cfg.ensemble.w_lgbm, cfg.ensemble.w_torch, cfg.ensemble.w_keras) >= 0, "ENSEMBLE_W_* must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def load_config(env: Mapping[str, str] | None = None, **run_overrides: Any) -> Config:
    """The effective config: defaults, then environment overrides, then explicit run overrides (CLI)."""
    cfg = apply_overrides(Config(), os.environ if env is None else env)
    for key, value in run_overrides.items():
        if value is None:
            continue
        if not hasattr(cfg.run, key):
            raise ConfigError(f"unknown run setting {key!r}")
        setattr(cfg.run, key, value)
    validate(cfg)
    return cfg


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. a saved config.json)."""
    cfg = Config()
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


__all__ = [
    "Config", "ConfigError", "RunConfig", "FeatureConfig", "LGBMConfig", "DLConfig", "KerasConfig",
    "EnsembleConfig", "load_config", "apply_overrides", "config_from_dict", "parse_value",
]
