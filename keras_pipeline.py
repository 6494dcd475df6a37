"""Keras member: two-branch residual-SE CNN + BiLSTM/BiGRU + masked attention, and an IMU-only light model.

The architectures and TensorFlow's import state live in ``keras_model.py``;
this module holds the training hooks and the compiled inference. TensorFlow is
imported lazily, never at module import, so the rest of the project works
without it. The fold loop, resume, OOF and bundle
writing come from the member scaffold (``member_base.MemberPipeline``); this
module fills its hooks.

Layout of the bundle::

    keras/metadata.json      bundle.bundle_metadata(...) + pad_len, scalers per fold, model args
    keras/config.json        the effective Config
    keras/fold{k}_full.keras full model of fold k (inputs: imu, tof, mask)
    keras/fold{k}_imu.keras  IMU-only light model of fold k (inputs: imu, mask)
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

import bundle
import features
import threads
from config import Config
from keras_model import _keras, _tf, build_full_model, build_imu_model, is_available, light_args, model_args
from member_base import FoldResult, FoldSplit, MemberPipeline, TrainingData, eta_text, fit_fold_scaler
from metric import GESTURES, N_CLASSES, score_proba

MEMBER = "keras"
FORMAT = 1  # layout of this member's bundle (model inputs, metadata keys)
# Tracing a training graph costs ~5-10 s on CPU; below this many optimizer steps (tiny debug/test
# runs) eager execution finishes first. Real training is always far above it and runs as a graph.
EAGER_MAX_STEPS = 24
XLA_MAX_BATCH = 8  # batches up to this size use the XLA-compiled inference function
PREDICT_BATCH = 256  # sequences per inference call: bounds memory on big tables
_PACKAGES = ("tensorflow", "tensorflow-cpu", "keras")  # versions recorded in the bundle
# .keras loading relies on safe_mode, whose bypasses were fixed up to Keras 3.14 (CVE-2026-1462 among them):
# older versions are refused before any model file is opened. requirements.txt pins PINNED_KERAS.
MIN_KERAS = "3.14.0"
PINNED_KERAS = "3.15.1"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- training helpers


def _epochs(cfg: Config) -> int:
    return cfg.keras.debug_epochs if cfg.run.debug else cfg.keras.epochs


def _channel_index() -> tuple[np.ndarray, np.ndarray]:
    return features.feature_index(features.IMU_FEATURES), features.feature_index(features.TOFTHM_FEATURES)


def _dataset(
    tf: Any, inputs: tuple[np.ndarray, ...], y: np.ndarray | None, batch: int, shuffle_seed: int | None
) -> Any:
    """tf.data pipeline over precomputed arrays (features are never recomputed per batch)."""
    ds = tf.data.Dataset.from_tensor_slices((inputs, y) if y is not None else (inputs,))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(inputs[0]), seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def _one_hot(y: np.ndarray) -> np.ndarray:
    return np.eye(N_CLASSES, dtype=np.float32)[y]


class _EpochLog:
    """A tiny Keras callback factory logging one line per epoch through ``logging``."""

    @staticmethod
    def make(keras: Any, tag: str, n_epochs: int) -> Any:
        class EpochLog(keras.callbacks.Callback):
            def on_train_begin(self, logs: dict | None = None) -> None:
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                logs = logs or {}
                # a schedule's rate is not in ``logs``; the optimizer evaluates it at its step count
                lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
                log.info(
                    "keras %s epoch %d/%d: loss %.4f val_loss %.4f val_acc %.3f (log only), model %s, lr %.2e",
                    tag,
                    epoch + 1,
                    n_epochs,
                    logs.get("loss", float("nan")),
                    logs.get("val_loss", float("nan")),
                    logs.get("val_accuracy", float("nan")),
                    eta_text(epoch + 1, n_epochs, time.perf_counter() - self.started),
                    lr,
                )

        return EpochLog()


def _fit(
    keras: Any,
    tf: Any,
    model: Any,
    x_tr: tuple,
    y_tr: np.ndarray,
    x_va: tuple,
    y_va: np.ndarray,
    cfg: Config,
    seed: int,
    tag: str,
) -> dict[str, Any]:
    k = cfg.keras
    steps = _epochs(cfg) * -(-len(y_tr) // k.batch_size)
    eager = steps <= EAGER_MAX_STEPS
    if eager:
        log.info("keras %s: %d optimizer steps only: training eagerly (cheaper than tracing a graph)", tag, steps)
    # A fixed cosine schedule: the validation fold is watched for the log only (no early stopping or
    # plateau decisions on the fold whose predictions become the OOF), and the final weights are kept.
    schedule = keras.optimizers.schedules.CosineDecay(k.lr, decay_steps=max(1, steps), alpha=k.lr_min_ratio)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=k.label_smoothing),
        metrics=["accuracy"],
        run_eagerly=eager,
    )
    train_ds = _dataset(tf, x_tr, _one_hot(y_tr), k.batch_size, shuffle_seed=seed)
    val_ds = _dataset(tf, x_va, _one_hot(y_va), k.batch_size, shuffle_seed=None)
    t0 = time.perf_counter()
    hist = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=_epochs(cfg),
        verbose=0,
        shuffle=False,
        callbacks=[_EpochLog.make(keras, tag, _epochs(cfg))],
    )
    seconds = time.perf_counter() - t0
    val_loss = hist.history.get("val_loss", [float("nan")])
    n_epochs = len(hist.history.get("loss", []))
    return {
        "epochs_run": n_epochs,
        "final_val_loss": float(val_loss[-1]) if len(val_loss) else float("nan"),  # logged, never used
        "seconds": seconds,
        "eager": eager,
        "train_seq_per_s": len(y_tr) * max(n_epochs, 1) / max(seconds, 1e-9),
    }


_STRATEGY: Any = None  # one MirroredStrategy per process, made on first use with more than one GPU


def _distribution_scope(tf: Any) -> contextlib.AbstractContextManager[Any]:
    """``tf.distribute.MirroredStrategy``'s scope over the visible GPUs when there are more than one, else a no-op.

    Models built and compiled inside it keep a copy per GPU; ``fit`` splits each batch over them
    and averages the gradients (``KERAS_BATCH_SIZE`` stays the global batch).
    """
    global _STRATEGY
    if len(tf.config.list_logical_devices("GPU")) <= 1:
        return contextlib.nullcontext()
    if _STRATEGY is None:
        _STRATEGY = tf.distribute.MirroredStrategy()
        log.info("keras: MirroredStrategy over %d GPUs", _STRATEGY.num_replicas_in_sync)
    return _STRATEGY.scope()


def _save_model(model: Any, path: Path) -> None:
    """Atomic .keras save (Keras insists on the suffix, so the temporary name keeps it)."""
    tmp = path.with_name(f".{path.stem}.partial.keras")
    model.save(tmp)
    os.replace(tmp, path)


def _train_fold(data: TrainingData, split: FoldSplit, pad_len: int, cfg: Config, work: Path) -> FoldResult:
    """Train one fold's two models, save them into ``work``; return the fold's OOF rows and record."""
    tf = _tf(cfg.run.out_dir, threads.n_threads(cfg))
    keras = _keras(cfg)
    table, imu_table, y, k = data.table, data.imu_table, data.y, split.fold
    imu_idx, tof_idx = _channel_index()
    tr, va = split.train, split.valid
    scaler = fit_fold_scaler(data, split)  # training folds only
    x_tr, m_tr = features.pad_batch(table, tr, pad_len, scaler)
    x_va, m_va = features.pad_batch(table, va, pad_len, scaler)
    xi_tr, mi_tr = features.pad_batch(imu_table, tr, pad_len, scaler)
    xi_va, mi_va = features.pad_batch(imu_table, va, pad_len, scaler)
    m_tr, m_va, mi_tr, mi_va = (m.astype(np.float32) for m in (m_tr, m_va, mi_tr, mi_va))
    args = model_args(cfg, len(imu_idx), len(tof_idx), pad_len)

    seed_full = cfg.run.seed + 1000 * k  # per fold, so a resumed fold trains exactly as it would have
    keras.utils.set_random_seed(seed_full)
    with _distribution_scope(tf):  # several GPUs: built, compiled and fitted under MirroredStrategy
        full = build_full_model(args)
        rec_full = _fit(
            keras,
            tf,
            full,
            (x_tr[..., imu_idx], x_tr[..., tof_idx], m_tr),
            y[tr],
            (x_va[..., imu_idx], x_va[..., tof_idx], m_va),
            y[va],
            cfg,
            seed_full,
            f"fold {k} full",
        )

    seed_imu = seed_full + 1
    keras.utils.set_random_seed(seed_imu)
    with _distribution_scope(tf):
        light = build_imu_model(args)
        rec_imu = _fit(
            keras,
            tf,
            light,
            (xi_tr[..., imu_idx], mi_tr),
            y[tr],
            (xi_va[..., imu_idx], mi_va),
            y[va],
            cfg,
            seed_imu,
            f"fold {k} imu",
        )

    # OOF: the full view is routed exactly as predict_proba routes (no thm/tof -> light model);
    # the IMU-only view is the light model on imu_table's validation rows.
    # Eager calls: one pass over the validation fold does not repay tracing a graph.
    full_fn = _make_infer_fn(tf, [full], [light], pad_len, len(imu_idx), len(tof_idx), compiled=False)
    p_full = full_fn.route(x_va[None], m_va, np.asarray(table.has_tof_thm)[va], imu_idx, tof_idx)
    p_imu = full_fn.imu_only(xi_va[None][..., imu_idx], mi_va)

    # Saved as fresh, uncompiled twins with the trained weights: without Adam's slot variables
    # a full model's file is a third of the size (bundles travel as Kaggle datasets).
    for model, build, kind in ((full, build_full_model, "full"), (light, build_imu_model, "imu")):
        twin = build(args)
        twin.set_weights(model.get_weights())
        _save_model(twin, work / f"fold{k}_{kind}.keras")
    record = {
        "scaler": scaler.to_dict(),
        "n_train": int(len(tr)),
        "n_valid": int(len(va)),
        "score_full": float(score_proba(y[va], p_full)),
        "score_imu": float(score_proba(y[va], p_imu)),
        "full": rec_full,
        "imu": rec_imu,
    }
    log.info("keras: fold %d done: score full %.4f imu-only %.4f", k, record["score_full"], record["score_imu"])
    return FoldResult(p_full, p_imu, record)


# --------------------------------------------------------------------------- the pipeline


class KerasPipeline(MemberPipeline):
    """Per fold a two-branch full model and an IMU-only light model, as ``.keras`` files."""

    name = MEMBER
    packages = _PACKAGES
    bundle_format = FORMAT
    code_modules = ("keras_pipeline", "keras_model")  # their code is in the fingerprint

    def is_available(self) -> tuple[bool, str]:
        return is_available()

    def prepare(self, data: TrainingData, cfg: Config) -> int:
        _keras(cfg)  # raises with the reason when TensorFlow cannot be used
        # One pad length for every fold: the model's input shape is fixed per bundle.
        return features.resolve_pad_len(data.table.lengths, cfg.features)

    def fingerprint_settings(self, pad_len: int, cfg: Config) -> dict[str, Any]:
        return {"pad_len": int(pad_len)}

    def fold_files(self, fold: int) -> list[str]:
        return [f"fold{fold}_full.keras", f"fold{fold}_imu.keras"]

    def fit_fold(self, pad_len: int, data: TrainingData, split: FoldSplit, cfg: Config, work: Path) -> FoldResult:
        log.info(
            "keras: training fold %d/%d (pad_len %d, %d epochs max)",
            split.fold + 1,
            len(data.folds),
            pad_len,
            _epochs(cfg),
        )
        return _train_fold(data, split, pad_len, cfg, work)

    def summary_extra(self, pad_len: int, records: dict[int, dict], cfg: Config) -> dict[str, Any]:
        return {"pad_len": pad_len, "epochs": _epochs(cfg)}

    def bundle_extra(self, pad_len: int, records: dict[int, dict], cfg: Config) -> dict[str, Any]:
        imu_idx, tof_idx = _channel_index()
        args = model_args(cfg, len(imu_idx), len(tof_idx), pad_len)
        return {
            "keras_format": FORMAT,
            "pad_len": int(pad_len),
            "pad_side": "left",
            "imu_features": list(features.IMU_FEATURES),
            "tofthm_features": list(features.TOFTHM_FEATURES),
            "scalers": {str(k): r["scaler"] for k, r in records.items()},  # the statistics used in training
            "model_args": args,
            "light_model_args": light_args(args),
            "epochs": _epochs(cfg),
        }

    def load(self, bundle_dir: Path, cfg: Config) -> KerasMember:
        return load_member(bundle_dir, cfg)

    def predict_proba_reload_per_call(self, bundle_dir: Path, table: Any, cfg: Config) -> np.ndarray:
        return predict_proba_reload_per_call(bundle_dir, table, cfg)


# --------------------------------------------------------------------------- inference


class _InferFn:
    """Fold-averaging inference over a fixed input signature (no model.predict per call).

    Small batches (serving: one sequence per call) go through an XLA-compiled function:
    on CPU it halves per-sequence latency against the plain graph (the RNN loops are
    fused). XLA compiles once per batch size (seconds each), so small batches are padded
    to a power of two (1, 2, 4, 8) and larger ones use the plain graph, whose per-step
    overhead a big batch amortises anyway. If XLA fails here, the plain graph takes over (logged).
    """

    def __init__(self, plain: dict[str, Any], jit: dict[str, Any] | None) -> None:
        self.plain = plain
        self.jit = jit

    def _call(self, name: str, *args: np.ndarray) -> np.ndarray:
        n = args[-1].shape[0]  # the mask is (n, L)
        if self.jit is not None and n <= XLA_MAX_BATCH:
            size = 1 << max(0, int(n - 1).bit_length())  # next power of two
            padded = tuple(_pad_rows(a, size, axis=0 if a.ndim == 2 else 1) for a in args) if size != n else args
            try:
                return self.jit[name](*padded).numpy()[:n]
            except Exception as e:  # noqa: BLE001  (an XLA compile/runtime failure of any kind)
                log.warning("keras: XLA inference failed (%s: %s); using the plain graph", type(e).__name__, e)
                self.jit = None
        return np.asarray(self.plain[name](*args))

    def full(self, x_imu: np.ndarray, x_tof: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``x_*`` (K, n, L, channels), one slice per fold (each fold has its own scaler)."""
        return self._call("full", x_imu, x_tof, mask)

    def imu_only(self, x_imu: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._call("imu", x_imu, mask)

    def route(
        self, x: np.ndarray, mask: np.ndarray, has_tof_thm: np.ndarray, imu_idx: np.ndarray, tof_idx: np.ndarray
    ) -> np.ndarray:
        """``x`` (K, n, L, C) scaled per fold; sequences without thm/tof go to the light models."""
        out = np.zeros((x.shape[1], N_CLASSES), dtype=np.float32)
        has = np.asarray(has_tof_thm, dtype=bool)
        mask = mask.astype(np.float32)
        for sel, full in ((np.flatnonzero(has), True), (np.flatnonzero(~has), False)):
            for start in range(0, len(sel), PREDICT_BATCH):
                rows = sel[start : start + PREDICT_BATCH]
                xs = x[:, rows]
                if full:
                    out[rows] = self.full(xs[..., imu_idx], xs[..., tof_idx], mask[rows])
                else:
                    out[rows] = self.imu_only(xs[..., imu_idx], mask[rows])
        return out


def _pad_rows(a: np.ndarray, size: int, axis: int) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, size - a.shape[axis])
    return np.pad(a, pad)


def _make_infer_fn(
    tf: Any, full_models: list, imu_models: list, pad_len: int, n_imu: int, n_tof: int, compiled: bool = True
) -> _InferFn:
    K = len(full_models)
    spec_imu = tf.TensorSpec((K, None, pad_len, n_imu), tf.float32)
    spec_tof = tf.TensorSpec((K, None, pad_len, n_tof), tf.float32)
    spec_mask = tf.TensorSpec((None, pad_len), tf.float32)

    # One graph for all folds: one Python->TF dispatch per call instead of one per fold.
    def full_fn(x_imu: Any, x_tof: Any, mask: Any) -> Any:
        outs = [m([x_imu[i], x_tof[i], mask], training=False) for i, m in enumerate(full_models)]
        return tf.add_n(outs) / float(K)

    def imu_fn(x_imu: Any, mask: Any) -> Any:
        outs = [m([x_imu[i], mask], training=False) for i, m in enumerate(imu_models)]
        return tf.add_n(outs) / float(K)

    if not compiled:
        return _InferFn({"full": full_fn, "imu": imu_fn}, None)

    def make(jit: bool) -> dict[str, Any]:
        # autograph off: the Python here only unrolls the fold loop, nothing depends on tensor values.
        return {
            "full": tf.function(
                full_fn, input_signature=[spec_imu, spec_tof, spec_mask], autograph=False, jit_compile=jit
            ),
            "imu": tf.function(imu_fn, input_signature=[spec_imu, spec_mask], autograph=False, jit_compile=jit),
        }

    return _InferFn(make(False), make(True))


def _scaled_stack(table: Any, idx: np.ndarray, pad_len: int, scalers: list) -> tuple[np.ndarray, np.ndarray]:
    """(K, n, L, C) inputs, one slice per fold's scaler, and the (n, L) mask."""
    xs, mask = [], None
    for sc in scalers:
        x, mask = features.pad_batch(table, idx, pad_len, sc)
        xs.append(x)
    return np.stack(xs), np.asarray(mask, dtype=np.float32)


class KerasMember:
    """Every fold's two models, loaded once, behind compiled inference functions."""

    def __init__(self, bundle_dir: Path, meta: dict, full_models: list, imu_models: list, infer: _InferFn) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.meta = meta
        self.classes_ = tuple(GESTURES)
        self.feature_names_ = tuple(features.FRAME_FEATURES)
        self.pad_len = int(meta["pad_len"])
        self.folds = [int(k) for k in meta["folds"]]
        self.scalers = [features.ScalerStats.from_dict(meta["scalers"][str(k)]) for k in self.folds]
        self.full_models = full_models
        self.imu_models = imu_models
        self._infer = infer
        self._imu_idx, self._tof_idx = _channel_index()

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    def predict_proba(self, table: Any) -> np.ndarray:
        """(n_seq, 18) fold-averaged probabilities; sequences without thm/tof use the IMU-only models."""
        if tuple(table.feature_names) != self.feature_names_:
            raise ValueError("keras: the table's feature names differ from the bundle's")
        if table.n_sequences == 0:
            return np.zeros((0, N_CLASSES), dtype=np.float64)
        out = np.zeros((table.n_sequences, N_CLASSES), dtype=np.float64)
        has = np.asarray(table.has_tof_thm, dtype=bool)
        for start in range(0, table.n_sequences, PREDICT_BATCH):  # bounds the (K, n, L, C) stack
            rows = np.arange(start, min(start + PREDICT_BATCH, table.n_sequences))
            x, mask = _scaled_stack(table, rows, self.pad_len, self.scalers)
            out[rows] = self._infer.route(x, mask, has[rows], self._imu_idx, self._tof_idx)
        return out


def check_keras_version(version: str) -> None:
    """Refuse to load ``.keras`` files with a Keras older than ``MIN_KERAS`` (its ``safe_mode`` had bypasses)."""
    from packaging.version import InvalidVersion, Version  # noqa: PLC0415  (installed with keras)

    try:
        ok = Version(version) >= Version(MIN_KERAS)
    except InvalidVersion:
        ok = False
    if not ok:
        raise bundle.BundleError(
            f"keras {version} is installed; loading .keras bundles needs keras >= {MIN_KERAS} (earlier versions "
            f"have safe_mode bypasses that run code from a model file): pip install keras=={PINNED_KERAS}"
        )


def _checked_fields(bundle_dir: Path, meta: dict) -> tuple[list[int], int]:
    """The folds and pad length of the metadata, every per-fold scaler readable (else BundleError naming it)."""
    where = bundle_dir / bundle.METADATA_FILE
    folds = bundle.field(meta, "folds", list, where, items=int)
    pad_len = bundle.field(meta, "pad_len", int, where)
    if pad_len < 1:
        raise bundle.BundleError(f"{where}: field pad_len is {pad_len}, expected at least 1")
    for k in folds:
        d = bundle.field(meta, ("scalers", str(k)), dict, where)
        bundle.parse_field(where, f"scalers.{k}", features.ScalerStats.from_dict, d)
    return folds, pad_len


def _load_sealed_model(keras: Any, bundle_dir: Path, meta: dict, name: str) -> Any:
    """A fold's model, from a file that is sealed, inside the bundle and digest-checked just now; safe mode on."""
    path = bundle.sealed_file(bundle_dir, meta, name)
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # noqa: BLE001  (a foreign or damaged archive raises many kinds of error)
        raise bundle.BundleError(f"{path}: not a loadable Keras model: {type(e).__name__}: {e}") from None


def load_member(bundle_dir: Path, cfg: Config) -> KerasMember:
    """Check the bundle's metadata against the code, load every fold's two models once, compile inference."""
    bundle_dir = Path(bundle_dir)
    meta = KerasPipeline().read_bundle(bundle_dir, features.FRAME_FEATURES)
    problems = []
    if meta.get("keras_format") != FORMAT:
        problems.append(f"keras bundle format {meta.get('keras_format')!r}, code expects {FORMAT}")
    if list(meta.get("imu_features", [])) != list(features.IMU_FEATURES):
        problems.append("IMU feature group differs from features.IMU_FEATURES")
    if list(meta.get("tofthm_features", [])) != list(features.TOFTHM_FEATURES):
        problems.append("ToF/THM feature group differs from features.TOFTHM_FEATURES")
    if meta.get("pad_side", "left") != "left":
        problems.append(f"pad side {meta.get('pad_side')!r}, code pads on the left")
    if problems:
        raise bundle.BundleError(f"{bundle_dir / 'metadata.json'}: " + "; ".join(problems))
    folds, pad_len = _checked_fields(bundle_dir, meta)
    keras = _keras(cfg)
    check_keras_version(keras.__version__)
    tf = _tf()
    full_models, imu_models = [], []
    for k in folds:
        for kind, dest in (("full", full_models), ("imu", imu_models)):
            dest.append(_load_sealed_model(keras, bundle_dir, meta, f"fold{k}_{kind}.keras"))
    imu_idx, tof_idx = _channel_index()
    infer = _make_infer_fn(tf, full_models, imu_models, pad_len, len(imu_idx), len(tof_idx))
    log.info("keras: loaded %d folds from %s", len(full_models), bundle_dir)
    return KerasMember(bundle_dir, meta, full_models, imu_models, infer)


def predict_proba_reload_per_call(bundle_dir: Path, table: Any, cfg: Config) -> np.ndarray:
    """Loads every .keras file on each call (the original notebook's design). Benchmark only.

    The loaded models are called directly: ``model.predict`` would also retrace a graph per load.
    """
    bundle_dir = Path(bundle_dir)
    meta = bundle.read_metadata(bundle_dir, MEMBER, features.FRAME_FEATURES)
    folds, pad_len = _checked_fields(bundle_dir, meta)
    keras = _keras(cfg)
    check_keras_version(keras.__version__)
    imu_idx, tof_idx = _channel_index()
    has = np.asarray(table.has_tof_thm, dtype=bool)
    out = np.zeros((table.n_sequences, N_CLASSES), dtype=np.float64)
    idx = np.arange(table.n_sequences)
    for k in folds:
        x, mask = features.pad_batch(table, idx, pad_len, features.ScalerStats.from_dict(meta["scalers"][str(k)]))
        mask = mask.astype(np.float32)
        full = _load_sealed_model(keras, bundle_dir, meta, f"fold{k}_full.keras")
        light = _load_sealed_model(keras, bundle_dir, meta, f"fold{k}_imu.keras")
        if has.any():
            out[has] += np.asarray(full([x[has][..., imu_idx], x[has][..., tof_idx], mask[has]], training=False))
        if (~has).any():
            out[~has] += np.asarray(light([x[~has][..., imu_idx], mask[~has]], training=False))
    return out / len(folds)


__all__ = [
    "MEMBER",
    "KerasMember",
    "KerasPipeline",
    "is_available",
    "load_member",
    "predict_proba_reload_per_call",
    "build_full_model",
    "build_imu_model",
    "model_args",
    "light_args",
]
