"""Hostile input against a real trained LightGBM bundle: odd lengths, broken dtypes, missing
modalities, bad demographics, random garbage (hypothesis) and corrupt bundles.

Every case must end in a valid gesture (a documented, logged degradation) or a clear error whose
message names the problem. The bundle is trained once per module on small generated data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bundle
import ensemble
import features
import inference_server
import lgbm_pipeline
from metric import GESTURES
from schema import ACC_COLS, DEMOGRAPHIC_FEATURES, ROT_COLS, SENSOR_COLS, TEST_COLUMNS, THM_COLS, TOF_COLS
from tests.factory import trained_lgbm_run

pytestmark = pytest.mark.slow  # trains a real bundle through main.stage_train, then many property-based cases

pytest.importorskip("lightgbm")

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TOFTHM = list(THM_COLS + TOF_COLS)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real lgbm bundle (3 folds, debug size) trained through main.stage_train on generated data."""
    # STRICT=1: these tests check the errors; the serving (degraded) mode is tested in test_serving_hostile.py.
    env = {"CMI_N_FOLDS": "3", "CMI_N_THREADS": "1", "STRICT": "1"}
    return trained_lgbm_run(tmp_path_factory.mktemp("hostile"), env, n_subjects=5, seed=3)


def _specs():
    # lgbm only: importing the torch/keras modules would cost seconds and add nothing here
    return [lgbm_pipeline.LGBMPipeline()]


def _predictor(trained, bundle_root=None):
    return ensemble.Predictor(trained.cfg, _specs(), bundle_root=bundle_root or trained.bundles)


@pytest.fixture(scope="module")
def predictor(trained):
    return _predictor(trained)


def _proba(pred, seq, demo):
    """The blended probabilities predict() takes its argmax of (for 'same answer' checks)."""
    return pred.predict_proba_table(features.build_frame_table(seq, demo, pred.cfg.features))[0]


def _same_answer(pred, a, b, demo):
    ga, gb = pred.predict(a, demo), pred.predict(b, demo)
    assert ga in GESTURES and ga == gb
    np.testing.assert_allclose(_proba(pred, a, demo), _proba(pred, b, demo), rtol=1e-6, atol=1e-9)
    return ga


def _set_cells(df, col, rows, value, dtype=pl.Float32):
    idx = pl.int_range(pl.len()).is_in(list(rows))
    return df.with_columns(pl.when(idx).then(pl.lit(value, dtype=dtype)).otherwise(pl.col(col)).alias(col))


# --------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("n", [1, 2, 5000])
def test_extreme_lengths_give_a_gesture(trained, predictor, n):
    seq = trained.seq
    reps = -(-n // seq.height)
    rows = pl.concat([seq] * reps).head(n).with_columns(pl.int_range(pl.len()).alias("sequence_counter"))
    assert rows.height == n
    assert predictor.predict(rows, trained.demo) in GESTURES


def test_single_row_float32_sequence(trained, predictor):
    from tests.factory import make_sequence

    one = make_sequence("SEQ_ONE_ROW", 1)  # tof Float32, no nulls: what a caller building frames hands over
    table = features.build_frame_table(one)
    assert table.values.shape == (1, len(features.FRAME_FEATURES))
    assert predictor.predict(one, trained.demo) in GESTURES


# --------------------------------------------------------------------------- missing / broken modalities


def test_rotation_all_nan_or_absent_is_the_same_degradation(trained, predictor):
    seq, demo = trained.seq, trained.demo
    nan_rot = seq.with_columns(pl.lit(float("nan"), dtype=pl.Float32).alias(c) for c in ROT_COLS)
    no_rot = seq.drop(ROT_COLS)
    _same_answer(predictor, nan_rot, no_rot, demo)
    table = features.build_frame_table(no_rot, demo)
    assert table.rot_missing.all() and np.isfinite(table.values).all()


def test_inf_in_acc_thm_tof_reads_as_missing(trained, predictor):
    seq, demo = trained.seq, trained.demo
    with_inf, with_null = seq, seq
    for col, rows, v in (
        ("acc_x", [3, 4], float("inf")),
        ("acc_z", [0], -float("inf")),
        ("thm_2", [5, 9], float("inf")),
        ("tof_1_v0", [7], float("inf")),
        ("tof_3_v17", [1, 2, 3], -float("inf")),
    ):
        with_inf = _set_cells(with_inf, col, rows, v)
        with_null = _set_cells(with_null, col, rows, None)
    _same_answer(predictor, with_inf, with_null, demo)


def test_acc_entirely_inf_degrades_to_zero_with_a_warning(trained, predictor, caplog):
    seq = trained.seq.with_columns(pl.lit(float("inf"), dtype=pl.Float32).alias(c) for c in ACC_COLS)
    with caplog.at_level(logging.WARNING, logger="features"):
        assert predictor.predict(seq, trained.demo) in GESTURES
    assert "no accelerometer reading" in caplog.text


def test_imu_only_sequence_matches_drop_tof_thm(trained, predictor):
    seq, demo = trained.seq, trained.demo
    imu = seq.with_columns(pl.lit(None, dtype=pl.Float32).alias(c) for c in TOFTHM)
    _same_answer(predictor, imu, features.drop_tof_thm(seq), demo)
    assert not features.build_frame_table(imu, demo).has_tof_thm[0]  # routed to the IMU-only models


def test_one_tof_sensor_null(trained, predictor):
    seq = trained.seq.with_columns(pl.lit(None, dtype=pl.Float32).alias(f"tof_2_v{p}") for p in range(64))
    table = features.build_frame_table(seq, trained.demo)
    assert np.isfinite(table.values).all() and table.has_tof_thm[0]
    v = dict(zip(features.FRAME_FEATURES, table.values[0]))
    assert v["tof2_valid_ratio"] == 0.0
    assert predictor.predict(seq, trained.demo) in GESTURES


def test_string_typed_thm_tof_equal_float_typed(trained, predictor):
    seq, demo = trained.seq, trained.demo
    as_text = seq.with_columns(pl.col(TOFTHM).cast(pl.String))
    assert as_text.schema["thm_1"] == pl.String
    _same_answer(predictor, as_text, seq, demo)


def test_string_null_tokens_equal_nulls(trained, predictor):
    # "NaN" and "" are how a CSV spells a missing reading; with padding spaces too
    seq, demo = trained.seq, trained.demo
    text = seq.with_columns(pl.col(TOFTHM).cast(pl.String))
    nulls = seq
    for col, rows, token in (
        ("thm_1", [0, 1, 2], "NaN"),
        ("thm_4", [10], ""),
        ("tof_5_v63", [4, 5], "NaN"),
        ("tof_1_v10", [6], " "),
        ("tof_2_v2", [8], ""),
    ):
        text = _set_cells(text, col, rows, token, dtype=pl.String)
        nulls = _set_cells(nulls, col, rows, None)
    _same_answer(predictor, text, nulls, demo)


def test_all_null_dtype_columns_equal_imu_only(trained, predictor):
    seq, demo = trained.seq, trained.demo
    null_typed = seq.with_columns(pl.lit(None).alias(c) for c in TOFTHM)
    assert null_typed.schema["tof_1_v0"] == pl.Null
    _same_answer(predictor, null_typed, features.drop_tof_thm(seq), demo)
    # the same with the all-null columns typed String (polars' choice for an empty CSV column)
    _same_answer(predictor, null_typed.with_columns(pl.col(TOFTHM).cast(pl.String)), features.drop_tof_thm(seq), demo)


def test_gateway_with_string_typed_imu_only_file_and_real_predictor(trained, tmp_path):
    # IMU-only sequences first: polars' inference types thm/tof as String there (the competition trap)
    test, demo = trained.test, trained.demo_all
    ids = test["sequence_id"].unique(maintain_order=True).to_list()
    has = {s: test.filter(pl.col("sequence_id") == s)["thm_1"].is_not_null().any() for s in ids[:12]}
    order = [s for s in has if not has[s]][:3] + [s for s in has if has[s]][:2]
    rows = pl.concat([test.filter(pl.col("sequence_id") == s) for s in order]).select(TEST_COLUMNS)
    rows.write_csv(tmp_path / "test.csv")
    demo.write_csv(tmp_path / "test_demographics.csv")
    pred = _predictor(trained)
    inference_server.run_local_gateway(
        pred.predict, tmp_path / "test.csv", tmp_path / "test_demographics.csv", tmp_path / "submission.parquet"
    )
    sub = dict(pl.read_parquet(tmp_path / "submission.parquet").iter_rows())
    assert set(sub) == set(order)
    for s in order:  # same answer as the cleanly typed rows
        seq = rows.filter(pl.col("sequence_id") == s)
        assert sub[s] == pred.predict(seq, demo.filter(pl.col("subject") == seq["subject"][0]))


def test_gateway_keeps_the_other_answers_when_one_sequence_is_hostile(trained, tmp_path):
    test, demo = trained.test, trained.demo_all
    ids = test["sequence_id"].unique(maintain_order=True).to_list()[:5]
    parts = [test.filter(pl.col("sequence_id") == s) for s in ids]
    parts[2] = pl.concat([parts[2], parts[2].slice(3, 1)])  # a duplicated sequence_counter
    pl.concat(parts).select(TEST_COLUMNS).write_csv(tmp_path / "test.csv")
    demo.write_csv(tmp_path / "test_demographics.csv")
    pred = _predictor(trained)
    with pytest.raises(inference_server.GatewayError, match=f"1 of 5 sequence.*{ids[2]}"):
        inference_server.run_local_gateway(
            pred.predict, tmp_path / "test.csv", tmp_path / "test_demographics.csv", tmp_path / "submission.parquet"
        )
    assert not (tmp_path / "submission.parquet").exists()
    partial = dict(pl.read_parquet(tmp_path / "submission_partial.parquet").iter_rows())
    assert set(partial) == set(ids) - {ids[2]}
    for s in partial:
        seq = test.filter(pl.col("sequence_id") == s)
        assert partial[s] == pred.predict(seq, demo.filter(pl.col("subject") == seq["subject"][0]))


# --------------------------------------------------------------------------- row order, columns, text


def test_unsorted_counter_same_as_sorted(trained, predictor):
    seq = trained.seq
    shuffled = seq.sample(fraction=1.0, shuffle=True, seed=7)
    assert shuffled["sequence_counter"].to_list() != seq["sequence_counter"].to_list()
    _same_answer(predictor, shuffled, seq, trained.demo)


def test_duplicated_counter_names_the_sequence(trained, predictor):
    seq = trained.seq
    dup = pl.concat([seq, seq.slice(5, 1)])
    sid = seq["sequence_id"][0]
    with pytest.raises(features.FeatureError, match=f"share a \\(sequence_id, sequence_counter\\).*{sid}"):
        predictor.predict(dup, trained.demo)


def test_extra_unknown_columns_are_ignored(trained, predictor):
    seq = trained.seq
    extra = seq.with_columns(
        pl.lit("junk").alias("firmware"), pl.lit(3.5).alias("battery"), pl.lit(None).alias("tof_6_v0")
    )
    _same_answer(predictor, extra, seq, trained.demo)


def test_null_sequence_id_on_one_row_is_named_as_such(trained, predictor):
    seq = trained.seq
    holed = seq.with_columns(
        pl.when(pl.int_range(pl.len()) == 2).then(None).otherwise(pl.col("sequence_id")).alias("sequence_id")
    )
    with pytest.raises((features.FeatureError, ensemble.PredictorError)) as info:
        predictor.predict(holed, trained.demo)
    msg = str(info.value)
    assert "sequence_id" in msg and "2 sequences" not in msg, msg


@pytest.mark.parametrize("col", ACC_COLS)
def test_missing_acc_column_is_named(trained, predictor, col):
    with pytest.raises(features.FeatureError, match=f"missing required column.*{col}"):
        predictor.predict(trained.seq.drop(col), trained.demo)


@pytest.mark.parametrize("col", ["acc_y", "rot_x", "thm_3", "tof_4_v31"])
def test_non_numeric_text_names_the_column(trained, predictor, col):
    text = _set_cells(trained.seq.with_columns(pl.col(col).cast(pl.String)), col, [4], "12,5e", dtype=pl.String)
    with pytest.raises(features.FeatureError, match=f"non-numeric text in sensor column.*{col}.*12,5e"):
        predictor.predict(text, trained.demo)


def test_non_numeric_dtype_names_the_column(trained, predictor):
    with pytest.raises(features.FeatureError, match="thm_5 \\(Boolean\\)"):
        predictor.predict(trained.seq.with_columns(pl.lit(True).alias("thm_5")), trained.demo)


# --------------------------------------------------------------------------- demographics


def test_missing_demographics_degrade_and_are_logged_once(trained, caplog):
    pred = _predictor(trained)  # fresh counters
    seq, demo = trained.seq, trained.demo
    nulls = demo.with_columns(pl.lit(None).alias(c) for c in DEMOGRAPHIC_FEATURES)
    cases = [None, demo.head(0), nulls, demo.with_columns(pl.lit("SUBJ_OTHER").alias("subject"))]
    with caplog.at_level(logging.WARNING, logger="ensemble"):
        answers = [pred.predict(seq, d) for d in cases]
    assert all(a in GESTURES for a in answers)
    assert len(set(answers)) == 1  # "no demographics" is one consistent state
    warnings = [r for r in caplog.records if "no usable demographics" in r.getMessage()]
    assert len(warnings) == 1 and seq["sequence_id"][0] in warnings[0].getMessage()
    assert pred.summary()["unknown_demographics"] == len(cases)
    assert pred.summary()["calls"] == len(cases) and pred.summary()["member_failures"] == {}


def test_partly_null_demographics_and_unseen_subject(trained):
    pred = _predictor(trained)
    seq, demo = trained.seq, trained.demo
    partial = demo.with_columns(pl.lit(None).alias("height_cm"), pl.lit(None).alias("handedness"))
    assert pred.predict(seq, partial) in GESTURES
    new = "SUBJ_NEVER_SEEN"
    assert new not in set(pl.read_csv(trained.root / "data" / "train.csv", columns=["subject"])["subject"])
    seq_new = seq.with_columns(pl.lit(new).alias("subject"))
    assert pred.predict(seq_new, demo.with_columns(pl.lit(new).alias("subject"))) in GESTURES
    assert pred.predict(seq_new, None) in GESTURES
    # only the call without any demographics value counts as unknown
    assert pred.summary()["unknown_demographics"] == 1


def test_nested_demographics_column_degrades_or_is_named(trained, predictor):
    demo = trained.demo.with_columns(pl.lit([30, 31]).alias("age"))
    try:
        assert predictor.predict(trained.seq, demo) in GESTURES
    except features.FeatureError as e:
        assert "age" in str(e)
    except Exception as e:  # anything else is the unhelpful crash this test is about
        raise AssertionError(f"{type(e).__module__}.{type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------- huge finite readings


@pytest.mark.parametrize("cols,value", [(["thm_1"], 1e20), (list(ACC_COLS), 3e38)])
def test_huge_finite_reading_gives_gesture_or_names_column(trained, predictor, cols, value):
    seq = trained.seq
    for col in cols:  # one row; every value is a finite float32
        seq = _set_cells(seq, col, [3], value)
    try:
        assert predictor.predict(seq, trained.demo) in GESTURES
    except features.FeatureError as e:
        assert any(c in str(e) for c in cols), f"error does not name the column: {e}"


# --------------------------------------------------------------------------- property-based

_SPECIALS = np.array(
    [np.nan, np.inf, -np.inf, 1e30, -1e30, 3.0e38, -3.0e38, 1e-30, 0.0, -1.0, 255.0, 1e6], dtype=np.float32
)
_GROUPS = {
    "acc": list(ACC_COLS),
    "rot": list(ROT_COLS),
    "thm": list(THM_COLS),
    "tof": list(TOF_COLS),
    "tof_1": [f"tof_1_v{p}" for p in range(64)],
}


@st.composite
def hostile_sequences(draw, lengths=None):
    """One sequence: random length, values sprinkled with NaN/inf/huge, whole modalities nulled or retyped.

    Hypothesis draws the structure; numpy fills the 332 columns from a drawn seed (drawing every cell
    through hypothesis would be far too slow). ``lengths``: a strategy for the row count (default 1..300).
    """
    from tests.factory import make_sequence

    if lengths is None:
        lengths = st.one_of(st.integers(2, 300), st.integers(1, 300))  # 1 row stays possible, not dominant
    n = draw(lengths)
    seed = draw(st.integers(0, 2**31 - 1))
    corrupt = draw(st.sets(st.sampled_from(sorted(_GROUPS))))
    frac = draw(st.sampled_from([0.01, 0.2, 1.0]))
    specials = draw(st.lists(st.integers(0, len(_SPECIALS) - 1), min_size=1, max_size=4))
    nulled = draw(st.sets(st.sampled_from(["acc", "rot", "thm", "tof", "tof_1"])))
    tofthm_dtype = draw(st.sampled_from(["float32", "float64", "string", "null"]))
    drop_rot = draw(st.booleans())
    shuffle = draw(st.booleans())

    rng = np.random.default_rng(seed)
    seq = make_sequence(f"SEQ_{seed:09d}", n, seed=seed % 1000)
    mat = seq.select(SENSOR_COLS).to_numpy().astype(np.float32)
    for g in corrupt:
        cols = [SENSOR_COLS.index(c) for c in _GROUPS[g]]
        hit = rng.random((n, len(cols))) < frac
        vals = _SPECIALS[rng.choice(specials, size=(n, len(cols)))]
        block = mat[:, cols]
        block[hit] = vals[hit]
        mat[:, cols] = block
    sensors = pl.DataFrame(mat, schema=list(SENSOR_COLS), orient="row")
    for g in nulled:
        sensors = sensors.with_columns(pl.lit(None, dtype=pl.Float32).alias(c) for c in _GROUPS[g])
    if tofthm_dtype == "float64":
        sensors = sensors.with_columns(pl.col(TOFTHM).cast(pl.Float64))
    elif tofthm_dtype == "string":
        sensors = sensors.with_columns(pl.col(TOFTHM).cast(pl.String))
    elif tofthm_dtype == "null" and {"thm", "tof"} <= nulled:
        sensors = sensors.with_columns(pl.lit(None).alias(c) for c in TOFTHM)
    raw = pl.concat([seq.select("row_id", "sequence_id", "sequence_counter", "subject"), sensors], how="horizontal")
    if drop_rot:
        raw = raw.drop(ROT_COLS)
    if shuffle:
        raw = raw.sample(fraction=1.0, shuffle=True, seed=seed)
    return raw


_PROPERTY = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


# No example is discarded: numpy's "assignment destination is read-only" (polars hands out read-only views
# of one-row frames; features.py copies them) fails these properties like any other crash. One-row
# sequences, where that error came from, get a property of their own so that every run draws some.
_ONE_ROW = settings(_PROPERTY, max_examples=12)


def _check_frame_table(raw: pl.DataFrame) -> None:
    """A finite one-sequence frame table, or a FeatureError with a message; anything else fails."""
    try:
        table = features.build_frame_table(raw)
    except features.FeatureError as e:
        assert str(e)
        return
    n = raw.height
    assert table.n_sequences == 1 and list(table.offsets) == [0, n]
    assert table.values.shape == (n, len(features.FRAME_FEATURES)) and table.values.dtype == np.float32
    assert np.isfinite(table.values).all()
    assert table.feature_names == features.FRAME_FEATURES


def _check_predict(predictor, trained, raw: pl.DataFrame, demo_kind: str) -> None:
    """A gesture, or (STRICT=1) an error whose message names the problem; never numpy's read-only error."""
    subject = raw["subject"][0]
    row = trained.demo.with_columns(pl.lit(subject).alias("subject"))
    demo = {
        "row": row,
        "none": None,
        "empty": row.head(0),
        "nulls": row.with_columns(pl.lit(None).alias(c) for c in DEMOGRAPHIC_FEATURES),
    }[demo_kind]
    try:
        answer = predictor.predict(raw, demo)
    except (features.FeatureError, ensemble.PredictorError, ValueError) as e:
        assert str(e).strip()
        assert "read-only" not in str(e), f"a numpy view leaked into the feature build: {e}"
        return
    assert answer in GESTURES


_DEMO_KINDS = st.sampled_from(["row", "none", "empty", "nulls"])


@_PROPERTY
@given(raw=hostile_sequences())
def test_property_frame_table_is_finite_or_feature_error(raw):
    _check_frame_table(raw)


@_ONE_ROW
@given(raw=hostile_sequences(lengths=st.just(1)))
def test_property_one_row_frame_table_is_finite_or_feature_error(raw):
    _check_frame_table(raw)


@_PROPERTY
@given(raw=hostile_sequences(), demo_kind=_DEMO_KINDS)
def test_property_predict_returns_gesture_or_clear_error(predictor, trained, raw, demo_kind):
    _check_predict(predictor, trained, raw, demo_kind)


@_ONE_ROW
@given(raw=hostile_sequences(lengths=st.just(1)), demo_kind=_DEMO_KINDS)
def test_property_one_row_predict_returns_gesture_or_clear_error(predictor, trained, raw, demo_kind):
    _check_predict(predictor, trained, raw, demo_kind)


# --------------------------------------------------------------------------- corrupt bundles


@pytest.fixture
def bundle_copy(trained, tmp_path):
    root = tmp_path / "bundles"
    shutil.copytree(trained.bundles, root)
    return root


def _edit_meta(path: Path, fn) -> None:
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def _swap(key):
    def fn(meta):
        names = meta[key]
        names[2], names[3] = names[3], names[2]

    return fn


def _swap_classes(meta):
    meta["classes"][0], meta["classes"][9] = meta["classes"][9], meta["classes"][0]


def test_intact_copy_loads(trained, bundle_copy):
    pred = _predictor(trained, bundle_copy)
    assert pred.members["lgbm"].n_folds == 3
    assert pred.predict(trained.seq, trained.demo) == _predictor(trained).predict(trained.seq, trained.demo)


def _reseal(d: Path) -> None:
    """Rewrite the file digests so that the deeper checks (parser, feature names) are reached."""
    meta = json.loads((d / "metadata.json").read_text())
    meta.pop("files", None)
    bundle.write_metadata(d, meta)


@pytest.mark.parametrize(
    "name,edit,target,what",
    [
        (
            "metadata truncated",
            lambda d: (d / "metadata.json").write_bytes((d / "metadata.json").read_bytes()[:300]),
            "metadata.json",
            "corrupt JSON",
        ),
        ("metadata empty", lambda d: (d / "metadata.json").write_text(""), "metadata.json", "corrupt JSON"),
        ("metadata missing", lambda d: (d / "metadata.json").unlink(), "metadata.json", "missing file"),
        (
            "feature order swapped",
            lambda d: _edit_meta(d / "metadata.json", _swap("feature_names")),
            "metadata.json",
            "feature_names: first difference at position 2",
        ),
        (
            "imu feature order swapped",
            lambda d: _edit_meta(d / "metadata.json", _swap("feature_names_imu")),
            "metadata.json",
            "feature_names_imu: first difference at position 2",
        ),
        (
            "class order changed",
            lambda d: _edit_meta(d / "metadata.json", _swap_classes),
            "metadata.json",
            "classes: first difference at position 0",
        ),
        (
            "class dropped",
            lambda d: _edit_meta(d / "metadata.json", lambda m: m["classes"].pop()),
            "metadata.json",
            "classes: bundle has 17, code expects 18",
        ),
        (
            "format version",
            lambda d: _edit_meta(d / "metadata.json", lambda m: m.update(format_version=99)),
            "metadata.json",
            "format_version: bundle 99",
        ),
        (
            "feature settings",
            lambda d: _edit_meta(d / "metadata.json", lambda m: m["feature_config"].update(dt=0.2)),
            "metadata.json",
            "dt: bundle 0.2",
        ),
        ("fold file missing", lambda d: (d / "fold2_imu.txt").unlink(), "fold2_imu.txt", "missing"),
        (
            "model file garbage",
            lambda d: (d / "fold1_full.txt").write_bytes(bytes(range(256)) * 20),
            "fold1_full.txt",
            "corrupt or truncated",
        ),
        (
            "model file emptied",
            lambda d: (d / "fold0_imu.txt").write_bytes(b""),
            "fold0_imu.txt",
            "corrupt or truncated",
        ),
        (
            "sealed garbage",
            lambda d: ((d / "fold1_full.txt").write_bytes(bytes(range(256)) * 20), _reseal(d)),
            "fold1_full.txt",
            "not a readable LightGBM model",
        ),
        (
            "present classes",
            lambda d: _edit_meta(d / "metadata.json", lambda m: m["models"][0]["present_classes"].pop()),
            "fold0_full.txt",
            "classes",
        ),
        (
            "full and imu files swapped",
            lambda d: (
                os.replace(d / "fold0_full.txt", d / "x"),
                os.replace(d / "fold0_imu.txt", d / "fold0_full.txt"),
                os.replace(d / "x", d / "fold0_imu.txt"),
            ),
            "fold0_full.txt",
            "corrupt or truncated",
        ),
        (
            "full and imu files swapped, resealed",
            lambda d: (
                os.replace(d / "fold0_full.txt", d / "x"),
                os.replace(d / "fold0_imu.txt", d / "fold0_full.txt"),
                os.replace(d / "x", d / "fold0_imu.txt"),
                _reseal(d),
            ),
            "fold0_full.txt",
            "booster features differ",
        ),
    ],
)
def test_corrupt_bundle_fails_at_startup_naming_file(trained, bundle_copy, name, edit, target, what):
    lgbm_dir = bundle_copy / "lgbm"
    edit(lgbm_dir)
    with pytest.raises(bundle.BundleError) as info:
        _predictor(trained, bundle_copy)  # at start-up, never at the first predict()
    msg = str(info.value)
    assert str(lgbm_dir / target) in msg, msg
    assert what in msg, msg


_LOAD_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import bundle, config, ensemble, lgbm_pipeline
    cfg = config.load_config({{"CMI_N_THREADS": "1", "STRICT": "1"}}, debug=True)  # serving would leave it out
    try:
        ensemble.Predictor(cfg, [lgbm_pipeline.LGBMPipeline()], bundle_root={b!r})
        print("LOADED")
    except bundle.BundleError as e:
        print("BUNDLE_ERROR", e)
""")


def test_truncated_model_file_is_a_bundle_error_not_a_crash(bundle_copy):
    # In a subprocess: the bug takes the interpreter down, which would end the whole test session.
    model = bundle_copy / "lgbm" / "fold1_full.txt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    proc = subprocess.run(
        [PY, "-c", _LOAD_SCRIPT.format(root=str(ROOT), b=str(bundle_copy))],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"loader process died with {proc.returncode}: {proc.stderr[-400:]}"
    assert "BUNDLE_ERROR" in proc.stdout and str(model) in proc.stdout, proc.stdout
