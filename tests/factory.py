"""Small hand-made frames in the competition layout, for tests that need full control."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from scipy.spatial.transform import Rotation

from schema import ACC_COLS, ROT_COLS, THM_COLS, TOF_COLS

SHARED_CMI = Path(__file__).resolve().parents[2] / "shared" / "data" / "cmi"
# The environment of the end-to-end subprocess tests: LightGBM only (fast), 3 folds, one thread.
LGBM_ONLY_ENV = {
    "CMI_N_FOLDS": "3",
    "TORCH_TRAIN": "0",
    "KERAS_TRAIN": "0",
    "USE_TORCH": "0",
    "USE_KERAS": "0",
    "BRANCHNET_TRAIN": "0",
    "USE_BRANCHNET": "0",
    "CMI_N_THREADS": "1",
}


def make_sequence(
    seq_id: str,
    n: int,
    seed: int = 0,
    subject: str = "SUBJ_000001",
    gesture: str = "Wave hello",
    imu_only: bool = False,
) -> pl.DataFrame:
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
    return pl.DataFrame(
        {
            "subject": subjects,
            "adult_child": [1] * k,
            "age": [30.0] * k,
            "sex": [1] * k,
            "handedness": [handedness] * k,
            "height_cm": [170.0] * k,
            "shoulder_to_wrist_cm": [52.0] * k,
            "elbow_to_wrist_cm": [26.0] * k,
        }
    )


def labelled_rows(
    n_subjects: int = 3,
    classes: tuple[int, ...] = tuple(range(6)),
    reps: int = 3,
    seed: int = 0,
    imu_only_every: int = 0,
    min_len: int = 30,
    max_len: int = 50,
) -> pl.DataFrame:
    """Train-layout rows (every column of train.csv) whose gesture is plain in every sensor group.

    Each class shakes an accelerometer axis (learnable from the IMU), and
    warms the thermopiles and moves the ToF distances in proportion to its index (learnable from
    thm/tof). Sequence ids sort in generation order; with ``imu_only_every=k`` every k-th sequence has
    no thm/tof at all, as half the hidden test has.
    """
    from metric import GESTURES
    from schema import BEHAVIORS, ORIENTATIONS, SENSOR_COLS, TRAIN_COLUMNS

    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {c: [] for c in TRAIN_COLUMNS if c not in SENSOR_COLS}
    blocks: list[np.ndarray] = []
    k = 0
    for s in range(n_subjects):
        for c_pos, c in enumerate(classes):
            for _ in range(reps):
                n = int(rng.integers(min_len, max_len))
                seq = f"SEQ_{k:06d}"
                t = np.arange(n) * 0.1
                acc = rng.normal(0.0, 0.2, (n, 3))
                acc[:, c_pos % 3] += 4.0 * np.sin(2 * np.pi * 1.5 * t)
                acc[:, 2] += 9.81
                # a slow, smooth wobble: per-step quaternion noise would read as huge angular velocities
                turn = 0.05 * np.column_stack([np.sin(t), np.cos(0.7 * t), np.zeros(n)])
                quat = np.column_stack([np.ones(n), turn + rng.normal(0, 0.002, (n, 3))])
                quat /= np.linalg.norm(quat, axis=1, keepdims=True)
                thm = 28.0 + 0.8 * c_pos + rng.normal(0, 0.2, (n, len(THM_COLS)))
                tof = 40.0 + 12.0 * c_pos + rng.normal(0, 3.0, (n, len(TOF_COLS)))
                tof[rng.random(tof.shape) < 0.1] = -1.0
                if imu_only_every and k % imu_only_every == 0:
                    thm[:], tof[:] = np.nan, np.nan
                blocks.append(np.column_stack([acc, quat, thm, tof]))
                cols["row_id"] += [f"{seq}_{i}" for i in range(n)]
                cols["sequence_type"] += ["Target" if c < 8 else "Non-Target"] * n
                cols["sequence_id"] += [seq] * n
                cols["sequence_counter"] += list(range(n))
                cols["subject"] += [f"SUBJ_{s:06d}"] * n
                cols["orientation"] += [ORIENTATIONS[k % len(ORIENTATIONS)]] * n
                cols["behavior"] += [BEHAVIORS[-1]] * n
                cols["phase"] += ["Transition"] * (n // 3) + ["Gesture"] * (n - n // 3)
                cols["gesture"] += [GESTURES[c]] * n
                k += 1
    sensors = np.concatenate(blocks).astype(np.float32)
    frame = pl.DataFrame({**cols, **{name: sensors[:, j] for j, name in enumerate(SENSOR_COLS)}})
    return frame.with_columns(pl.col(list(SENSOR_COLS)).fill_nan(None)).select(TRAIN_COLUMNS)


def labels_of(raw: pl.DataFrame, sequence_ids: np.ndarray) -> np.ndarray:
    """Class index of each of ``sequence_ids`` from the rows' gesture column."""
    from metric import GESTURES

    per_seq = dict(raw.select("sequence_id", "gesture").unique().iter_rows())
    return np.array([GESTURES.index(per_seq[s]) for s in sequence_ids], dtype=np.int64)


def training_data(
    raw: pl.DataFrame, n_folds: int = 2, demographics: pl.DataFrame | None = None, cfg: object = None, seed: int = 42
):
    """``member_base.TrainingData`` for ``raw``: both views, labels, subject-grouped stratified folds."""
    import cv
    import features
    import member_base
    from config import Config
    from member_base import TrainingData

    feat_cfg = (cfg or Config()).features
    table = features.build_frame_table(raw, demographics, feat_cfg)
    imu_table = features.build_frame_table(features.drop_tof_thm(raw), demographics, feat_cfg)
    y = labels_of(raw, table.sequence_ids)
    folds = cv.make_folds(table.sequence_ids, table.subjects, y, n_folds, seed)
    orientation = None
    if "orientation" in raw.columns:
        labels = raw.group_by("sequence_id").agg(pl.col("orientation").first()).sort("sequence_id")
        orientation = member_base.orientation_indices(labels)
    return TrainingData(
        table,
        imu_table,
        y,
        cv.fold_array(folds, table.sequence_ids),
        cv.folds_hash(folds),
        orientation=orientation,
        phase=member_base.phase_per_row(raw, table),
    )


def imu_separable_rows(
    classes: tuple[int, ...] = (0, 1, 8), n_per_class: int = 30, n_subjects: int = 4, seed: int = 1
) -> pl.DataFrame:
    """Minimal rows (IMU + thermopiles, no ToF, identity rotation) whose class is plain in the accelerometer.

    Each class shakes its own axis at 1.5 Hz; the thermopiles warm with the class too. Small networks learn
    it from the IMU alone in a few epochs, which is what the networks' learning tests need.
    """
    from metric import GESTURES

    rng = np.random.default_rng(seed)
    frames = []
    k = 0
    for c_pos, c in enumerate(classes):
        for _ in range(n_per_class):
            n = int(rng.integers(20, 60))
            t = np.arange(n) * 0.1
            acc = np.tile([0.0, 0.0, 9.81], (n, 1)) + rng.normal(0, 0.2, (n, 3))
            acc[:, c_pos % 3] += 4.0 * np.sin(2 * np.pi * 1.5 * t)
            thm = 28.0 + 2.0 * c_pos + rng.normal(0, 0.1, (n, len(THM_COLS)))
            data = {
                "sequence_id": [f"SEQ_{k:05d}"] * n,
                "sequence_counter": np.arange(n),
                "subject": [f"SUBJ_{k % n_subjects:03d}"] * n,
                "gesture": [GESTURES[c]] * n,
                "acc_x": acc[:, 0],
                "acc_y": acc[:, 1],
                "acc_z": acc[:, 2],
                "rot_w": np.ones(n),
                "rot_x": np.zeros(n),
                "rot_y": np.zeros(n),
                "rot_z": np.zeros(n),
            }
            data.update({col: thm[:, j] for j, col in enumerate(THM_COLS)})
            frames.append(pl.DataFrame(data))
            k += 1
    return pl.concat(frames)


def trained_lgbm_run(root: Path, env: dict[str, str], n_subjects: int, seed: int, n_test_subjects: int | None = None):
    """A real lgbm bundle trained through ``main.stage_train`` on generated data in ``root``.

    ``env``: an explicit settings mapping (the developer's shell must not change a test). Returns the config,
    the bundle folder, the test rows and demographics, and one full-sensor test sequence with its subject's row.
    """
    from types import SimpleNamespace

    import config
    import data
    import main
    from tools import synth

    kwargs = {} if n_test_subjects is None else {"n_test_subjects": n_test_subjects}
    synth.write_dataset(root / "data", n_subjects=n_subjects, seed=seed, **kwargs)
    cfg = config.load_config(env, data_dir=str(root / "data"), out_dir=str(root / "out"), debug=True)
    main.stage_train(cfg, ["lgbm"], main.StageTimer())
    test = data.read_test(root / "data")  # cleanly typed Float32 rows
    demo = data.read_demographics(root / "data" / "test_demographics.csv")
    has = test.group_by("sequence_id", maintain_order=True).agg(pl.col("thm_1").is_not_null().any().alias("h"))
    sid = has.filter(pl.col("h"))["sequence_id"][0]  # a full-sensor sequence
    seq = test.filter(pl.col("sequence_id") == sid)
    return SimpleNamespace(
        cfg=cfg,
        root=root,
        bundles=root / "out" / "bundles",
        test=test,
        demo_all=demo,
        seq=seq,
        demo=demo.filter(pl.col("subject") == seq["subject"][0]),
    )
