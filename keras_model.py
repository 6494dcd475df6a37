"""Keras member, the model side: TensorFlow import state, our custom layers, and the two architectures.

Apart from the training loop and inference (``keras_pipeline.py``), as a model
definition should be. TensorFlow/Keras are imported lazily (``_tf()``), never at
module import, so the rest of the project works without them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import threads
from config import Config, RunConfig
from metric import N_CLASSES

N_POOL = 2  # both branches halve time this many times so they can be concatenated

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
        return (
            False,
            f"Keras backend is {keras.backend.backend()!r} (KERAS_BACKEND); the keras member needs 'tensorflow'",
        )
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


def _imu_branch(
    keras: Any, x: Any, mask3: Any, filters: list[int], kernels: list[int], dropout: float, prefix: str
) -> tuple[Any, Any]:
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
