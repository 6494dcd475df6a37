import logging

import numpy as np
import polars as pl
import pytest
from scipy.spatial.transform import Rotation

import features as F
from config import FeatureConfig
from data import read_demographics, read_test
from schema import THM_COLS, TOF_COLS
from tests.factory import SHARED_CMI, demographics, make_sequence, make_table


def test_channel_layout():
    assert len(F.FRAME_FEATURES) >= 18 and len(set(F.FRAME_FEATURES)) == len(F.FRAME_FEATURES)
    assert set(F.IMU_FEATURES).isdisjoint(F.TOFTHM_FEATURES)
    for name in (
        "linear_acc_x",
        "omega_z",
        "linear_acc_mag",
        "omega_mag",
        "tof_mean",
        "tof_std",
        "tof_min",
        "tof_max",
        "tof_valid_ratio",
        "thm_mean",
        "thm_std",
        "thm_min",
        "thm_max",
        "thm_valid_ratio",
    ):
        assert name in F.FRAME_FEATURES


def test_real_sample_files_featurise():
    raw = pl.read_csv(SHARED_CMI / "train_sample.csv", infer_schema_length=10000)
    demo = read_demographics(SHARED_CMI / "train_demographics.csv")
    table = F.build_frame_table(raw, demo)
    assert table.n_sequences == 15 and table.values.shape == (1000, len(F.FRAME_FEATURES))
    assert np.isfinite(table.values).all() and table.has_tof_thm.all()
    # gravity removed in the world frame: the linear acceleration of real data is centred near 0
    lin = table.values[:, F.feature_index(["linear_acc_x", "linear_acc_y", "linear_acc_z"])]
    assert np.abs(np.median(lin, axis=0)).max() < 0.3
    test = F.build_frame_table(read_test(SHARED_CMI), read_demographics(SHARED_CMI / "test_demographics.csv"))
    assert list(test.lengths) == [56, 51]


def test_training_and_prediction_paths_are_identical():
    raw = pl.read_csv(SHARED_CMI / "train_sample.csv", infer_schema_length=10000)
    demo = read_demographics(SHARED_CMI / "train_demographics.csv")
    table = F.build_frame_table(raw, demo)
    aggs, _ = F.sequence_aggregates(table)
    for i in (0, 7, 14):
        alone = F.build_frame_table(raw.filter(pl.col("sequence_id") == table.sequence_ids[i]), demo)
        np.testing.assert_array_equal(alone.values, table.sequence(i))
        np.testing.assert_array_equal(F.sequence_aggregates(alone)[0][0], aggs[i])


def test_world_frame_physics_of_a_known_motion():
    # A device at rest: linear acceleration and angular velocity ~0, gravity direction follows the rotation.
    n = 20
    rot = Rotation.from_euler("xyz", [30, -20, 60], degrees=True)
    q = np.tile(rot.as_quat()[[3, 0, 1, 2]], (n, 1))
    acc = np.tile(rot.inv().apply([0, 0, 9.81]), (n, 1))
    df = make_sequence("SEQ_000001", n).with_columns(
        *(pl.Series(c, acc[:, j].astype(np.float32)) for j, c in enumerate(["acc_x", "acc_y", "acc_z"])),
        *(pl.Series(c, q[:, j].astype(np.float32)) for j, c in enumerate(["rot_w", "rot_x", "rot_y", "rot_z"])),
    )
    t = F.build_frame_table(df)
    v = {name: t.values[:, i] for i, name in enumerate(F.FRAME_FEATURES)}
    assert np.abs(v["linear_acc_mag"]).max() < 1e-3
    assert np.abs(v["omega_mag"]).max() < 1e-3
    np.testing.assert_allclose(
        np.stack([v["gravity_x"], v["gravity_y"], v["gravity_z"]], 1)[0], rot.inv().apply([0, 0, 1]), atol=1e-5
    )


def test_angular_velocity_of_a_constant_spin_and_sign_flips():
    n, rate = 30, 1.0  # rad/s about z
    rot = Rotation.from_rotvec(np.stack([np.zeros(n), np.zeros(n), rate * 0.1 * np.arange(n)], 1))
    q = rot.as_quat()[:, [3, 0, 1, 2]]
    q[::3] *= -1  # stored signs flip: the same rotations
    df = make_sequence("SEQ_000001", n).with_columns(
        *(pl.Series(c, q[:, j].astype(np.float32)) for j, c in enumerate(["rot_w", "rot_x", "rot_y", "rot_z"]))
    )
    t = F.build_frame_table(df)
    omega_z = t.values[:-1, F.FRAME_FEATURES.index("omega_z")]
    np.testing.assert_allclose(omega_z, rate, atol=1e-3)
    assert t.values[-1, F.FRAME_FEATURES.index("omega_mag")] == 0.0  # no step after the last sample


def test_tof_minus_one_is_far_not_a_distance_and_missing_is_zero():
    df = make_sequence("SEQ_000001", 4)
    grid = np.full((4, len(TOF_COLS)), -1.0, dtype=np.float32)
    grid[0, :32] = 100.0  # frame 0: half of sensor 1 sees something at 100
    df = df.with_columns(pl.DataFrame(dict(zip(TOF_COLS, grid.T))))
    t = F.build_frame_table(df)
    v = lambda name: t.values[:, F.FRAME_FEATURES.index(name)]  # noqa: E731
    assert v("tof_mean")[0] == pytest.approx(100.0)  # the -1 pixels are not averaged in
    assert v("tof_valid_ratio")[0] == pytest.approx(32 / 320)
    assert v("tof1_valid_ratio")[0] == pytest.approx(0.5)
    assert v("tof_mean")[1] == pytest.approx(F.TOF_FAR)  # nothing in range: far
    imu = F.build_frame_table(F.drop_tof_thm(df))
    w = lambda name: imu.values[:, F.FRAME_FEATURES.index(name)]  # noqa: E731
    assert not imu.has_tof_thm[0]
    assert (w("tof_mean") == 0).all() and (w("tof_valid_ratio") == 0).all() and (w("thm_valid_ratio") == 0).all()


def test_string_typed_and_null_columns_are_cast(caplog):
    df = make_sequence("SEQ_000001", 6, imu_only=True)
    as_text = df.with_columns(*(pl.col(c).cast(pl.String) for c in THM_COLS), pl.col("acc_x").cast(pl.String))
    as_null = df.with_columns(*(pl.lit(None).alias(c) for c in TOF_COLS))
    base = F.build_frame_table(df)
    np.testing.assert_array_equal(F.build_frame_table(as_text).values, base.values)
    np.testing.assert_array_equal(F.build_frame_table(as_null).values, base.values)
    bad = df.with_columns(pl.Series("acc_y", ["1.0", "x"] + ["2"] * 4))
    with pytest.raises(F.FeatureError, match="acc_y"):
        F.build_frame_table(bad)


def test_bad_input_errors_and_degradations(caplog):
    df = make_sequence("SEQ_000001", 8)
    with pytest.raises(F.FeatureError, match="acc_z"):
        F.build_frame_table(df.drop("acc_z"))
    with pytest.raises(F.FeatureError, match="no rows"):
        F.build_frame_table(df.head(0))
    with pytest.raises(F.FeatureError, match="SEQ_000001, 3"):
        F.build_frame_table(pl.concat([df, df.slice(3, 1)]))
    # unsorted counters are sorted (logged), giving the same features
    with caplog.at_level(logging.INFO):
        shuffled = F.build_frame_table(df.sample(fraction=1.0, shuffle=True, seed=1))
    assert "sorted" in caplog.text
    np.testing.assert_array_equal(shuffled.values, F.build_frame_table(df).values)
    # NaN / inf / missing rotation: filled, flagged, finite
    broken = df.with_columns(pl.lit(float("nan")).alias("rot_w"), pl.Series("acc_x", [np.inf] + [1.0] * 7))
    t = F.build_frame_table(broken)
    assert t.rot_missing[0] and np.isfinite(t.values).all()
    # one-row and two-row sequences
    for n in (1, 2):
        assert F.build_frame_table(df.head(n)).values.shape == (n, len(F.FRAME_FEATURES))
    # absent sensor columns are treated as missing, with a warning
    with caplog.at_level(logging.WARNING):
        t = F.build_frame_table(df.drop(list(TOF_COLS[:64])))
    assert "absent" in caplog.text and np.isfinite(t.values).all()


def test_left_handed_mirroring():
    df = make_sequence("SEQ_000001", 10, subject="SUBJ_L")
    right = F.build_frame_table(df, demographics(["SUBJ_L"], handedness=1))
    left = F.build_frame_table(df, demographics(["SUBJ_L"], handedness=0))
    ax = F.FRAME_FEATURES.index("acc_x")
    np.testing.assert_allclose(left.values[:, ax], -right.values[:, ax])
    off = F.build_frame_table(df, demographics(["SUBJ_L"], handedness=0), FeatureConfig(mirror_left_handed=False))
    np.testing.assert_array_equal(off.values, right.values)
    i3, i5 = F.FRAME_FEATURES.index("thm3"), F.FRAME_FEATURES.index("thm5")
    np.testing.assert_array_equal(left.values[:, i3], right.values[:, i5])


def test_pad_batch_keeps_the_tail_and_pads_the_front():
    raw = make_table([5, 12])
    t = F.build_frame_table(raw)
    x, mask = F.pad_batch(t, None, 8)
    assert x.shape == (2, 8, len(F.FRAME_FEATURES))
    assert mask[0].tolist() == [False] * 3 + [True] * 5
    np.testing.assert_array_equal(x[0, 3:], t.sequence(0))
    assert (x[0, :3] == 0).all()
    np.testing.assert_array_equal(x[1], t.sequence(1)[-8:])  # the end of the long sequence survives
    scaler = F.fit_scaler(t, np.array([1]))
    xs, _ = F.pad_batch(t, [1], 8, scaler)
    np.testing.assert_allclose(xs[0], scaler.transform(t.sequence(1)[-8:]))


def test_scaler_uses_only_given_rows_and_round_trips():
    t = F.build_frame_table(make_table([6, 9, 4]))
    s = F.fit_scaler(t, np.array([0, 2]))
    rows = np.concatenate([t.sequence(0), t.sequence(2)])
    np.testing.assert_allclose(s.mean, rows.mean(0), rtol=1e-5, atol=1e-5)
    again = F.ScalerStats.from_dict(s.to_dict())
    np.testing.assert_array_equal(again.mean, s.mean)
    assert F.pad_length(np.array([10, 20, 30, 200]), 95, 32) >= 30 and F.pad_length(np.array([5]), 95, 32) == 32


def test_aggregates_shape_and_imu_only_subset():
    t = F.build_frame_table(make_table([7, 30]), demographics(["SUBJ_000001"]))
    full, names = F.sequence_aggregates(t)
    imu, imu_names = F.sequence_aggregates(t, imu_only=True)
    assert full.shape == (2, len(names)) and imu.shape == (2, len(imu_names))
    assert not any(n.startswith(("tof", "thm")) for n in imu_names)
    i = names.index("acc_mag__tail_mean")
    tail = int(np.ceil(30 * FeatureConfig().tail_fraction))
    acc_mag = t.sequence(1)[:, F.FRAME_FEATURES.index("acc_mag")]
    assert full[1, i] == pytest.approx(acc_mag[-tail:].mean(), rel=1e-5)
    assert full[1, names.index("seq_len")] == 30 and full[0, names.index("demo_height_cm")] == 170


def test_select_round_trip():
    t = F.build_frame_table(make_table([3, 5, 4]))
    s = t.select([2, 0])
    assert list(s.sequence_ids) == [t.sequence_ids[2], t.sequence_ids[0]]
    np.testing.assert_array_equal(s.sequence(0), t.sequence(2))


# ----------------------------------------------------------------------------- missing rotation


def test_gravity_aligned_quat_takes_the_low_passed_acceleration_to_world_up():
    rng = np.random.default_rng(0)
    ups = np.vstack([rng.normal(size=(6, 3)), [[0, 0, -9.8], [0, 0, 9.8], [1e-3, 0, -9.8]]])
    acc = np.repeat(ups, 4, axis=0)  # constant within each 4-row sequence: the low-pass is the vector itself
    offsets = np.arange(0, len(acc) + 1, 4)
    q = F.gravity_aligned_quat(acc, offsets, window=3)
    rot = Rotation.from_quat(q[:, [1, 2, 3, 0]])  # scalar-first -> scipy's scalar-last
    unit = acc / np.linalg.norm(acc, axis=1, keepdims=True)
    np.testing.assert_allclose(rot.apply(unit), np.tile([0.0, 0.0, 1.0], (len(acc), 1)), atol=1e-9)


def test_low_pass_never_mixes_two_sequences():
    values = np.concatenate([np.zeros((5, 1)), np.full((5, 1), 10.0)])
    out = F.low_pass(values, np.array([0, 5, 10]), window=7)
    np.testing.assert_array_equal(out, values)


def _drop_rotation(raw: pl.DataFrame) -> pl.DataFrame:
    return raw.with_columns(pl.lit(None, dtype=pl.Float64).alias(c) for c in ("rot_w", "rot_x", "rot_y", "rot_z"))


def test_a_sequence_without_rotation_gets_gravity_from_the_accelerometer():
    """Issue 12: with identity rotation, 'linear' acceleration still holds gravity (~9.8 m/s^2)."""
    from tools import synth

    raw = synth.generate(n_subjects=1, seed=3, n_test_subjects=0).train.drop("gesture", strict=False)
    raw = raw.filter(pl.col("sequence_id").is_in(raw["sequence_id"].unique().sort()[:12].implode()))
    measured = F.build_frame_table(raw)
    assert not measured.rot_missing.any()
    gravity = F.build_frame_table(_drop_rotation(raw), cfg=FeatureConfig(rot_fallback="gravity"))
    identity = F.build_frame_table(_drop_rotation(raw), cfg=FeatureConfig(rot_fallback="identity"))
    col = F.FRAME_FEATURES.index
    lin, flag, gz = col("linear_acc_mag"), col("rot_missing"), col("gravity_z")
    assert gravity.rot_missing.all() and (gravity.values[:, flag] == 1).all() and (measured.values[:, flag] == 0).all()
    assert np.median(identity.values[:, lin]) > 5.0
    assert np.median(gravity.values[:, lin]) < 0.25 * np.median(identity.values[:, lin])
    # posture: the estimated device-frame "up" follows the measured one
    g_true, g_est = measured.values[:, col("gravity_x") : gz + 1], gravity.values[:, col("gravity_x") : gz + 1]
    cos = (g_true * g_est).sum(1) / np.linalg.norm(g_true, axis=1) / np.linalg.norm(g_est, axis=1)
    assert np.median(cos) > 0.95


def test_flags_are_not_scaled_or_aggregated():
    table = F.build_frame_table(_drop_rotation(make_table([20, 30])))  # every row flagged
    scaler = F.fit_scaler(table)
    k = F.FRAME_FEATURES.index("rot_missing")
    assert (scaler.mean[k], scaler.std[k]) == (0.0, 1.0)
    assert not any(n.startswith("rot_missing__") for n in F.aggregate_feature_names())
    assert F.aggregate_feature_names()[-1] == "rot_missing"  # the sequence-level flag stays
