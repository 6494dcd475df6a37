"""Small hand-made frames in the competition layout, for tests that need full control."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from scipy.spatial.transform import Rotation

from schema import ACC_COLS, ROT_COLS, THM_COLS, TOF_COLS

SHARED_CMI = Path(__file__).resolve().parents[2] / "shared" / "data" / "cmi"


def make_sequence(seq_id: str, n: int, seed: int = 0, subject: str = "SUBJ_000001", gesture: str = "Wave hello",
                  imu_only: bool = False) -> pl.DataFrame:
    """One physically consistent sequence: a slow rotation with gravity in the accelerometer."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) * 0.1
    rotvec = np.stack([0.3 * np.sin(t), 0.2 * np.cos(0.7 * t), 0.5 * t], axis=1) + rng.normal(0, 0.01, (n, 3))
    rot = Rotation.from_rotvec(rotvec)
    acc = rot.inv().apply(np.array([0.0, 0.0, 9.81])) + rng.normal(0, 0.05, (n, 3))
    q = rot.as_quat()[:, [3, 0, 1, 2]]
    q[q[:, 0] < 0] *= -1  # stored with w >= 0, as in the files
    cols: dict[str, object] = {
        "row_id": [f"{seq_id}_{i:06d}" for i in range(n)],
        "sequence_type": ["Non-Target"] * n,
        "sequence_id": [seq_id] * n,
        "sequence_counter": list(range(n)),
        "subject": [subject] * n,
        "orientation": ["Seated Straight"] * n,
        "behavior": ["Performs gesture"] * n,
        "phase": ["Gesture"] * n,
        "gesture": [gesture] * n,
    }
    for j, c in enumerate(ACC_COLS):
        cols[c] = acc[:, j].astype(np.float32)
    for j, c in enumerate(ROT_COLS):
        cols[c] = q[:, j].astype(np.float32)
    thm = 28 + rng.normal(0, 0.5, (n, len(THM_COLS)))
    tof = rng.integers(-1, 255, (n, len(TOF_COLS))).astype(np.float32)
    for j, c in enumerate(THM_COLS):
        cols[c] = None if imu_only else thm[:, j].astype(np.float32)
    df = pl.DataFrame(cols)
    if imu_only:
        return df.with_columns(*(pl.lit(None, dtype=pl.Float32).alias(c) for c in THM_COLS + TOF_COLS))
    return df.with_columns(pl.DataFrame(dict(zip(TOF_COLS, tof.T))))


def make_table(lengths: list[int], seed: int = 0) -> pl.DataFrame:
    return pl.concat([make_sequence(f"SEQ_{i:06d}", n, seed + i) for i, n in enumerate(lengths)])


def demographics(subjects: list[str], handedness: int = 1) -> pl.DataFrame:
    k = len(subjects)
    return pl.DataFrame({
        "subject": subjects, "adult_child": [1] * k, "age": [30.0] * k, "sex": [1] * k,
        "handedness": [handedness] * k, "height_cm": [170.0] * k, "shoulder_to_wrist_cm": [52.0] * k,
        "elbow_to_wrist_cm": [26.0] * k,
    })
