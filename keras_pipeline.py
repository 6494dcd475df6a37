"""Keras member: two-branch residual-SE CNN + BiLSTM/BiGRU + masked attention, and an IMU-only light model.

TensorFlow/Keras are imported lazily (``_tf()``), never at module import, so the
rest of the project works without them. Training follows the shared folds,
writes its state under ``<out>/bundles/.keras_work/`` after every fold (so a
killed run resumes and skips finished folds) and ends with the bundle
``<out>/bundles/keras/`` written atomically plus OOF via ``cv.write_member_oof``.

Layout of the bundle::

    keras/metadata.json      bundle.bundle_metadata(...) + pad_len, scalers per fold, model args
    keras/config.json        the effective Config
    keras/fold{k}_full.keras full model of fold k (inputs: imu, tof, mask)
    keras/fold{k}_imu.keras  IMU-only light model of fold k (inputs: imu, mask)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

import bundle
import cv
import features
import io_utils
import threads
from config import Config, RunConfig
from metric import GESTURES, N_CLASSES, score_proba

MEMBER = "keras"
FORMAT = 1  # layout of this member's bundle (model inputs, metadata keys)
WORK_DIR_NAME = ".keras_work"
STATE_FILE = "keras_state.json"
N_POOL = 2  # both branches halve time this many times so they can be concatenated
# Tracing a training graph costs ~5-10 s on CPU; below this many optimizer steps (tiny debug/test
# runs) eager execution finishes first. Real training is always far above it and runs as a graph.
EAGER_MAX_STEPS = 24
XLA_MAX_BATCH = 8  # batches up to this size use the XLA-compiled inference function
PREDICT_BATCH = 256  # sequences per inference call: bounds memory on big tables
_PACKAGES = ("tensorflow", "tensorflow-cpu", "keras")  # versions recorded in the bundle

log = logging.getLogger(__name__)

_TF: Any = None  # the imported tensorflow module, once
_THREADS_DONE = False  # thread counts are settable once, before TF's runtime starts
_LAYERS: dict[str, type] | None = None  # our registered custom layer classes, once


# --------------------------------------------------------------------------- TensorFlow import


def _set_env(out_dir: str | Path | None) -> None:
    # Keras writes keras.json into its home on import: keep it inside our output folder.
    if "KERAS_HOME" not in os.environ:
        base = Path(out_dir) if out_dir else Path(RunConfig().out_dir)
        os.environ["KERAS_HOME"] = str((base / ".keras_home").resolve())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _tf(out_dir: str | Path | None = None, n_threads: int | None = None) -> Any:
    """Import TensorFlow once (GPU memory growth on), apply thread counts once; return the module."""
    global _TF, _THREADS_DONE
    if _TF is None:
        _set_env(out_dir)
        import tensorflow as tf  # noqa: PLC0415  (lazy on purpose)

        for gpu in tf.config.list_physical_devices("GPU"):
            # Grow on demand so TF can share the GPU with torch in the same process.
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except (RuntimeError, ValueError) as e:
                log.info("keras: memory growth not set on %s (%s)", gpu.name, e)
        _TF = tf
    if n_threads and not _THREADS_DONE:
        _THREADS_DONE = True
        # Only possible before TF initialises its runtime (first op); later it raises RuntimeError.
        try:
            _TF.config.threading.set_intra_op_parallelism_threads(int(n_threads))
            _TF.config.threading.set_inter_op_parallelism_threads(threads.interop_threads(int(n_threads)))
        except RuntimeError as e:
            log.info("keras: TensorFlow already initialised, thread counts left as they are (%s)", e)
    return _TF


def is_available(out_dir: str | Path | None = None) -> tuple[bool, str]:
    """(True, versions) when TensorFlow with Keras 3 can be used, else (False, reason).

    With ``out_dir`` (or once TF is imported) this imports TensorFlow for real, Keras' home
    going to ``<out_dir>/.keras_home``. Without it, and before any import, it only checks that
    both packages are installed: importing here would pin Keras' home before the caller's
    output folder is known; a broken install then fails loudly in train/load instead.
    """
    if _TF is None and out_dir is None:
        try:
            missing = [name for name in ("tensorflow", "keras") if importlib.util.find_spec(name) is None]
        except (ImportError, ValueError) as e:  # ValueError: a module blocked/half-imported in sys.modules
            return False, f"TensorFlow/Keras not importable: {type(e).__name__}: {e}"
        if missing:
            return False, f"TensorFlow/Keras not installed: {', '.join(missing)} missing"
        return True, "tensorflow and keras installed (imported on first use)"
    try:
        tf = _tf(out_dir)
        import keras  # noqa: PLC0415
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return False, f"TensorFlow/Keras not importable: {type(e).__name__}: {e}"
    if not keras.__version__.startswith("3."):
        return False, f"Keras 3 required, found keras {keras.__version__}"
    if keras.backend.backend() != "tensorflow":  # our inference uses tf.function
        return False, f"Keras backend is {keras.backend.backend()!r} (KERAS_BACKEND); the keras member needs 'tensorflow'"
    return True, f"tensorflow {tf.__version__}, keras {keras.__version__}"


def _keras(cfg: Config) -> Any:
    """Import and configure TF for this run (Keras home in the output folder, threads), or raise saying why."""
    ok, why = is_available(cfg.run.out_dir)
    if not ok:
        raise RuntimeError(f"keras member unavailable: {why}")
    _tf(cfg.run.out_dir, threads.n_threads(cfg))
    import keras  # noqa: PLC0415

    _custom_layers()
    return keras


# --------------------------------------------------------------------------- custom layers


def _custom_layers() -> dict[str, type]:
    """Define and register our layers once (they need Keras, hence inside a function)."""
    global _LAYERS
    if _LAYERS is not None:
        return _LAYERS
    import keras  # noqa: PLC0415
    from keras import ops  # noqa: PLC0415

    def _mask_2d(mask: Any) -> Any:
        mask = ops.cast(mask, "float32")
        if len(mask.shape) == 3:  # (B, T, 1) after pooling
            mask = ops.squeeze(mask, axis=-1)
        return mask

    @keras.saving.register_keras_serializable(package="cmi")
    class MaskedTemporalAttention(keras.layers.Layer):
        """Additive attention pooling over time; steps where ``mask`` is 0/False get no weight.

        Inputs ``[h (B, T, D), mask (B, T) or (B, T, 1)]`` -> ``(B, D)``.
        """

        def __init__(self, units: int = 64, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.units = int(units)

        def build(self, input_shape: Any) -> None:
            dim = int(input_shape[0][-1])
            self.w = self.add_weight(name="w", shape=(dim, self.units), initializer="glorot_uniform")
            self.b = self.add_weight(name="b", shape=(self.units,), initializer="zeros")
            self.v = self.add_weight(name="v", shape=(self.units,), initializer="glorot_uniform")

        def call(self, inputs: Any) -> Any:
            h, mask = inputs
            m = _mask_2d(mask)
            score = ops.tensordot(ops.tanh(ops.tensordot(h, self.w, axes=1) + self.b), self.v, axes=1)  # (B, T)
            # A large negative (not -inf) keeps softmax finite even for an all-padding row.
            score = ops.where(m > 0.5, score, ops.full_like(score, -1e9))
            weights = ops.softmax(score, axis=-1)
            return ops.sum(h * ops.expand_dims(weights, -1), axis=1)

        def compute_output_shape(self, input_shape: Any) -> tuple:
            return (input_shape[0][0], input_shape[0][-1])

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "units": self.units}

    @keras.saving.register_keras_serializable(package="cmi")
    class MaskedMean(keras.layers.Layer):
        """Mean over the real time steps only: ``[x (B, T, D), mask] -> (B, D)``."""

        def call(self, inputs: Any) -> Any:
            x, mask = inputs
            m = ops.expand_dims(_mask_2d(mask), -1)
            return ops.sum(x * m, axis=1) / ops.maximum(ops.sum(m, axis=1), 1.0)

        def compute_output_shape(self, input_shape: Any) -> tuple:
            return (input_shape[0][0], input_shape[0][-1])

    _LAYERS = {"MaskedTemporalAttention": MaskedTemporalAttention, "MaskedMean": MaskedMean}
    return _LAYERS


# --------------------------------------------------------------------------- models


def model_args(cfg: Config, n_imu: int, n_tof: int, pad_len: int) -> dict[str, Any]:
    """Everything the two constructors need (stored in the bundle metadata)."""
    k = cfg.keras
    return {
        "pad_len": int(pad_len),
        "n_imu": int(n_imu),
        "n_tof": int(n_tof),
        "imu_filters": [int(f) for f in k.imu_filters],
        "imu_kernels": [int(f) for f in k.imu_kernels],
        "tof_filters": [int(f) for f in k.tof_filters],
        "rnn_units": int(k.rnn_units),
        "dropout": float(k.dropout),
        "n_classes": N_CLASSES,
    }


def _imu_branch(keras: Any, x: Any, mask3: Any, filters: list[int], kernels: list[int], dropout: float,
                prefix: str) -> tuple[Any, Any]:
    """Residual conv blocks with squeeze-and-excitation; returns (features, pooled mask)."""
    L = keras.layers
    layers_ = _custom_layers()
    for i, (f, k) in enumerate(zip(filters, kernels)):
        shortcut = x
        y = L.Conv1D(f, k, padding="same", use_bias=False, name=f"{prefix}conv{i}a")(x)
        y = L.BatchNormalization(name=f"{prefix}bn{i}a")(y)
        y = L.Activation("relu")(y)
        y = L.Conv1D(f, k, padding="same", use_bias=False, name=f"{prefix}conv{i}b")(y)
        y = L.BatchNormalization(name=f"{prefix}bn{i}b")(y)
        # Squeeze over real steps only, so the amount of padding does not change the gates.
        s = layers_["MaskedMean"](name=f"{prefix}se_pool{i}")([y, mask3])
        s = L.Dense(max(4, f // 8), activation="relu", name=f"{prefix}se_down{i}")(s)
        s = L.Dense(f, activation="sigmoid", name=f"{prefix}se_up{i}")(s)
        y = L.Multiply()([y, L.Reshape((1, f))(s)])
        if int(shortcut.shape[-1]) != f:
            shortcut = L.Conv1D(f, 1, padding="same", use_bias=False, name=f"{prefix}proj{i}")(shortcut)
            shortcut = L.BatchNormalization(name=f"{prefix}bnproj{i}")(shortcut)
        x = L.Activation("relu")(L.Add()([y, shortcut]))
        x = L.Multiply()([x, mask3])  # padded steps back to zero
        if i < N_POOL:
            x = L.MaxPooling1D(2, padding="same")(x)
            mask3 = L.MaxPooling1D(2, padding="same")(mask3)  # the mask follows every pooling
        x = L.Dropout(dropout)(x)
    return x, mask3


def _tof_branch(keras: Any, x: Any, mask3: Any, filters: list[int], dropout: float) -> tuple[Any, Any]:
    L = keras.layers
    for i, f in enumerate(filters):
        x = L.Conv1D(f, 3, padding="same", use_bias=False, name=f"tof_conv{i}")(x)
        x = L.BatchNormalization(name=f"tof_bn{i}")(x)
        x = L.Activation("relu")(x)
        x = L.Multiply()([x, mask3])
        if i < N_POOL:
            x = L.MaxPooling1D(2, padding="same")(x)
            mask3 = L.MaxPooling1D(2, padding="same")(mask3)
        x = L.Dropout(dropout)(x)
    # Fewer conv blocks than pooling steps: pool the rest so the time axes match the IMU branch.
    for _ in range(len(filters), N_POOL):
        x = L.MaxPooling1D(2, padding="same")(x)
        mask3 = L.MaxPooling1D(2, padding="same")(mask3)
    return x, mask3


def _head(keras: Any, h: Any, mask3: Any, width: int, dropout: float, n_classes: int) -> Any:
    L = keras.layers
    layers_ = _custom_layers()
    att = layers_["MaskedTemporalAttention"](units=max(8, width // 2), name="attention")([h, mask3])
    avg = layers_["MaskedMean"](name="seq_mean")([h, mask3])
    z = L.Concatenate()([att, avg])
    z = L.Dense(width, activation="relu", name="head_dense1")(z)
    z = L.BatchNormalization(name="head_bn")(z)
    z = L.Dropout(dropout)(z)
    z = L.Dense(max(8, width // 2), activation="relu", name="head_dense2")(z)
    z = L.Dropout(dropout / 2)(z)
    return L.Dense(n_classes, activation="softmax", dtype="float32", name="proba")(z)


def build_full_model(args: dict[str, Any]) -> Any:
    """Two-branch model: inputs ``imu (B, L, n_imu)``, ``tof (B, L, n_tof)``, ``mask (B, L)`` float."""
    import keras  # noqa: PLC0415

    L = keras.layers
    pad_len, u, d = args["pad_len"], args["rnn_units"], args["dropout"]
    imu_in = keras.Input((pad_len, args["n_imu"]), name="imu")
    tof_in = keras.Input((pad_len, args["n_tof"]), name="tof")
    mask_in = keras.Input((pad_len,), name="mask")
    mask3 = L.Reshape((pad_len, 1))(mask_in)
    xi, mi = _imu_branch(keras, imu_in, mask3, args["imu_filters"], args["imu_kernels"], d, "imu_")
    xt, _ = _tof_branch(keras, tof_in, mask3, args["tof_filters"], d)
    x = L.Concatenate(name="merge")([xi, xt])
    h = L.Bidirectional(L.LSTM(u, return_sequences=True), name="bilstm")(x)
    h = L.Dropout(d)(h)
    h = L.Bidirectional(L.GRU(u, return_sequences=True), name="bigru")(h)
    h = L.Multiply()([h, mi])
    out = _head(keras, h, mi, 2 * u, d, args["n_classes"])
    return keras.Model([imu_in, tof_in, mask_in], out, name="keras_full")


def light_args(args: dict[str, Any]) -> dict[str, Any]:
    """The IMU-only model is the IMU branch at half width with one BiGRU."""
    out = dict(args)
    out["imu_filters"] = [max(8, f // 2) for f in args["imu_filters"]]
    out["rnn_units"] = max(8, args["rnn_units"] // 2)
    return out


def build_imu_model(args: dict[str, Any]) -> Any:
    """IMU-only light model: inputs ``imu (B, L, n_imu)``, ``mask (B, L)``."""
    import keras  # noqa: PLC0415

    L = keras.layers
    a = light_args(args)
    pad_len, u, d = a["pad_len"], a["rnn_units"], a["dropout"]
    imu_in = keras.Input((pad_len, a["n_imu"]), name="imu")
    mask_in = keras.Input((pad_len,), name="mask")
    mask3 = L.Reshape((pad_len, 1))(mask_in)
    x, m = _imu_branch(keras, imu_in, mask3, a["imu_filters"], a["imu_kernels"], d, "imu_")
    h = L.Bidirectional(L.GRU(u, return_sequences=True), name="bigru")(x)
    h = L.Multiply()([h, m])
    out = _head(keras, h, m, 2 * u, d, a["n_classes"])
    return keras.Model([imu_in, mask_in], out, name="keras_imu")


# --------------------------------------------------------------------------- training helpers


def _epochs(cfg: Config) -> int:
    return cfg.keras.debug_epochs if cfg.run.debug else cfg.keras.max_epochs


def _channel_index() -> tuple[np.ndarray, np.ndarray]:
    return features.feature_index(features.IMU_FEATURES), features.feature_index(features.TOFTHM_FEATURES)


def _fingerprint(table: Any, y: np.ndarray, fold_ids: np.ndarray, folds_hash: str, cfg: Config,
                 pad_len: int) -> str:
    """What must not change between a killed run and its resume (data, folds, settings)."""
    h = hashlib.sha256()
    h.update("\n".join(map(str, table.sequence_ids)).encode())
    h.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(fold_ids, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(table.lengths, dtype=np.int64).tobytes())
    settings = {
        "format": FORMAT, "folds_hash": folds_hash, "keras": asdict(cfg.keras), "features": asdict(cfg.features),
        "seed": cfg.run.seed, "debug": cfg.run.debug, "feature_names": list(table.feature_names), "pad_len": pad_len,
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _dataset(tf: Any, inputs: tuple[np.ndarray, ...], y: np.ndarray | None, batch: int,
             shuffle_seed: int | None) -> Any:
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
    def make(keras: Any, tag: str) -> Any:
        def on_epoch_end(epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            log.info("keras %s epoch %d: loss %.4f val_loss %.4f val_acc %.3f lr %.2e", tag, epoch + 1,
                     logs.get("loss", float("nan")), logs.get("val_loss", float("nan")),
                     logs.get("val_accuracy", float("nan")), float(logs.get("learning_rate", float("nan"))))

        return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


def _fit(keras: Any, tf: Any, model: Any, x_tr: tuple, y_tr: np.ndarray, x_va: tuple, y_va: np.ndarray,
         cfg: Config, seed: int, tag: str) -> dict[str, Any]:
    k = cfg.keras
    steps = _epochs(cfg) * -(-len(y_tr) // k.batch_size)
    eager = steps <= EAGER_MAX_STEPS
    if eager:
        log.info("keras %s: %d optimizer steps only: training eagerly (cheaper than tracing a graph)", tag, steps)
    model.compile(
        optimizer=keras.optimizers.Adam(k.lr),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=k.label_smoothing),
        metrics=["accuracy"],
        run_eagerly=eager,
    )
    train_ds = _dataset(tf, x_tr, _one_hot(y_tr), k.batch_size, shuffle_seed=seed)
    val_ds = _dataset(tf, x_va, _one_hot(y_va), k.batch_size, shuffle_seed=None)
    es = keras.callbacks.EarlyStopping(monitor="val_loss", patience=k.es_patience, restore_best_weights=True)
    rlr = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=k.rlr_patience, factor=k.rlr_factor)
    t0 = time.perf_counter()
    hist = model.fit(train_ds, validation_data=val_ds, epochs=_epochs(cfg), verbose=0, shuffle=False,
                     callbacks=[es, rlr, _EpochLog.make(keras, tag)])
    seconds = time.perf_counter() - t0
    val_loss = hist.history.get("val_loss", [float("nan")])
    n_epochs = len(hist.history.get("loss", []))
    return {
        "epochs_run": n_epochs,
        "best_epoch": int(np.nanargmin(val_loss)) + 1 if len(val_loss) else 0,
        "best_val_loss": float(np.nanmin(val_loss)) if len(val_loss) else float("nan"),
        "seconds": seconds,
        "eager": eager,
        "train_seq_per_s": len(y_tr) * max(n_epochs, 1) / max(seconds, 1e-9),
    }


def _save_model(model: Any, path: Path) -> None:
    """Atomic .keras save (Keras insists on the suffix, so the temporary name keeps it)."""
    tmp = path.with_name(f".{path.stem}.partial.keras")
    model.save(tmp)
    os.replace(tmp, path)


def _train_one_fold(k: int, table: Any, imu_table: Any, y: np.ndarray, fold_ids: np.ndarray, pad_len: int,
                    cfg: Config, work: Path) -> dict[str, Any]:
    """Train fold k's two models, save them and the fold's OOF rows into ``work``; return its record."""
    tf = _tf(cfg.run.out_dir, threads.n_threads(cfg))
    keras = _keras(cfg)
    imu_idx, tof_idx = _channel_index()
    tr = np.flatnonzero(fold_ids != k)
    va = np.flatnonzero(fold_ids == k)
    scaler = features.fit_scaler(table, tr)  # training fold only
    x_tr, m_tr = features.pad_batch(table, tr, pad_len, scaler)
    x_va, m_va = features.pad_batch(table, va, pad_len, scaler)
    xi_tr, mi_tr = features.pad_batch(imu_table, tr, pad_len, scaler)
    xi_va, mi_va = features.pad_batch(imu_table, va, pad_len, scaler)
    m_tr, m_va, mi_tr, mi_va = (m.astype(np.float32) for m in (m_tr, m_va, mi_tr, mi_va))
    args = model_args(cfg, len(imu_idx), len(tof_idx), pad_len)

    seed_full = cfg.run.seed + 1000 * k  # per fold, so a resumed fold trains exactly as it would have
    keras.utils.set_random_seed(seed_full)
    full = build_full_model(args)
    rec_full = _fit(keras, tf, full,
                    (x_tr[..., imu_idx], x_tr[..., tof_idx], m_tr), y[tr],
                    (x_va[..., imu_idx], x_va[..., tof_idx], m_va), y[va], cfg, seed_full, f"fold {k} full")

    seed_imu = seed_full + 1
    keras.utils.set_random_seed(seed_imu)
    light = build_imu_model(args)
    rec_imu = _fit(keras, tf, light, (xi_tr[..., imu_idx], mi_tr), y[tr], (xi_va[..., imu_idx], mi_va), y[va],
                   cfg, seed_imu, f"fold {k} imu")

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
    io_utils.write_npy(work / f"fold{k}_oof_full.npy", p_full.astype(np.float32))
    io_utils.write_npy(work / f"fold{k}_oof_imu.npy", p_imu.astype(np.float32))
    return {
        "scaler": scaler.to_dict(),
        "n_train": int(len(tr)),
        "n_valid": int(len(va)),
        "score_full": float(score_proba(y[va], p_full)),
        "score_imu": float(score_proba(y[va], p_imu)),
        "full": rec_full,
        "imu": rec_imu,
    }


# --------------------------------------------------------------------------- training entry point


def train_member(table: Any, imu_table: Any, y: np.ndarray, fold_ids: np.ndarray, folds_hash: str, cfg: Config,
                 out_dir: Path) -> dict:
    """Cross-validated training on the shared folds; resumable; writes the bundle and OOF. Returns the OOF summary."""
    _keras(cfg)  # raises with the reason when TensorFlow cannot be used
    out_dir = Path(out_dir)
    y = np.asarray(y, dtype=np.int64)
    fold_ids = np.asarray(fold_ids, dtype=np.int64)
    n = table.n_sequences
    if imu_table.n_sequences != n or not np.array_equal(imu_table.sequence_ids, table.sequence_ids):
        raise ValueError("keras: imu_table must hold the same sequences as table, in the same order")
    if len(y) != n or len(fold_ids) != n:
        raise ValueError(f"keras: {n} sequences but {len(y)} labels and {len(fold_ids)} fold ids")
    if tuple(table.feature_names) != tuple(features.FRAME_FEATURES):
        raise ValueError("keras: table.feature_names differ from features.FRAME_FEATURES")
    folds = sorted(int(f) for f in np.unique(fold_ids))

    # one pad length for every fold: the resume state is keyed on it
    pad_len = features.resolve_pad_len(table.lengths, cfg.features)
    fp = _fingerprint(table, y, fold_ids, folds_hash, cfg, pad_len)
    work = out_dir / "bundles" / WORK_DIR_NAME
    state_path = work / STATE_FILE
    state = _load_state(state_path, fp)
    if state is None:
        if work.exists():
            shutil.rmtree(work)
        state = {"fingerprint": fp, "folds_hash": folds_hash, "pad_len": pad_len, "folds": {}}
        work.mkdir(parents=True, exist_ok=True)
        io_utils.write_json(state_path, state)

    for k in folds:
        if str(k) in state["folds"] and _fold_files_present(work, k):
            log.info("keras: fold %d already finished (state %s): skipped", k, state_path)
            continue
        log.info("keras: training fold %d/%d (pad_len %d, %d epochs max)", k + 1, len(folds), pad_len, _epochs(cfg))
        state["folds"][str(k)] = _train_one_fold(k, table, imu_table, y, fold_ids, pad_len, cfg, work)
        io_utils.write_json(state_path, state)  # last: the fold counts as done only once its files exist
        rec = state["folds"][str(k)]
        log.info("keras: fold %d done: score full %.4f imu-only %.4f", k, rec["score_full"], rec["score_imu"])

    # Assemble the OOF matrices from the per-fold rows.
    oof_full = np.zeros((n, N_CLASSES), dtype=np.float32)
    oof_imu = np.zeros((n, N_CLASSES), dtype=np.float32)
    for k in folds:
        va = np.flatnonzero(fold_ids == k)
        oof_full[va] = io_utils.read_npy(work / f"fold{k}_oof_full.npy")
        oof_imu[va] = io_utils.read_npy(work / f"fold{k}_oof_imu.npy")
    cv_full, cv_imu = float(score_proba(y, oof_full)), float(score_proba(y, oof_imu))

    scalers = {k: state["folds"][str(k)]["scaler"] for k in folds}
    records = {k: {kk: v for kk, v in state["folds"][str(k)].items() if kk != "scaler"} for k in folds}
    write_bundle(out_dir / "bundles" / MEMBER, {k: work / f"fold{k}_full.keras" for k in folds},
                 {k: work / f"fold{k}_imu.keras" for k in folds}, scalers, pad_len, cfg, folds_hash,
                 {"full": cv_full, "imu_only": cv_imu, "mean": 0.5 * (cv_full + cv_imu)}, records)

    summary = cv.write_member_oof(out_dir / "oof", MEMBER, table.sequence_ids, y, fold_ids, oof_full, oof_imu,
                                  folds_hash, extra={"pad_len": pad_len, "epochs": _epochs(cfg)})
    shutil.rmtree(work, ignore_errors=True)  # bundle and OOF are written: the work folder is spent
    log.info("keras: CV full %.4f, imu-only %.4f; bundle %s", cv_full, cv_imu, out_dir / "bundles" / MEMBER)
    return summary


def write_bundle(bundle_dir: Path, full_files: dict[int, Path], imu_files: dict[int, Path],
                 scalers: dict[int, dict], pad_len: int, cfg: Config, folds_hash: str,
                 cv_score: dict[str, float] | None = None, fold_records: dict[int, dict] | None = None) -> None:
    """Write the bundle atomically: per fold the two .keras files, metadata.json and config.json."""
    folds = sorted(full_files)
    imu_idx, tof_idx = _channel_index()
    args = model_args(cfg, len(imu_idx), len(tof_idx), pad_len)
    extra = {
        "keras_format": FORMAT,
        "folds": folds,
        "pad_len": int(pad_len),
        "pad_side": "left",
        "imu_features": list(features.IMU_FEATURES),
        "tofthm_features": list(features.TOFTHM_FEATURES),
        "scalers": {str(k): scalers[k] for k in folds},  # the training-fold statistics, as used in training
        "model_args": args,
        "light_model_args": light_args(args),
        "cv_score": cv_score or {},
        "fold_records": {str(k): v for k, v in (fold_records or {}).items()},
        "epochs": _epochs(cfg),
        "seed": cfg.run.seed,
    }
    meta = bundle.bundle_metadata(MEMBER, features.FRAME_FEATURES, folds_hash, extra, packages=_PACKAGES)
    with io_utils.atomic_dir(bundle_dir) as tmp:
        for k in folds:
            shutil.copy2(full_files[k], tmp / f"fold{k}_full.keras")
            shutil.copy2(imu_files[k], tmp / f"fold{k}_imu.keras")
        cfg.save(tmp / "config.json")
        bundle.write_metadata(tmp, meta)


def _fold_files_present(work: Path, k: int) -> bool:
    names = (f"fold{k}_full.keras", f"fold{k}_imu.keras", f"fold{k}_oof_full.npy", f"fold{k}_oof_imu.npy")
    return all((work / nm).exists() for nm in names)


def _load_state(path: Path, fingerprint: str) -> dict | None:
    """The saved state when it belongs to this exact run (data, folds, config), else None (logged)."""
    if not path.exists():
        return None
    try:
        state = io_utils.read_json(path)
    except ValueError as e:
        log.warning("keras: unreadable training state (%s): starting over", e)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("keras: training state %s was made with other data/folds/config: starting over", path)
        return None
    log.info("keras: resuming from %s (finished folds: %s)", path, sorted(state.get("folds", {}), key=int))
    return state


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

    def route(self, x: np.ndarray, mask: np.ndarray, has_tof_thm: np.ndarray, imu_idx: np.ndarray,
              tof_idx: np.ndarray) -> np.ndarray:
        """``x`` (K, n, L, C) scaled per fold; sequences without thm/tof go to the light models."""
        out = np.zeros((x.shape[1], N_CLASSES), dtype=np.float32)
        has = np.asarray(has_tof_thm, dtype=bool)
        mask = mask.astype(np.float32)
        for sel, full in ((np.flatnonzero(has), True), (np.flatnonzero(~has), False)):
            for start in range(0, len(sel), PREDICT_BATCH):
                rows = sel[start:start + PREDICT_BATCH]
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


def _make_infer_fn(tf: Any, full_models: list, imu_models: list, pad_len: int, n_imu: int, n_tof: int,
                   compiled: bool = True) -> _InferFn:
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
            "full": tf.function(full_fn, input_signature=[spec_imu, spec_tof, spec_mask], autograph=False,
                                jit_compile=jit),
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


def load_member(bundle_dir: Path, cfg: Config) -> KerasMember:
    """Check the bundle's metadata against the code, load every fold's two models once, compile inference."""
    bundle_dir = Path(bundle_dir)
    meta = bundle.read_metadata(bundle_dir, MEMBER, features.FRAME_FEATURES)
    files = [f"fold{k}_{kind}.keras" for k in meta.get("folds", []) for kind in ("full", "imu")]
    meta = bundle.read_metadata(bundle_dir, MEMBER, features.FRAME_FEATURES, required_files=files)
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
    keras = _keras(cfg)
    tf = _tf()
    full_models, imu_models = [], []
    for k in meta["folds"]:
        for kind, dest in (("full", full_models), ("imu", imu_models)):
            path = bundle_dir / f"fold{k}_{kind}.keras"
            dest.append(keras.saving.load_model(path, compile=False))
    imu_idx, tof_idx = _channel_index()
    infer = _make_infer_fn(tf, full_models, imu_models, int(meta["pad_len"]), len(imu_idx), len(tof_idx))
    log.info("keras: loaded %d folds from %s", len(full_models), bundle_dir)
    return KerasMember(bundle_dir, meta, full_models, imu_models, infer)


def predict_proba_reload_per_call(bundle_dir: Path, table: Any, cfg: Config) -> np.ndarray:
    """Loads every .keras file on each call (the original notebook's design). Benchmark only.

    The loaded models are called directly: ``model.predict`` would also retrace a graph per load.
    """
    bundle_dir = Path(bundle_dir)
    meta = bundle.read_metadata(bundle_dir, MEMBER, features.FRAME_FEATURES)
    keras = _keras(cfg)
    imu_idx, tof_idx = _channel_index()
    pad_len = int(meta["pad_len"])
    has = np.asarray(table.has_tof_thm, dtype=bool)
    out = np.zeros((table.n_sequences, N_CLASSES), dtype=np.float64)
    idx = np.arange(table.n_sequences)
    for k in meta["folds"]:
        x, mask = features.pad_batch(table, idx, pad_len, features.ScalerStats.from_dict(meta["scalers"][str(k)]))
        mask = mask.astype(np.float32)
        full = keras.saving.load_model(bundle_dir / f"fold{k}_full.keras", compile=False)
        light = keras.saving.load_model(bundle_dir / f"fold{k}_imu.keras", compile=False)
        if has.any():
            out[has] += np.asarray(full([x[has][..., imu_idx], x[has][..., tof_idx], mask[has]], training=False))
        if (~has).any():
            out[~has] += np.asarray(light([x[~has][..., imu_idx], mask[~has]], training=False))
    return out / len(meta["folds"])


__all__ = [
    "MEMBER", "KerasMember", "is_available", "train_member", "load_member", "predict_proba_reload_per_call",
    "build_full_model", "build_imu_model", "model_args", "light_args", "write_bundle",
]
