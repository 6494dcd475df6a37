"""Everything computed from raw sensor rows, shared by every trainer and by ``predict()``.

One code path: ``clean_sensors`` -> ``build_frame_table`` -> (``pad_batch`` for the
networks | ``sequence_aggregates`` for LightGBM). Training calls it on the whole
train table, the Predictor on one sequence; a test proves both give identical
arrays. Everything is vectorised over the whole table (numpy over row offsets,
polars for per-sequence fills): no Python loop over rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import polars as pl
from scipy.spatial.transform import Rotation

from config import FeatureConfig
from schema import (
    ACC_COLS,
    DEMOGRAPHIC_FEATURES,
    GRAVITY,
    IMU_COLS,
    N_TOF_SENSORS,
    ROT_COLS,
    SENSOR_COLS,
    THM_COLS,
    TOF_COLS,
    TOF_MAX,
    TOF_PIXELS,
)

log = logging.getLogger(__name__)

TOF_FAR = TOF_MAX + 1.0  # a frame whose sensor sees nothing in range reads as "further than anything"
MAX_ABS_READING = 1e4  # no sensor of the device reads beyond this (acc m/s², °C, ToF units): larger is a glitch

IMU_FEATURES: tuple[str, ...] = (
    "acc_x",
    "acc_y",
    "acc_z",
    "acc_mag",
    "linear_acc_x",
    "linear_acc_y",
    "linear_acc_z",
    "linear_acc_mag",  # world frame, gravity removed
    "body_linear_acc_x",
    "body_linear_acc_y",
    "body_linear_acc_z",  # device frame, gravity removed
    "omega_x",
    "omega_y",
    "omega_z",
    "omega_mag",  # angular velocity, rad/s, device frame
    "angular_distance",  # rotation angle between consecutive samples, rad
    "gravity_x",
    "gravity_y",
    "gravity_z",  # world "up" seen from the device: posture
    "rot_missing",  # 1 where the rotation was not measured (filled in, or estimated from gravity)
)
# Frame channels that are flags, not signals: no per-sequence statistics of them (the aggregates carry
# the sequence-level rot_missing already).
FLAG_FEATURES: tuple[str, ...] = ("rot_missing",)
TOF_FEATURES: tuple[str, ...] = ("tof_mean", "tof_std", "tof_min", "tof_max", "tof_valid_ratio") + tuple(
    f"tof{k}_{s}" for k in range(1, N_TOF_SENSORS + 1) for s in ("mean", "min", "valid_ratio")
)
THM_FEATURES: tuple[str, ...] = ("thm_mean", "thm_std", "thm_min", "thm_max", "thm_valid_ratio") + tuple(
    f"thm{k}" for k in range(1, 6)
)
TOFTHM_FEATURES: tuple[str, ...] = TOF_FEATURES + THM_FEATURES
FRAME_FEATURES: tuple[str, ...] = IMU_FEATURES + TOFTHM_FEATURES

AGG_STATS: tuple[str, ...] = (
    "mean",
    "std",
    "min",
    "max",
    "absdiff_mean",
    "tail_mean",
    "tail_std",
    "tail_min",
    "tail_max",
    "tail_absdiff_mean",
)


class FeatureError(ValueError):
    """Raw rows that cannot be turned into features; the message names the problem."""


def feature_index(names: tuple[str, ...] | list[str]) -> np.ndarray:
    pos = {n: i for i, n in enumerate(FRAME_FEATURES)}
    missing = [n for n in names if n not in pos]
    if missing:
        raise KeyError(f"unknown frame features: {missing}")
    return np.array([pos[n] for n in names], dtype=np.int64)


# --------------------------------------------------------------------------- cleaning

_NULL_TOKENS = ["", "NA", "NaN", "nan", "null", "NULL", "None"]


def clean_sensors(raw: pl.DataFrame) -> pl.DataFrame:
    """Validate and normalise raw rows: Float32 sensors, no inf/NaN (null instead), sorted, unique.

    Missing rot/thm/tof columns are added as nulls (a logged degradation); a
    missing ``sequence_id`` or acc column, zero rows, or a duplicated
    (sequence_id, sequence_counter) raise ``FeatureError``.
    """
    if raw.height == 0:
        raise FeatureError("no rows: a sequence needs at least one time step")
    present = set(raw.columns)
    required = ["sequence_id", *ACC_COLS]
    missing = [c for c in required if c not in present]
    if missing:
        raise FeatureError(f"missing required column(s): {', '.join(missing)}")
    absent = [c for c in SENSOR_COLS if c not in present]
    if absent:
        groups = sorted({c.split("_v")[0] if c.startswith("tof") else c for c in absent})
        log.warning("%d sensor column(s) absent, treated as missing (null): %s", len(absent), ", ".join(groups[:12]))
    df = raw.with_columns(pl.lit(None, dtype=pl.Float32).alias(c) for c in absent)
    if "sequence_counter" not in df.columns:
        log.warning("no sequence_counter column: rows are taken in file order")
        df = df.with_columns(pl.int_range(pl.len()).over("sequence_id").alias("sequence_counter"))
    if "subject" not in df.columns:
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias("subject"))

    df = _cast_sensor_columns(df)
    df = df.with_columns(
        pl.col("sequence_id").cast(pl.String),
        pl.col("subject").cast(pl.String),
        pl.col("sequence_counter").cast(pl.Int64, strict=False),
    )
    if df["sequence_id"].null_count():
        raise FeatureError(f"{df['sequence_id'].null_count()} row(s) have no sequence_id")
    if df["sequence_counter"].null_count():
        raise FeatureError(f"{df['sequence_counter'].null_count()} row(s) have no integer sequence_counter")
    dup = df.select(pl.struct("sequence_id", "sequence_counter").is_duplicated().sum()).item()
    if dup:
        example = df.filter(pl.struct("sequence_id", "sequence_counter").is_duplicated()).row(0, named=True)
        raise FeatureError(
            f"{dup} rows share a (sequence_id, sequence_counter) with another row, e.g. "
            f"({example['sequence_id']}, {example['sequence_counter']})"
        )
    ordered = df.select(
        (pl.col("sequence_id") >= pl.col("sequence_id").shift(1)).all()
        & (
            (pl.col("sequence_id") != pl.col("sequence_id").shift(1))
            | (pl.col("sequence_counter") > pl.col("sequence_counter").shift(1))
        ).all()
    ).item()
    if not ordered:
        log.info("rows were not sorted by (sequence_id, sequence_counter): sorted them")
        df = df.sort(["sequence_id", "sequence_counter"], maintain_order=True)
    return df


def _cast_sensor_columns(df: pl.DataFrame) -> pl.DataFrame:
    """Cast every sensor column to Float32; String columns (the gateway's IMU-only trap) are parsed strictly."""
    schema = df.schema  # building a Schema is costly: once, not per column
    string_cols = [c for c in SENSOR_COLS if schema[c] == pl.String]
    if string_cols:
        parsed = df.select(
            pl.col(c).str.strip_chars().replace(_NULL_TOKENS, None).cast(pl.Float64, strict=False).alias(c)
            for c in string_cols
        )
        given = df.select(
            pl.col(c).str.strip_chars().replace(_NULL_TOKENS, None).is_not_null().sum().alias(c) for c in string_cols
        )
        bad = [c for c in string_cols if parsed[c].is_not_null().sum() < given[c].item()]
        if bad:
            sample = df.select(
                pl.col(bad[0]).filter(parsed[bad[0]].is_null() & df[bad[0]].is_not_null()).first()
            ).item()
            raise FeatureError(f"non-numeric text in sensor column(s) {', '.join(bad[:5])}: e.g. {sample!r}")
        df = df.with_columns(parsed)
        schema = df.schema
    non_numeric = [c for c in SENSOR_COLS if not (schema[c].is_numeric() or schema[c] == pl.Null)]
    if non_numeric:
        raise FeatureError(
            "sensor column(s) of a non-numeric dtype: " + ", ".join(f"{c} ({schema[c]})" for c in non_numeric[:5])
        )
    to_cast = {c: pl.Float32 for c in SENSOR_COLS if schema[c] != pl.Float32}
    if to_cast:
        df = df.cast(to_cast)  # one call: building 336 cast expressions costs more than the cast on one sequence
    # NaN, +-inf and physically absurd magnitudes are "no reading", like null (they would overflow the
    # physics). ToF (320 columns) is masked later in numpy, where it is cheaper.
    return df.with_columns(
        pl.when(pl.col(c).abs() <= MAX_ABS_READING).then(pl.col(c)).otherwise(None).alias(c)
        for c in IMU_COLS + THM_COLS
    )


def drop_tof_thm(raw: pl.DataFrame) -> pl.DataFrame:
    """The IMU-only view of the same rows: every thm/tof value null, as in half the hidden test."""
    cols = [c for c in THM_COLS + TOF_COLS if c in raw.columns]
    return raw.with_columns(pl.lit(None, dtype=pl.Float32).alias(c) for c in cols)


# --------------------------------------------------------------------------- frame table


@dataclass(frozen=True)
class FrameTable:
    """Frame features of many sequences, stored as one row block with offsets."""

    sequence_ids: np.ndarray  # (n_seq,) str, sorted
    offsets: np.ndarray  # (n_seq + 1,) int64
    values: np.ndarray  # (n_rows, C) float32, finite
    has_tof_thm: np.ndarray  # (n_seq,) bool
    rot_missing: np.ndarray  # (n_seq,) bool
    subjects: np.ndarray  # (n_seq,) str
    demographics: np.ndarray  # (n_seq, 7) float32, NaN when unknown
    feature_names: tuple[str, ...] = field(default=FRAME_FEATURES)
    # Raw per-pixel ToF, (n_rows, 5, 64) float16 after cleaning and left-hand mirroring: NaN = missing,
    # -1 = nothing in range, else the reading (0-254, exact in float16). None when no row has a ToF value.
    # Carried beside ``values`` (which holds only ToF aggregates) for members that read the 8x8 grids.
    tof_pixels: np.ndarray | None = None

    @property
    def n_sequences(self) -> int:
        return len(self.sequence_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def select(self, idx: np.ndarray | list[int]) -> FrameTable:
        """A table of the given sequences, in the given order."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.lengths[idx]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        rows = _ranges(self.offsets[idx], lengths)
        return replace(
            self,
            sequence_ids=self.sequence_ids[idx],
            offsets=offsets,
            values=self.values[rows],
            has_tof_thm=self.has_tof_thm[idx],
            rot_missing=self.rot_missing[idx],
            subjects=self.subjects[idx],
            demographics=self.demographics[idx],
            tof_pixels=None if self.tof_pixels is None else self.tof_pixels[rows],
        )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for every (s, n), without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seq_of_row = np.repeat(np.arange(len(lengths)), lengths)
    first_row = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return (starts[seq_of_row] + np.arange(total) - first_row[seq_of_row]).astype(np.int64)


def build_frame_table(
    raw: pl.DataFrame, demographics: pl.DataFrame | None = None, cfg: FeatureConfig | None = None
) -> FrameTable:
    """Frame features for every sequence in ``raw`` (cleaned here; cleaning is idempotent)."""
    cfg = cfg or FeatureConfig()
    df = clean_sensors(raw)
    seq_ids, offsets = _sequence_offsets(df["sequence_id"])
    n_rows = df.height
    subjects = df["subject"].gather(offsets[:-1]).fill_null("").to_numpy().astype(str)
    demo = _demographics_matrix(subjects, demographics)
    seq_of_row = np.repeat(np.arange(len(seq_ids)), np.diff(offsets))
    is_start = np.zeros(n_rows, dtype=bool)
    is_start[offsets[:-1]] = True

    acc, quat, rot_missing_rows = _filled_imu(df, offsets, cfg)
    rot_missing = np.zeros(len(seq_ids), dtype=bool)
    np.logical_or.at(rot_missing, seq_of_row, rot_missing_rows)

    thm = df.select(THM_COLS).to_numpy().astype(np.float32)  # NaN = missing
    # np.array copies: polars may hand out a read-only view
    tof = np.array(df.select(TOF_COLS).to_numpy(), dtype=np.float32).reshape(n_rows, N_TOF_SENSORS, TOF_PIXELS)
    tof[~(np.abs(tof) <= MAX_ABS_READING)] = np.nan  # inf, NaN and absurd values are no reading, like null
    has_tof_thm = np.zeros(len(seq_ids), dtype=bool)
    np.logical_or.at(has_tof_thm, seq_of_row, ~np.isnan(thm).all(axis=1) | ~np.isnan(tof).all(axis=(1, 2)))

    if cfg.mirror_left_handed:
        left = ~np.isnan(demo[:, DEMOGRAPHIC_FEATURES.index("handedness")]) & (
            demo[:, DEMOGRAPHIC_FEATURES.index("handedness")] == 0
        )
        if left.any():
            acc, quat, thm, tof = _mirror(left[seq_of_row], acc, quat, thm, tof)

    quat = _continuous_sign(quat, is_start)
    imu = np.concatenate([_imu_features(acc, quat, offsets, cfg.dt), rot_missing_rows[:, None]], axis=1)
    values = np.concatenate([imu, _tof_features(tof), _thm_features(thm)], axis=1).astype(np.float32)
    if not np.isfinite(values).all():  # every input was filled; a non-finite value here is a bug
        raise FeatureError("non-finite frame features after cleaning")
    return FrameTable(
        sequence_ids=seq_ids,
        offsets=offsets,
        values=values,
        has_tof_thm=has_tof_thm,
        rot_missing=rot_missing,
        subjects=subjects,
        demographics=demo,
        tof_pixels=tof.astype(np.float16) if not np.isnan(tof).all() else None,
    )


def _sequence_offsets(sequence_id: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    ids = sequence_id.to_numpy().astype(str)
    starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
    offsets = np.concatenate([starts, [len(ids)]]).astype(np.int64)
    return ids[starts], offsets


def _demographics_matrix(subjects: np.ndarray, demographics: pl.DataFrame | None) -> np.ndarray:
    out = np.full((len(subjects), len(DEMOGRAPHIC_FEATURES)), np.nan, dtype=np.float32)
    if demographics is None or demographics.height == 0:
        return out
    if "subject" not in demographics.columns:
        raise FeatureError("demographics has no 'subject' column")
    schema = demographics.schema
    nested = [c for c in DEMOGRAPHIC_FEATURES if c in schema and schema[c].is_nested()]
    if nested:
        log.warning("demographics column(s) %s hold nested values: ignored", ", ".join(nested))
    cols = [c for c in DEMOGRAPHIC_FEATURES if c in schema and c not in nested]
    demo = demographics.select(
        pl.col("subject").cast(pl.String),
        *(pl.col(c).cast(pl.Float32, strict=False) for c in cols),
    ).unique("subject", keep="first")
    joined = pl.DataFrame({"subject": subjects}).join(demo, on="subject", how="left", maintain_order="left")
    for j, c in enumerate(DEMOGRAPHIC_FEATURES):
        if c in cols:
            out[:, j] = joined[c].to_numpy().astype(np.float32)
    return out


def _filled_imu(df: pl.DataFrame, offsets: np.ndarray, cfg: FeatureConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """acc and rot with gaps filled within each sequence; rows whose rotation had to be invented are flagged.

    A sequence with no rotation at all gets one estimated from gravity (``cfg.rot_fallback="gravity"``):
    the low-passed accelerometer is the device-frame "up" while the wrist moves slowly, and the
    smallest rotation taking it to world z gives tilt (yaw stays unknown). ``"identity"`` is the old
    answer, which leaves gravity inside the "linear" acceleration.
    """
    rot_null = df.select(pl.any_horizontal(pl.col(c).is_null() for c in ROT_COLS)).to_series().to_numpy()
    filled = df.select(
        *(pl.col(c).forward_fill().backward_fill().over("sequence_id") for c in ACC_COLS),
        # a partly missing quaternion is unusable: blank the whole row before filling
        *(
            pl.when(pl.any_horizontal(pl.col(r).is_null() for r in ROT_COLS))
            .then(None)
            .otherwise(pl.col(c))
            .forward_fill()
            .backward_fill()
            .over("sequence_id")
            .alias(c)
            for c in ROT_COLS
        ),
    )
    acc = filled.select(ACC_COLS).to_numpy().astype(np.float64)
    n_acc_missing = int(np.isnan(acc).any(axis=1).sum())
    if n_acc_missing:
        log.warning("%d row(s) with no accelerometer reading in the whole sequence: set to 0", n_acc_missing)
        acc = np.nan_to_num(acc, nan=0.0)
    quat = filled.select(ROT_COLS).to_numpy().astype(np.float64)  # w, x, y, z
    norm = np.linalg.norm(quat, axis=1)
    bad = ~np.isfinite(norm) | (norm < 1e-6)
    quat[~bad] /= norm[~bad, None]
    if bad.any():  # no rotation known in the whole sequence
        if cfg.rot_fallback == "gravity":
            quat[bad] = gravity_aligned_quat(acc, offsets, cfg.gravity_window)[bad]
        else:
            quat[bad] = (1.0, 0.0, 0.0, 0.0)
    return acc, quat, rot_null | bad


def low_pass(values: np.ndarray, offsets: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of ``window`` rows, never across a sequence boundary (cumulative sums)."""
    n = len(values)
    half = max(0, int(window) // 2)
    seq_of_row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    rows = np.arange(n)
    lo = np.maximum(rows - half, offsets[:-1][seq_of_row])
    hi = np.minimum(rows + half + 1, offsets[1:][seq_of_row])
    csum = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(values, axis=0)])
    return (csum[hi] - csum[lo]) / (hi - lo)[:, None]


def gravity_aligned_quat(acc: np.ndarray, offsets: np.ndarray, window: int) -> np.ndarray:
    """Scalar-first quaternions of the smallest rotation taking low-passed acceleration to world +z."""
    up = low_pass(acc, offsets, window)
    norm = np.linalg.norm(up, axis=1, keepdims=True)
    u = np.where(norm > 1e-6, up / np.maximum(norm, 1e-12), [0.0, 0.0, 1.0])
    z = np.array([0.0, 0.0, 1.0])
    axis = np.cross(u, z)
    sin, cos = np.linalg.norm(axis, axis=1), u @ z
    angle = np.arctan2(sin, cos)
    # Upside down (u = -z): any horizontal axis does; x is taken.
    axis = np.where(sin[:, None] > 1e-9, axis / np.maximum(sin, 1e-12)[:, None], [1.0, 0.0, 0.0])
    q = Rotation.from_rotvec(axis * angle[:, None]).as_quat()  # scalar-last
    return q[:, [3, 0, 1, 2]]


def _mirror(
    rows: np.ndarray, acc: np.ndarray, quat: np.ndarray, thm: np.ndarray, tof: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Map left-hand wearers onto the right-hand signal: reflect x, swap sensors 3<->5, flip ToF grids."""
    acc, quat, thm, tof = acc.copy(), quat.copy(), thm.copy(), tof.copy()
    acc[rows, 0] *= -1
    quat[rows, 2:4] *= -1  # reflection across the device's x axis: (w, x, -y, -z)
    thm[np.ix_(rows, [2, 4])] = thm[np.ix_(rows, [4, 2])]
    tof[rows] = tof[rows][:, [0, 1, 4, 3, 2], :]
    grid = tof[rows].reshape(-1, N_TOF_SENSORS, 8, 8)[..., ::-1]
    tof[rows] = grid.reshape(-1, N_TOF_SENSORS, TOF_PIXELS)
    return acc, quat, thm, tof


def _continuous_sign(quat: np.ndarray, is_start: np.ndarray) -> np.ndarray:
    """Flip q -> -q where needed so consecutive quaternions of a sequence stay on one hemisphere."""
    dots = np.einsum("ij,ij->i", quat[1:], quat[:-1])
    flip = np.concatenate([[False], dots < 0]) & ~is_start
    parity = np.cumsum(flip)
    parity = parity - parity[np.maximum.accumulate(np.where(is_start, np.arange(len(quat)), 0))]
    sign = np.where(parity % 2 == 1, -1.0, 1.0)
    return quat * sign[:, None]


def _imu_features(acc: np.ndarray, quat: np.ndarray, offsets: np.ndarray, dt: float) -> np.ndarray:
    n = len(acc)
    rot = Rotation.from_quat(quat[:, [1, 2, 3, 0]])  # scipy is scalar-last; the files are scalar-first
    up = np.array([0.0, 0.0, GRAVITY])
    world_acc = rot.apply(acc)
    linear = world_acc - up
    gravity_body = rot.inv().apply(up)
    body_linear = acc - gravity_body
    omega = np.zeros((n, 3))
    if n > 1:
        rel = rot[:-1].inv() * rot[1:]  # q_t^-1 q_{t+1}: the step's rotation in the device frame
        omega[:-1] = rel.as_rotvec()
        omega[offsets[1:-1] - 1] = 0.0  # no step across a sequence boundary
        omega[offsets[-1] - 1] = 0.0
    angle = np.linalg.norm(omega, axis=1)
    cols = [
        acc,
        np.linalg.norm(acc, axis=1, keepdims=True),
        linear,
        np.linalg.norm(linear, axis=1, keepdims=True),
        body_linear,
        omega / dt,
        (angle / dt)[:, None],
        angle[:, None],
        gravity_body / GRAVITY,
    ]
    return np.concatenate(cols, axis=1)


def _masked_stats(x: np.ndarray, valid: np.ndarray, axis: tuple[int, ...] | int) -> tuple[np.ndarray, ...]:
    count = valid.sum(axis=axis)
    safe = np.maximum(count, 1)
    xs = np.where(valid, x, 0.0)
    mean = xs.sum(axis=axis) / safe
    var = np.where(valid, x * x, 0.0).sum(axis=axis) / safe - mean**2
    std = np.sqrt(np.maximum(var, 0.0))
    mn = np.where(valid, x, np.inf).min(axis=axis)
    mx = np.where(valid, x, -np.inf).max(axis=axis)
    return count, mean, std, mn, mx


def _tof_features(tof: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Per-frame ToF statistics, in row chunks so the temporaries stay small and cache-friendly."""
    if len(tof) <= chunk:
        return _tof_features_block(tof)
    return np.concatenate([_tof_features_block(tof[i : i + chunk]) for i in range(0, len(tof), chunk)])


def _tof_features_block(tof: np.ndarray) -> np.ndarray:
    """Per-frame ToF statistics over in-range pixels; -1 (nothing in range) counts as far, null as absent.

    ``tof`` is (n, 5, 64) float32 with NaN for missing. Per-sensor sums are
    computed once and the all-sensor statistics derived from them: this is the
    hot loop of feature building (320 values per frame).
    """
    n = len(tof)
    in_range = tof >= 0  # NaN compares False
    s_present = (~np.isnan(tof)).sum(axis=2)  # (n, 5) pixels reported per sensor
    s_count = in_range.sum(axis=2)
    xs = np.where(in_range, tof, np.float32(0))
    s_sum = xs.sum(axis=2, dtype=np.float64)
    s_sq = np.einsum("ijk,ijk->ij", xs, xs, dtype=np.float64)
    s_min = np.where(in_range, tof, np.float32(np.inf)).min(axis=2)
    s_max = np.where(in_range, tof, np.float32(-np.inf)).max(axis=2)

    count, present = s_count.sum(axis=1), s_present.sum(axis=1)
    safe = np.maximum(count, 1)
    mean = s_sum.sum(axis=1) / safe
    std = np.sqrt(np.maximum(s_sq.sum(axis=1) / safe - mean**2, 0.0))
    seen, far = count > 0, (present > 0) & (count == 0)
    out = np.zeros((n, len(TOF_FEATURES)), dtype=np.float64)
    out[:, 0] = np.where(seen, mean, np.where(far, TOF_FAR, 0.0))
    out[:, 1] = np.where(seen, std, 0.0)
    out[:, 2] = np.where(seen, s_min.min(axis=1), np.where(far, TOF_FAR, 0.0))
    out[:, 3] = np.where(seen, s_max.max(axis=1), np.where(far, TOF_FAR, 0.0))
    out[:, 4] = count / np.maximum(present, 1)

    s_seen, s_far = s_count > 0, (s_present > 0) & (s_count == 0)
    s_mean = np.where(s_seen, s_sum / np.maximum(s_count, 1), np.where(s_far, TOF_FAR, 0.0))
    s_min = np.where(s_seen, s_min, np.where(s_far, TOF_FAR, 0.0))
    s_valid = np.where(s_present > 0, s_count / TOF_PIXELS, 0.0)
    out[:, 5:] = np.stack([s_mean, s_min, s_valid], axis=2).reshape(n, -1)
    return out


def _thm_features(thm: np.ndarray) -> np.ndarray:
    valid = ~np.isnan(thm)
    count, mean, std, mn, mx = _masked_stats(thm.astype(np.float64), valid, axis=1)
    seen = count > 0
    stats = np.stack(
        [
            np.where(seen, mean, 0.0),
            np.where(seen, std, 0.0),
            np.where(seen, mn, 0.0),
            np.where(seen, mx, 0.0),
            count / thm.shape[1],
        ],
        axis=1,
    )
    return np.concatenate([stats, np.nan_to_num(thm, nan=0.0)], axis=1)


# --------------------------------------------------------------------------- scaling and padding


@dataclass(frozen=True)
class ScalerStats:
    """Per-channel mean and std, fitted on training rows only and stored in each bundle."""

    mean: np.ndarray  # (C,) float32
    std: np.ndarray  # (C,) float32, never below 1e-6

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.astype(float).tolist(), "std": self.std.astype(float).tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScalerStats:
        mean = np.asarray(d["mean"], dtype=np.float32)
        std = np.asarray(d["std"], dtype=np.float32)
        if mean.shape != std.shape or mean.ndim != 1:
            raise ValueError(f"scaler statistics of mismatched shapes {mean.shape} / {std.shape}")
        return cls(mean=mean, std=std)


def fit_scaler(table: FrameTable, seq_idx: np.ndarray | None = None) -> ScalerStats:
    """Mean/std over every frame of the given sequences (all of them when ``seq_idx`` is None)."""
    values = table.values if seq_idx is None else table.select(seq_idx).values
    if len(values) == 0:
        raise ValueError("cannot fit a scaler on zero rows")
    mean = values.mean(axis=0, dtype=np.float64)
    std = values.std(axis=0, dtype=np.float64)
    std = np.where(std < 1e-6, 1.0, std)  # constant channels pass through centred
    flags = feature_index(FLAG_FEATURES)
    mean[flags], std[flags] = 0.0, 1.0  # flags stay 0/1: a rare flag would otherwise be scaled to ~10
    return ScalerStats(mean=mean.astype(np.float32), std=std.astype(np.float32))


def pad_length(lengths: np.ndarray, percentile: float = 95.0, minimum: int = 32) -> int:
    """The pad length: a percentile of training lengths, never below ``minimum``."""
    if len(lengths) == 0:
        raise ValueError("no sequence lengths to choose a pad length from")
    return max(int(minimum), int(np.ceil(np.percentile(lengths, percentile))))


def resolve_pad_len(train_lengths: np.ndarray, cfg: FeatureConfig) -> int:
    """``cfg.pad_len`` when fixed (> 0), else the configured percentile of the training lengths."""
    if cfg.pad_len > 0:
        return int(cfg.pad_len)
    return pad_length(train_lengths, cfg.pad_percentile, cfg.min_pad_len)


def pad_batch(
    table: FrameTable, seq_idx: np.ndarray | list[int] | None, pad_len: int, scaler: ScalerStats | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(x, mask) of shape (n, pad_len, C) / (n, pad_len): the tail of each sequence, padded at the front.

    The gesture is at the end of a sequence, so a long sequence loses its start,
    never its end. Padding is 0 after scaling and False in the mask.
    """
    if pad_len < 1:
        raise ValueError(f"pad_len must be >= 1, got {pad_len}")
    idx = np.arange(table.n_sequences) if seq_idx is None else np.asarray(seq_idx, dtype=np.int64)
    lengths = table.lengths[idx]
    keep = np.minimum(lengths, pad_len)
    n, c = len(idx), table.values.shape[1]
    x = np.zeros((n, pad_len, c), dtype=np.float32)
    mask = np.zeros((n, pad_len), dtype=bool)
    if n == 0:
        return x, mask
    src = _ranges(table.offsets[idx + 1] - keep, keep)  # the last `keep` rows of each sequence
    batch_of = np.repeat(np.arange(n), keep)
    first = np.concatenate([[0], np.cumsum(keep)[:-1]])
    pos = pad_len - keep[batch_of] + (np.arange(len(src)) - first[batch_of])
    values = table.values[src]
    x[batch_of, pos] = scaler.transform(values) if scaler is not None else values
    mask[batch_of, pos] = True
    return x, mask


def pad_tof_pixels(table: FrameTable, seq_idx: np.ndarray | list[int] | None, pad_len: int) -> np.ndarray:
    """Raw ToF grids aligned with ``pad_batch``: (n, pad_len, 5, 64) float16, tail kept, padded at the front.

    Padding and tables without ToF (``tof_pixels`` None) read NaN (missing), like an absent sensor.
    """
    if pad_len < 1:
        raise ValueError(f"pad_len must be >= 1, got {pad_len}")
    idx = np.arange(table.n_sequences) if seq_idx is None else np.asarray(seq_idx, dtype=np.int64)
    out = np.full((len(idx), pad_len, N_TOF_SENSORS, TOF_PIXELS), np.nan, dtype=np.float16)
    if table.tof_pixels is None or len(idx) == 0:
        return out
    keep = np.minimum(table.lengths[idx], pad_len)
    src = _ranges(table.offsets[idx + 1] - keep, keep)
    batch_of = np.repeat(np.arange(len(idx)), keep)
    first = np.concatenate([[0], np.cumsum(keep)[:-1]])
    pos = pad_len - keep[batch_of] + (np.arange(len(src)) - first[batch_of])
    out[batch_of, pos] = table.tof_pixels[src]
    return out


# --------------------------------------------------------------------------- per-sequence aggregates


def aggregated_channels(imu_only: bool = False) -> tuple[str, ...]:
    channels = IMU_FEATURES if imu_only else FRAME_FEATURES
    return tuple(c for c in channels if c not in FLAG_FEATURES)


def aggregate_feature_names(imu_only: bool = False) -> list[str]:
    names = [f"{c}__{s}" for c in aggregated_channels(imu_only) for s in AGG_STATS]
    return names + [f"demo_{d}" for d in DEMOGRAPHIC_FEATURES] + ["seq_len", "rot_missing"]


def sequence_aggregates(
    table: FrameTable, cfg: FeatureConfig | None = None, imu_only: bool = False
) -> tuple[np.ndarray, list[str]]:
    """Per-sequence statistics over the whole sequence and over its final part, plus demographics."""
    cfg = cfg or FeatureConfig()
    cols = feature_index(aggregated_channels(imu_only))
    values = table.values[:, cols].astype(np.float64)
    lengths = table.lengths
    whole = _segment_stats(values, table.offsets)
    tail_len = np.maximum(1, np.ceil(lengths * cfg.tail_fraction).astype(np.int64))
    tail_rows = _ranges(table.offsets[1:] - tail_len, tail_len)
    tail_offsets = np.concatenate([[0], np.cumsum(tail_len)]).astype(np.int64)
    tail = _segment_stats(values[tail_rows], tail_offsets)
    per_channel = np.stack(whole + tail, axis=2)  # (n_seq, C, 10) in AGG_STATS order
    out = np.concatenate(
        [
            per_channel.reshape(len(lengths), -1),
            table.demographics.astype(np.float64),
            lengths[:, None].astype(np.float64),
            table.rot_missing[:, None].astype(np.float64),
        ],
        axis=1,
    ).astype(np.float32)
    return out, aggregate_feature_names(imu_only)


def _segment_stats(values: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """mean, std, min, max, mean |diff| of each segment ``values[offsets[i]:offsets[i+1]]``."""
    starts = offsets[:-1]
    counts = np.diff(offsets)[:, None].astype(np.float64)
    total = np.add.reduceat(values, starts, axis=0)
    mean = total / counts
    sq = np.add.reduceat(values * values, starts, axis=0) / counts
    std = np.sqrt(np.maximum(sq - mean**2, 0.0))
    mn = np.minimum.reduceat(values, starts, axis=0)
    mx = np.maximum.reduceat(values, starts, axis=0)
    diff = np.abs(np.diff(values, axis=0, prepend=values[:1]))
    diff[starts] = 0.0  # no difference across a segment boundary
    absdiff = np.add.reduceat(diff, starts, axis=0) / np.maximum(counts - 1, 1)
    return [mean, std, mn, mx, absdiff]
