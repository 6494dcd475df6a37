"""Tests of the synthetic data generator (small subject counts so the file runs in seconds)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.spatial.transform import Rotation

import schema
from metric import GESTURES, TARGET_GESTURES
from tools import synth

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cmi"
THM = list(schema.THM_COLS)
TOF = list(schema.TOF_COLS)


@pytest.fixture(scope="module")
def ds() -> synth.SynthDataset:
    return synth.generate(n_subjects=3, seed=7, n_test_subjects=2, test_imu_only_fraction=0.5)


@pytest.fixture(scope="module")
def ds6() -> synth.SynthDataset:
    return synth.generate(n_subjects=6, seed=11, n_test_subjects=0)


def _real_header(name: str) -> list[str]:
    path = REAL_DIR / name
    if not path.exists():
        pytest.skip(f"real sample {path} not present")
    return pl.read_csv(path, n_rows=1, infer_schema_length=0).columns


def _seq_lengths(df: pl.DataFrame) -> np.ndarray:
    return df.group_by("sequence_id").len()["len"].to_numpy()


# ---------------------------------------------------------------- format
def test_columns_match_real_files(ds: synth.SynthDataset) -> None:
    assert ds.train.columns == _real_header("train_sample.csv")
    assert ds.test.columns == _real_header("test.csv")
    assert ds.train.columns == list(schema.TRAIN_COLUMNS)
    assert ds.test.columns == list(schema.TEST_COLUMNS)
    assert ds.train_demographics.columns == _real_header("train_demographics.csv")
    assert ds.test_demographics.columns == list(schema.DEMOGRAPHIC_COLS)
    assert ds.test_solution.columns == ["sequence_id", "gesture"]


def test_dtypes(ds: synth.SynthDataset) -> None:
    assert ds.train.schema["sequence_counter"] == pl.Int64
    for c in schema.SENSOR_COLS:
        assert ds.train.schema[c] == pl.Float32, c
        assert ds.test.schema[c] == pl.Float32, c
    demo = ds.train_demographics.schema
    assert demo["height_cm"] == pl.Float64 and demo["age"] == pl.Int64 and demo["handedness"] == pl.Int64


def test_id_formats(ds: synth.SynthDataset) -> None:
    for df in (ds.train, ds.test):
        assert df["sequence_id"].str.contains(r"^SEQ_\d{6}$").all()
        assert df["subject"].str.contains(r"^SUBJ_\d{6}$").all()
        assert df["row_id"].str.contains(r"^SEQ_\d{6}_\d{6}$").all()
        expect = df["sequence_id"] + "_" + df["sequence_counter"].cast(pl.String).str.zfill(6)
        assert (df["row_id"] == expect).all()
        # counters run 0..n-1 in file order within every sequence; files sorted by sequence_id
        firsts = df.group_by("sequence_id", maintain_order=True).agg(
            pl.col("sequence_counter").first().alias("c0"),
            (pl.col("sequence_counter").diff().drop_nulls() == 1).all().alias("step"),
        )
        assert (firsts["c0"] == 0).all() and firsts["step"].all()
        assert df["sequence_id"].is_sorted()
    assert ds.train_demographics["subject"].str.contains(r"^SUBJ_\d{6}$").all()


def test_label_columns(ds: synth.SynthDataset) -> None:
    tr = ds.train
    assert set(tr["gesture"].unique()) <= set(GESTURES)
    assert set(tr["orientation"].unique()) <= set(schema.ORIENTATIONS)
    assert set(tr["behavior"].unique()) <= set(schema.BEHAVIORS)
    assert set(tr["phase"].unique()) == {"Transition", "Gesture"}
    exp_type = (
        pl.when(pl.col("gesture").is_in(list(TARGET_GESTURES))).then(pl.lit("Target")).otherwise(pl.lit("Non-Target"))
    )
    assert tr.select((pl.col("sequence_type") == exp_type).all()).item()
    per_seq = tr.group_by("sequence_id").agg(
        pl.col("gesture").n_unique().alias("ng"),
        pl.col("orientation").n_unique().alias("no"),
        pl.col("subject").n_unique().alias("ns"),
    )
    assert (per_seq["ng"] == 1).all() and (per_seq["no"] == 1).all() and (per_seq["ns"] == 1).all()


def test_phase_order_gesture_at_end(ds: synth.SynthDataset) -> None:
    tr = ds.train
    code = (
        pl.when(pl.col("behavior") == "Performs gesture")
        .then(3)
        .when(pl.col("behavior") == "Hand at target location")
        .then(2)
        .otherwise(1)
    )
    chk = (
        tr.with_columns(code.alias("b"))
        .group_by("sequence_id", maintain_order=True)
        .agg(
            (pl.col("b").diff().drop_nulls() >= 0).all().alias("monotone"),
            (pl.col("phase").last() == "Gesture").alias("ends_in_gesture"),
            (pl.col("phase").first() == "Transition").alias("starts_in_transition"),
            ((pl.col("phase") == "Gesture") == (pl.col("behavior") == "Performs gesture")).all().alias("consistent"),
            pl.col("behavior").first().is_in(list(schema.BEHAVIORS[:2])).alias("first_is_move"),
            (pl.col("phase") == "Transition").mean().alias("trans_share"),
        )
    )
    for c in ("monotone", "ends_in_gesture", "starts_in_transition", "consistent", "first_is_move"):
        assert chk[c].all(), c
    assert 0.3 < chk["trans_share"].median() < 0.7


# ---------------------------------------------------------------- value conventions
def test_acc_gravity_and_quantisation(ds: synth.SynthDataset) -> None:
    rest = ds.train.filter(pl.col("behavior") == "Hand at target location")
    a = rest.select("acc_x", "acc_y", "acc_z").to_numpy().astype(np.float64)
    norm = np.linalg.norm(a, axis=1)
    assert abs(norm.mean() - 9.81) < 0.4
    allacc = ds.train.select("acc_x", "acc_y", "acc_z").to_numpy().astype(np.float64).ravel()
    assert np.allclose(allacc * 256, np.round(allacc * 256), atol=1e-3)
    assert np.percentile(np.linalg.norm(ds.train.select("acc_x", "acc_y", "acc_z").to_numpy(), axis=1), 99) < 20


def test_quaternions_unit_and_w_nonnegative(ds: synth.SynthDataset) -> None:
    for df in (ds.train, ds.test):
        q = df.select(schema.ROT_COLS).drop_nulls().to_numpy().astype(np.float64)
        assert len(q) > 0
        assert np.all(np.abs(np.linalg.norm(q, axis=1) - 1) < 1e-3)
        assert np.all(q[:, 0] >= 0)


def test_tof_and_thm_ranges(ds: synth.SynthDataset) -> None:
    tof = ds.train.select(TOF).to_numpy()
    v = tof[~np.isnan(tof)]
    assert np.all((v == -1) | ((v >= 0) & (v <= 254)))
    assert np.all(v == np.round(v))
    assert 0.2 < (v == -1).mean() < 0.95  # many pixels see nothing, but not all
    thm = ds.train.select(THM).to_numpy()
    t = thm[~np.isnan(thm)]
    assert t.min() > 18 and t.max() < 40


def test_nulls_only_for_missing_sensors(ds: synth.SynthDataset) -> None:
    tr = ds.train
    for c in (
        "row_id",
        "sequence_id",
        "sequence_counter",
        "subject",
        "gesture",
        "phase",
        "behavior",
        "acc_x",
        "acc_y",
        "acc_z",
    ):
        assert tr[c].null_count() == 0, c
    # a sensor is either fully present or fully missing within a sequence
    groups = [list(schema.ROT_COLS)] + [[c] for c in THM] + [TOF[64 * k : 64 * (k + 1)] for k in range(5)]
    for df in (tr, ds.test):
        for cols in groups:
            per = df.group_by("sequence_id").agg(
                pl.any_horizontal([pl.col(c).is_null() for c in cols]).mean().alias("m")
            )
            assert per["m"].is_in([0.0, 1.0]).all(), cols[0]


def test_imu_only_share_of_test(ds: synth.SynthDataset) -> None:
    te = ds.test
    per = te.group_by("sequence_id").agg(
        pl.all_horizontal([pl.col(c).is_null() for c in THM + TOF]).all().alias("imu_only"),
        pl.any_horizontal([pl.col(c).is_null() for c in THM + TOF]).mean().alias("any_null"),
    )
    share = per["imu_only"].mean()
    assert abs(share - 0.5) < 0.02
    full = per.filter(~pl.col("imu_only"))
    assert full["any_null"].median() == 0.0
    assert te["acc_x"].null_count() == 0


def test_imu_only_fraction_argument() -> None:
    d = synth.generate(n_subjects=1, seed=3, n_test_subjects=1, test_imu_only_fraction=0.0)
    assert d.test.select(pl.col("thm_1").is_null().mean()).item() < 0.05
    d = synth.generate(n_subjects=1, seed=3, n_test_subjects=1, test_imu_only_fraction=1.0)
    assert d.test.select(pl.col(TOF).is_null().all()).row(0) == (True,) * len(TOF)


def test_test_solution_and_subject_split(ds: synth.SynthDataset) -> None:
    test_ids = set(ds.test["sequence_id"].unique())
    assert set(ds.test_solution["sequence_id"]) == test_ids
    assert ds.test_solution.height == len(test_ids)
    assert set(ds.test_solution["gesture"]) <= set(GESTURES)
    assert not set(ds.train["subject"]) & set(ds.test["subject"])
    assert not set(ds.train["sequence_id"]) & test_ids
    assert set(ds.train_demographics["subject"]) == set(ds.train["subject"])
    assert set(ds.test_demographics["subject"]) == set(ds.test["subject"])
    assert ds.test["subject"].n_unique() == 2


def test_default_test_subject_count() -> None:
    d = synth.generate(n_subjects=4, seed=0)
    assert d.test["subject"].n_unique() == 2  # max(2, round(4 * 0.25))


def test_demographics_ranges() -> None:
    rows = [synth._demographics(np.random.default_rng(i), f"SUBJ_{i:06d}") for i in range(300)]
    d = pl.DataFrame(rows)
    assert d["adult_child"].is_in([0, 1]).all() and d["sex"].is_in([0, 1]).all()
    assert d["handedness"].is_in([0, 1]).all()
    assert 0.05 < (d["handedness"] == 0).mean() < 0.18  # ~10% left-handed
    assert 0.3 < (d["adult_child"] == 0).mean() < 0.65  # many children, as in the real file
    assert d["height_cm"].min() >= 125 and d["height_cm"].max() <= 200
    assert d.filter(pl.col("adult_child") == 0)["age"].max() < 18
    assert d.filter(pl.col("adult_child") == 1)["age"].min() >= 18
    assert d["shoulder_to_wrist_cm"].is_between(35, 75).all()
    assert d["elbow_to_wrist_cm"].is_between(15, 45).all()


# ---------------------------------------------------------------- determinism
@pytest.mark.slow  # generates and writes whole data sets (seconds each)
def test_deterministic_for_a_seed() -> None:
    a = synth.generate(n_subjects=1, seed=42, n_test_subjects=1)
    b = synth.generate(n_subjects=1, seed=42, n_test_subjects=1)
    c = synth.generate(n_subjects=1, seed=43, n_test_subjects=1)
    for x, y in (
        (a.train, b.train),
        (a.test, b.test),
        (a.train_demographics, b.train_demographics),
        (a.test_solution, b.test_solution),
    ):
        assert x.equals(y)
    assert not a.train.equals(c.train)
    assert a.train["subject"][0] != c.train["subject"][0] or not np.array_equal(
        a.train["acc_x"].to_numpy(), c.train["acc_x"].to_numpy()[: a.train.height]
    )


# ---------------------------------------------------------------- content
def test_gestures_and_counts_per_subject(ds6: synth.SynthDataset) -> None:
    tr = ds6.train
    assert set(tr["gesture"].unique()) == set(GESTURES)
    per_subj = tr.group_by("subject").agg(pl.col("sequence_id").n_unique().alias("n"))
    assert (per_subj["n"] == 2 * len(synth.VALID_PAIRS)).all()
    assert len(synth.VALID_PAIRS) == 51 and len(set(synth.VALID_PAIRS)) == 51
    pairs = tr.group_by("subject", "orientation", "gesture").agg(pl.col("sequence_id").n_unique().alias("n"))
    assert (pairs["n"] == 2).all() and pairs.height == 6 * 51
    # targets are done in all four postures
    tgt = tr.filter(pl.col("sequence_type") == "Target").group_by("gesture").agg(pl.col("orientation").n_unique())
    assert (tgt["orientation"] == 4).all()


def test_length_distribution(ds6: synth.SynthDataset) -> None:
    lens = _seq_lengths(ds6.train)
    assert lens.min() >= 29
    assert 45 <= np.median(lens) <= 80
    assert 80 <= np.percentile(lens, 95) <= 200
    assert lens.max() <= 800


def test_posture_changes_gravity_direction(ds6: synth.SynthDataset) -> None:
    # same gesture, hand at the target: the mean gravity direction in the device frame depends on posture
    g = (
        ds6.train.filter(
            (pl.col("gesture") == "Cheek - pinch skin") & (pl.col("behavior") == "Hand at target location")
        )
        .group_by("orientation")
        .agg(pl.col("acc_x", "acc_y", "acc_z").mean())
        .sort("orientation")
    )
    v = g.select("acc_x", "acc_y", "acc_z").to_numpy()
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    cos = v @ v.T
    assert cos[np.triu_indices(4, 1)].min() < 0.5


def test_gravity_in_world_frame_at_rest(ds: synth.SynthDataset) -> None:
    """Rotating the accelerometer reading with the stored quaternion gives (0, 0, +g) at rest."""
    rest = ds.train.filter(pl.col("behavior") == "Hand at target location").drop_nulls(list(schema.ROT_COLS))
    q = rest.select(schema.ROT_COLS).to_numpy().astype(np.float64)
    a = rest.select(schema.ACC_COLS).to_numpy().astype(np.float64)
    world = Rotation.from_quat(q[:, [1, 2, 3, 0]]).apply(a)  # files are scalar-first, scipy scalar-last
    mean = world.mean(axis=0)
    assert abs(mean[0]) < 0.3 and abs(mean[1]) < 0.3
    assert abs(mean[2] - schema.GRAVITY) < 0.3
    assert np.median(np.abs(world[:, 2] - schema.GRAVITY)) < 0.5


def test_w_sign_flips_like_the_device() -> None:
    """Stored with w >= 0 per sample, so a continuous rotation through w = 0 flips the sign of (x, y, z)."""
    d = synth.generate(n_subjects=2, seed=1, n_test_subjects=0)
    q = d.train.select(schema.ROT_COLS).drop_nulls().to_numpy()
    jumps = np.abs(np.diff(q[:, 1:], axis=0)).max(axis=1)
    near_zero_w = q[:-1, 0] < 0.1
    assert (jumps[near_zero_w] > 0.5).any()


def test_left_handed_mirroring_flips_acc_x() -> None:
    """Same subject and draws, right vs left hand: the mean acc_x of each gesture changes sign."""
    means: list[dict[str, float]] = []
    for right in (True, False):
        rng = np.random.default_rng(123)
        subj = synth._Subject("SUBJ_000001", 1, 30, 1, right, 172.0, 52, 26.0, False, rng)
        rows = synth._simulate_subject(subj, [f"SEQ_{i:06d}" for i in range(102)], np.zeros(102, bool), False)
        start, acc_x = 0, {}
        for q in rows.seqs:
            if q.orientation == synth.SEATED:
                acc_x.setdefault(q.gesture, []).append(rows.sensors[start : start + q.length, 0])
            start += q.length
        means.append({g: float(np.concatenate(v).mean()) for g, v in acc_x.items()})
    strong = [g for g, m in means[0].items() if abs(m) > 1.0]
    assert len(strong) >= 3
    for g in strong:
        assert np.sign(means[0][g]) == -np.sign(means[1][g]), g
        assert means[0][g] == pytest.approx(-means[1][g], abs=0.05)


def test_proximity_sensors_respond_to_skin(ds6: synth.SynthDataset) -> None:
    tr = ds6.train
    near = pl.min_horizontal([pl.when(pl.col(c) >= 0).then(pl.col(c)).otherwise(None) for c in TOF])
    stats = (
        tr.filter(pl.col("phase") == "Gesture")
        .with_columns(near.alias("near"), pl.max_horizontal(THM).alias("thm_max"))
        .group_by("gesture")
        .agg(pl.col("near").median(), pl.col("thm_max").mean())
    )
    by = {r["gesture"]: r for r in stats.iter_rows(named=True)}
    # at the neck the ToF sees skin close by and the thermopiles warm; waving in the air does not
    assert by["Neck - pinch skin"]["near"] < 90
    assert by["Neck - pinch skin"]["thm_max"] > by["Wave hello"]["thm_max"] + 0.5
    # hair above the ear insulates: the thermopiles warm less there than over the bare skin of the neck, which
    # is how ToF/THM resolve the IMU-only look-alikes Above ear <-> Neck-pinch (REAL_DATA_FACTS.md §4)
    assert by["Neck - pinch skin"]["thm_max"] > by["Above ear - pull hair"]["thm_max"] + 0.5
    rest = tr.filter(pl.col("behavior").is_in(list(schema.BEHAVIORS[:2])))
    assert rest.select(pl.max_horizontal(THM).mean()).item() < by["Neck - pinch skin"]["thm_max"]


def test_sensor_rows_differ_between_tof_sensors(ds6: synth.SynthDataset) -> None:
    g = ds6.train.filter(pl.col("gesture") == "Neck - scratch")
    fr = [
        g.select(
            pl.mean_horizontal([(pl.col(c) == -1).cast(pl.Float32) for c in TOF[64 * k : 64 * (k + 1)]]).mean()
        ).item()
        for k in range(5)
    ]
    assert max(fr) - min(fr) > 0.2


@pytest.mark.slow  # generates and writes whole data sets (seconds each)
def test_write_dataset_roundtrip(tmp_path: Path) -> None:
    paths = synth.write_dataset(tmp_path, n_subjects=1, seed=5, n_test_subjects=1)
    assert set(paths) == {"train", "test", "train_demographics", "test_demographics", "test_solution", "synth_info"}
    assert json.loads(paths["synth_info"].read_text())["rotated_subjects"] == {"train": [], "test": []}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())  # no temp files left
    tr = pl.read_csv(paths["train"], infer_schema_length=10000)
    te = pl.read_csv(paths["test"], infer_schema_length=10000)
    assert tr.columns == list(schema.TRAIN_COLUMNS) and te.columns == list(schema.TEST_COLUMNS)
    mem = synth.generate(n_subjects=1, seed=5, n_test_subjects=1)
    assert tr.height == mem.train.height
    assert np.array_equal(tr["acc_x"].to_numpy(), mem.train["acc_x"].to_numpy().astype(np.float64))
    acc = tr["acc_y"].to_numpy()
    assert np.array_equal(acc * 256, np.round(acc * 256))  # quantisation survives the CSV round trip
    q = tr["rot_x"].drop_nulls().to_numpy()
    assert np.array_equal(q * 16384, np.round(q * 16384))
    assert tr["tof_1_v0"].null_count() == mem.train["tof_1_v0"].null_count()
    sol = pl.read_csv(paths["test_solution"])
    assert set(sol["sequence_id"]) == set(te["sequence_id"])
    assert re.fullmatch(r"SEQ_\d{6}", sol["sequence_id"][0])


def test_rotated_wearer_matches_the_real_convention() -> None:
    """Worn 180 degrees about device z: acc_x, acc_y negated, quaternion turned about z, sensors 2<->4 and
    3<->5 swapped, grids turned."""
    out = []
    for rotated in (False, True):
        rng = np.random.default_rng(321)
        subj = synth._Subject("SUBJ_000001", 1, 30, 1, True, 172.0, 52, 26.0, rotated, rng)
        out.append(
            synth._simulate_subject(subj, [f"SEQ_{i:06d}" for i in range(102)], np.zeros(102, bool), False).sensors
        )
    a, b = (x.astype(np.float64) for x in out)
    assert np.allclose(b[:, 0:2], -a[:, 0:2], atol=1 / 256) and np.allclose(b[:, 2], a[:, 2])
    ok = ~np.isnan(a[:, 3])
    qa, qb = Rotation.from_quat(a[ok][:, [4, 5, 6, 3]]), Rotation.from_quat(b[ok][:, [4, 5, 6, 3]])
    turn = (qa.inv() * qb).as_rotvec()  # the extra rotation, in the device frame
    assert np.allclose(np.abs(turn[:, 2]), np.pi, atol=2e-3) and np.abs(turn[:, :2]).max() < 2e-3
    # sensor outages hit the recorded sensor (thm_5, tof_5 ...), after the turn: compare where both have values
    both = np.isfinite(a[:, 7:]).all(axis=1) & np.isfinite(b[:, 7:]).all(axis=1)
    assert both.mean() > 0.8
    assert np.array_equal(b[both, 7:12], a[both][:, [7, 10, 11, 8, 9]])
    ga, gb = a[both, 12:].reshape(-1, 5, 8, 8), b[both, 12:].reshape(-1, 5, 8, 8)
    assert np.array_equal(gb, ga[:, [0, 3, 4, 1, 2], ::-1, ::-1])


@pytest.mark.slow  # generates and writes whole data sets (seconds each)
def test_rotated_test_subjects_option() -> None:
    plain = synth.generate(n_subjects=1, seed=3, n_test_subjects=2)
    rot = synth.generate(n_subjects=1, seed=3, n_test_subjects=2, n_rotated_test_subjects=1)
    assert plain.rotated_subjects == {"train": [], "test": []}
    assert len(rot.rotated_subjects["test"]) == 1 and rot.rotated_subjects["train"] == []
    assert rot.train.equals(plain.train)  # the option touches nothing else
    who = rot.rotated_subjects["test"][0]
    for df_r, df_p, same in (
        (rot.test.filter(pl.col("subject") != who), plain.test.filter(pl.col("subject") != who), True),
        (rot.test.filter(pl.col("subject") == who), plain.test.filter(pl.col("subject") == who), False),
    ):
        x_r, x_p = df_r["acc_x"].to_numpy(), df_p["acc_x"].to_numpy()
        assert np.array_equal(x_r, x_p) if same else np.allclose(x_r, -x_p, atol=1 / 256)
    with pytest.raises(ValueError, match="n_rotated_test_subjects"):
        synth.generate(n_subjects=1, seed=3, n_test_subjects=1, n_rotated_test_subjects=2)


# ---------------------------------------------------------------- the real protocol and segments (REAL_DATA §1-2)
@pytest.fixture(scope="module")
def facts6(ds6: synth.SynthDataset, tmp_path_factory) -> dict:
    from tools import realism

    out = tmp_path_factory.mktemp("ds6")
    ds6.train.write_csv(out / "train.csv")
    ds6.train_demographics.write_csv(out / "train_demographics.csv")
    return realism.data_facts(out)


def test_each_protocol_slot_is_used_once(ds6: synth.SynthDataset) -> None:
    first = ds6.train.group_by("sequence_id").agg(
        pl.col("subject").first(),
        pl.col("orientation").first(),
        pl.col("gesture").first(),
        pl.col("behavior").sort_by("sequence_counter").first().alias("initial"),
    )
    slots = first.group_by("subject", "orientation", "gesture", "initial").len()
    assert (slots["len"] == 1).all() and slots.height == 6 * 102
    assert set(slots["initial"].unique()) == set(schema.BEHAVIORS[:2])


# Figures a small set must already show as the real data do (the rest need the calibrated generator, issue 22).
_CALIBRATED = (
    "pairs",
    "slots_once",
    "seq_per_subject",
    "behaviour_values",
    "gesture_rows_mean",
    "gesture_rows_sd",
    "pause_rows_median",
    "relax_rows_median",
    "move_rows_median",
    "gesture_row_share",
    "len_median",
    "len_p95",
    "tof_minus1_share",
    "thm_median",
    "acc_norm_mean",
    "tof5_only_missing",
    "no_tof",
)


@pytest.mark.parametrize("key", _CALIBRATED)
def test_data_figure_in_the_real_range(facts6: dict, key: str) -> None:
    from tools import realism

    fact = next(f for f in realism.FACTS if f.key == key)
    assert fact.lo <= facts6[key] <= fact.hi, f"{fact.what}: generated {facts6[key]}, real {fact.real}"


def test_tilted_wearer_turns_only_the_imu_about_device_y() -> None:
    out = []
    for tilt in (0.0, np.deg2rad(30.0)):
        rng = np.random.default_rng(321)
        subj = synth._Subject("SUBJ_000001", 1, 30, 1, True, 172.0, 52, 26.0, False, rng, tilt_y=tilt)
        out.append(
            synth._simulate_subject(subj, [f"SEQ_{i:06d}" for i in range(102)], np.zeros(102, bool), False).sensors
        )
    a, b = (x.astype(np.float64) for x in out)
    assert np.allclose(b[:, 1], a[:, 1], atol=1 / 256)  # acc_y is along the axis of the tilt
    assert np.allclose(np.linalg.norm(b[:, :3], axis=1), np.linalg.norm(a[:, :3], axis=1), atol=0.01)
    assert np.abs(b[:, 0] - a[:, 0]).mean() > 0.5  # x and z are mixed
    ok = ~np.isnan(a[:, 3])
    turn = (Rotation.from_quat(a[ok][:, [4, 5, 6, 3]]).inv() * Rotation.from_quat(b[ok][:, [4, 5, 6, 3]])).as_rotvec()
    assert np.allclose(turn[:, 1], np.deg2rad(30.0), atol=2e-3) and np.abs(turn[:, [0, 2]]).max() < 2e-3
    assert np.array_equal(b[:, 7:], a[:, 7:], equal_nan=True)  # thermopiles and ToF keep their places


def test_strap_rotation_turns_only_the_imu() -> None:
    out = []
    for strap in ((0.0, 0.0, 0.0), (0.0, np.deg2rad(10.0), 0.0)):
        rng = np.random.default_rng(321)
        subj = synth._Subject("SUBJ_000001", 1, 30, 1, True, 172.0, 52, 26.0, False, rng, strap_rv=strap)
        out.append(
            synth._simulate_subject(subj, [f"SEQ_{i:06d}" for i in range(102)], np.zeros(102, bool), False).sensors
        )
    a, b = (x.astype(np.float64) for x in out)
    assert np.allclose(b[:, 1], a[:, 1], atol=1 / 256)  # about the forearm axis: acc_y stays
    assert np.abs(b[:, 0] - a[:, 0]).mean() > 0.1
    assert np.array_equal(b[:, 7:], a[:, 7:], equal_nan=True)


def test_gestures_are_sloppy_sometimes() -> None:
    rng = np.random.default_rng(0)
    tau = np.arange(int(3.2 * synth.FS * synth.OVERSAMPLE)) / (synth.FS * synth.OVERSAMPLE)
    envs = [synth._sloppy_envelope(rng, tau) for _ in range(300)]
    paused = np.mean([e.min() < 0.2 for e in envs])
    assert 0.25 < paused < 0.42  # about a third hesitate
    assert all(e.min() > 0.05 and e.max() < 3.0 for e in envs)
    assert np.std([e.mean() for e in envs]) > 0.05  # the strength wanders from gesture to gesture
