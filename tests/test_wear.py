"""Upside-down wear: the physical transform, its correction, and the per-subject detector."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy.spatial.transform import Rotation

import ensemble_seal
import wear
from config import load_config
from features import FRAME_FEATURES, build_frame_table
from schema import ACC_COLS, ROT_COLS, SENSOR_COLS, THM_COLS, TOF_COLS
from tests.factory import demographics, make_sequence
from tools import synth


def _generator_rotated(seq: pl.DataFrame) -> pl.DataFrame:
    """The rotated copy as tools/synth.py makes it (its own code path), to check wear.rotate_rows against."""
    s = seq.select(SENSOR_COLS).to_numpy().astype(np.float64)
    acc, quat, thm, tof = s[:, 0:3].copy(), s[:, 3:7].copy(), s[:, 7:12].copy(), s[:, 12:].copy()
    synth._rotate_about_z(acc, quat, thm, tof)
    quat[quat[:, 0] < 0] *= -1
    cols = (
        dict(zip(ACC_COLS, acc.T))
        | dict(zip(ROT_COLS, quat.T))
        | dict(zip(THM_COLS, thm.T))
        | dict(zip(TOF_COLS, tof.T))
    )
    return seq.with_columns(pl.Series(c, v, dtype=pl.Float32) for c, v in cols.items())


def test_rotate_rows_matches_the_physics():
    seq = make_sequence("SEQ_000001", 40, seed=3)
    rot = wear.rotate_rows(seq)
    a0, a1 = seq.select(ACC_COLS).to_numpy(), rot.select(ACC_COLS).to_numpy()
    assert np.allclose(a1[:, :2], -a0[:, :2]) and np.allclose(a1[:, 2], a0[:, 2])
    # same world-frame acceleration: the device turned, the wrist did not
    w0 = Rotation.from_quat(seq.select(ROT_COLS).to_numpy()[:, [1, 2, 3, 0]]).apply(a0)
    w1 = Rotation.from_quat(rot.select(ROT_COLS).to_numpy()[:, [1, 2, 3, 0]]).apply(a1)
    assert np.allclose(w0, w1, atol=1e-4)
    assert (rot["rot_w"].to_numpy() >= 0).all()
    assert np.array_equal(rot["thm_2"].to_numpy(), seq["thm_4"].to_numpy())
    assert np.array_equal(rot["thm_3"].to_numpy(), seq["thm_5"].to_numpy())
    g0 = seq.select(TOF_COLS).to_numpy().reshape(-1, 5, 8, 8)
    g1 = rot.select(TOF_COLS).to_numpy().reshape(-1, 5, 8, 8)
    assert np.array_equal(g1[:, 1], g0[:, 3, ::-1, ::-1]) and np.array_equal(g1[:, 0, 0, 0], g0[:, 0, 7, 7])
    assert wear.rotate_rows(seq.select(ACC_COLS + ("sequence_id",))).height == 40  # absent sensors stay null


@pytest.mark.parametrize("handedness", [1, 0])
def test_correcting_a_rotated_copy_gives_the_original_features_back(handedness):
    seq = make_sequence("SEQ_000001", 60, seed=5)
    demo = demographics(["SUBJ_000001"], handedness=handedness)  # left-handed: mirroring runs after the correction
    cfg = load_config({})
    original = build_frame_table(seq, demo, cfg.features)
    rotated = _generator_rotated(seq)
    uncorrected = build_frame_table(rotated, demo, cfg.features)
    corrected = build_frame_table(wear.rotate_rows(rotated), demo, cfg.features)
    assert np.allclose(corrected.values, original.values, atol=2e-3)
    assert not np.allclose(uncorrected.values, original.values, atol=1e-2)
    lin = [FRAME_FEATURES.index(c) for c in ("linear_acc_x", "linear_acc_y", "linear_acc_z")]
    assert np.allclose(uncorrected.values[:, lin], original.values[:, lin], atol=2e-3)  # physics unchanged


def test_null_rotation_and_gateway_strings_survive_the_transform():
    seq = make_sequence("SEQ_000001", 20).with_columns(pl.lit(None, dtype=pl.Float32).alias(c) for c in ROT_COLS)
    seq = seq.with_columns(pl.col("tof_1_v0").cast(pl.String))
    rot = wear.rotate_rows(seq)
    assert rot["rot_w"].null_count() == 20 and rot["tof_1_v0"].dtype == pl.Float32


def test_correct_subjects_touches_only_the_listed_subjects():
    a = make_sequence("SEQ_000001", 15, subject="SUBJ_000001")
    b = make_sequence("SEQ_000002", 15, subject="SUBJ_000002", seed=1)
    both = pl.concat([a, b])
    out = wear.correct_subjects(both, ["SUBJ_000002"])
    assert out["sequence_id"].to_list() == both["sequence_id"].to_list()
    assert np.array_equal(out.filter(pl.col("subject") == "SUBJ_000001")["acc_x"].to_numpy(), a["acc_x"].to_numpy())
    assert np.allclose(out.filter(pl.col("subject") == "SUBJ_000002")["acc_x"].to_numpy(), -b["acc_x"].to_numpy())


@pytest.fixture(scope="module")
def generated():
    return synth.generate(
        n_subjects=5, seed=4, n_test_subjects=2, n_rotated_test_subjects=1, n_rotated_train_subjects=1
    )


def test_detector_finds_the_rotated_generated_subjects(generated):
    ds = generated
    cfg = load_config({})
    table = build_frame_table(ds.train, ds.train_demographics, cfg.features)
    info, rotated = wear.fit_wear(table, cfg)
    assert rotated == ds.rotated_subjects["train"]  # the rotated training subject is found
    assert info["held_out"]["rotated_copy_orders_detected"] >= 0.6 * info["held_out"]["rotated_copy_orders"]
    assert info["held_out"]["normal_subject_orders_flagged"] == 0
    det = wear.WearDetector(
        wear.Detector(np.array(info["coef"]), np.array(info["scale"])),
        info["threshold"],
        info["min_sequences"],
        info["tail_fraction"],
        True,
    )
    test = ds.test.partition_by("sequence_id", maintain_order=True)
    for seq in test:
        subject = seq["subject"][0]
        det.observe(subject, build_frame_table(seq, ds.test_demographics, cfg.features))
    assert det.rotated_subjects() == ds.rotated_subjects["test"]
    assert len(det.state) == 2
    off = wear.WearDetector(None)
    assert off.observe("SUBJ_X", table.select([0])) is False  # switched off / no model: never rotated


class _AccMember:
    """Records the mean acc_x of every table it is asked about (to see whether rows were corrected)."""

    classes_ = tuple(range(18))

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    def predict_proba(self, table):
        for i, s in enumerate(table.sequence_ids):
            self.seen[str(s)] = float(table.sequence(i)[:, FRAME_FEATURES.index("acc_x")].mean())
        return np.full((table.n_sequences, 18), 1 / 18)


@pytest.mark.parametrize("switch", ["1", "0"])
def test_predictor_corrects_a_rotated_subject_once_detected(generated, tmp_path, switch):
    import ensemble
    from io_utils import write_json

    ds = generated
    cfg = load_config({"ENSEMBLE_WEAR_DETECT": switch}, out_dir=str(tmp_path))
    info, _ = wear.fit_wear(build_frame_table(ds.train, ds.train_demographics, cfg.features), cfg)
    write_json(tmp_path / "ensemble" / wear.WEAR_FILE, info)
    ensemble_seal.write_manifest(tmp_path / "ensemble", {})  # served only as a sealed set
    (tmp_path / "bundles" / "lgbm").mkdir(parents=True)
    member = _AccMember()
    spec = ensemble.MemberSpec("lgbm", lambda d, c: member)
    pred = ensemble.Predictor(cfg, [spec], bundle_root=tmp_path / "bundles")
    who = ds.rotated_subjects["test"][0]
    seqs = ds.test.filter(pl.col("subject") == who).partition_by("sequence_id", maintain_order=True)
    for seq in seqs:
        pred.predict(seq, ds.test_demographics.filter(pl.col("subject") == who))
    assert pred.summary()["wear"]["rotated_subjects"] == ([who] if switch == "1" else [])
    last = seqs[-1]
    raw_x = float(
        build_frame_table(last, ds.test_demographics, cfg.features).values[:, FRAME_FEATURES.index("acc_x")].mean()
    )
    seen = member.seen[last["sequence_id"][0]]
    assert seen == pytest.approx(-raw_x if switch == "1" else raw_x, abs=1e-3)  # the member saw corrected rows


def test_training_switch_off_leaves_rows_and_removes_a_stale_detector(tmp_path):
    seq = pl.concat(
        [
            make_sequence("SEQ_000001", 20, subject="SUBJ_000001"),
            make_sequence("SEQ_000002", 20, subject="SUBJ_000002", seed=2),
        ]
    )
    cfg = load_config({"ENSEMBLE_WEAR_DETECT": "0"})
    (tmp_path / wear.WEAR_FILE).write_text("{}")
    rows, changed = wear.prepare_training_rows(seq, None, build_frame_table(seq), cfg, tmp_path)
    assert rows is seq and not changed and not (tmp_path / wear.WEAR_FILE).exists()
