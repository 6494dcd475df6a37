"""Evidence bars that hold in training as at serving, and optional steps that cannot fail a finished training.

The wear correction rewrites training rows only on serving's evidence (enough sequences, summed log-odds past
the threshold) and never for more than a plausible share of subjects; the subject post-processing, the wear
detector and the report skip what their data cannot support (logged, recorded), and an unexpected failure in
one of them is logged and skipped unless STRICT=1.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import polars as pl
import pytest

import subject_pp
import wear
from config import load_config
from features import build_frame_table
from io_utils import write_json
from metric import GESTURES
from schema import ROT_COLS
from tests.factory import labelled_rows
from tools import report, synth

# --------------------------------------------------------------------------- the wear correction in training


@pytest.fixture(scope="module")
def worn():
    """6 generated training subjects (102 sequences each), one of them wearing the device rotated."""
    ds = synth.generate(n_subjects=6, seed=4, n_test_subjects=0, n_rotated_train_subjects=1)
    (rotated,) = ds.rotated_subjects["train"]
    return ds.train, rotated


def _prepare(rows, tmp_path, env=None, record=None):
    cfg = load_config(env or {})
    table = build_frame_table(rows, None, cfg.features)
    extra = {} if record is None else {"record": record}
    out, changed = wear.prepare_training_rows(rows, None, table, cfg, tmp_path, **extra)
    return out, changed, json.loads((tmp_path / wear.WEAR_FILE).read_text())


def _relabel(rows: pl.DataFrame, new_subject: dict[str, str]) -> pl.DataFrame:
    """Give the listed sequences subjects of their own."""
    return rows.with_columns(
        pl.col("sequence_id").replace_strict(new_subject, default=pl.col("subject")).alias("subject")
    )


def test_training_rotates_only_subjects_with_servings_evidence(worn, tmp_path, caplog):
    # A rotated wearer's sequences under subjects of their own: three with one sequence each, one with two
    # (enough sequences, too little evidence). Old main rotated such subjects; serving never would.
    rows, rotated = worn
    ids = rows.filter(pl.col("subject") == rotated)["sequence_id"].unique(maintain_order=True).to_list()
    split = {ids[0]: "SUBJ_ONE_A", ids[1]: "SUBJ_ONE_B", ids[2]: "SUBJ_ONE_C", ids[3]: "SUBJ_TWO", ids[4]: "SUBJ_TWO"}
    rows = _relabel(rows, split)
    with caplog.at_level(logging.INFO, logger="wear"):
        out, changed, info = _prepare(rows, tmp_path)
    # positive control: the genuine rotated subject (97 sequences left) is still found and rotated back
    assert info["rotated_training_subjects"] == [rotated] and changed
    ev = info["training_evidence"]
    (only,) = ev["rotated"]
    assert only["subject"] == rotated and only["sequences"] == len(ids) - 5 and only["log_odds"] > info["threshold"]
    assert ev["subjects_below_min_sequences"] == 3 and not ev["refused_by_cap"]
    assert "SUBJ_TWO" in [d["subject"] for d in ev["below_threshold"]]  # a candidate, but on too little evidence
    assert all(d["log_odds"] <= info["threshold"] for d in ev["below_threshold"])
    for s in ("SUBJ_ONE_A", "SUBJ_ONE_B", "SUBJ_ONE_C", "SUBJ_TWO"):  # their rows are left as recorded
        assert out.filter(pl.col("subject") == s)["acc_x"].equals(rows.filter(pl.col("subject") == s)["acc_x"])
    assert np.allclose(
        out.filter(pl.col("subject") == rotated)["acc_x"].to_numpy(),
        -rows.filter(pl.col("subject") == rotated)["acc_x"].to_numpy(),
    )
    assert "rotating back 1 of 10 training subject(s)" in caplog.text
    assert f"{rotated} ({len(ids) - 5} sequences, log-odds" in caplog.text


def test_min_sequences_is_the_same_bar_as_serving(worn, tmp_path):
    # ENSEMBLE_WEAR_MIN_SEQUENCES above every subject's count: nobody can be rotated, however clear the evidence
    rows, _ = worn
    _, changed, info = _prepare(rows, tmp_path, {"ENSEMBLE_WEAR_MIN_SEQUENCES": "500"})
    assert not changed and info["rotated_training_subjects"] == [] and not info["training_corrected"]
    assert info["training_evidence"]["subjects_below_min_sequences"] == 6


def test_more_rotated_subjects_than_the_cap_rotates_none_and_warns(worn, tmp_path, caplog):
    rows, rotated = worn
    second = sorted(set(rows["subject"].unique().to_list()) - {rotated})[0]
    rows = wear.correct_subjects(rows, [second])  # a second subject now wears it rotated: 2 of 6 > max(1, 0.6)
    record: dict = {}
    with caplog.at_level(logging.WARNING, logger="wear"):
        out, changed, info = _prepare(rows, tmp_path, record=record)
    assert not changed and out is rows and info["rotated_training_subjects"] == []
    ev = info["training_evidence"]
    assert ev["refused_by_cap"] and sorted(d["subject"] for d in ev["refused"]) == sorted([rotated, second])
    assert ev["max_subjects"] == 1 and ev["max_share"] == pytest.approx(0.1)
    assert "2 of 6 training subjects look rotated" in caplog.text and "ENSEMBLE_WEAR_MAX_TRAIN_SHARE=0.1" in caplog.text
    assert record["refused_by_cap"] and "none rotated" in record["reason"]
    # the same data with a cap that allows them: both are rotated back
    _, changed, info = _prepare(rows, tmp_path / "b", {"ENSEMBLE_WEAR_MAX_TRAIN_SHARE": "0.5"})
    assert changed and info["rotated_training_subjects"] == sorted([rotated, second])


def test_no_rotation_columns_still_detects_from_the_accelerometer(worn, tmp_path):
    # The detector's features are acc / thm / ToF only: without any rotation value it still runs and finds the
    # rotated wearer; the corrected rows keep their rotation null (nothing is invented).
    rows, rotated = worn
    rows = rows.with_columns(pl.lit(None, dtype=pl.Float32).alias(c) for c in ROT_COLS)
    out, changed, info = _prepare(rows, tmp_path)
    assert changed and info["rotated_training_subjects"] == [rotated]
    assert out.select(ROT_COLS).null_count().sum_horizontal()[0] == rows.height * len(ROT_COLS)


def test_one_training_subject_skips_the_wear_detector(worn, tmp_path, caplog):
    rows, rotated = worn
    one = rows.filter(pl.col("subject") == rotated)
    (tmp_path / wear.WEAR_FILE).write_text("{}")  # an earlier run's detector must not stay beside new bundles
    record: dict = {}
    with caplog.at_level(logging.WARNING, logger="wear"):
        out, changed = wear.prepare_training_rows(one, None, build_frame_table(one), load_config({}), tmp_path, record)
    assert out is one and not changed and not (tmp_path / wear.WEAR_FILE).exists()
    assert record["status"] == "skipped" and "1 training subject" in record["reason"]
    assert "wear detection skipped" in caplog.text


# --------------------------------------------------------------------------- subject post-processing


def _pp_inputs(n_subjects: int = 3, one_orientation: bool = True):
    rows = labelled_rows(n_subjects=n_subjects, classes=(0, 1, 8, 9), reps=2, min_len=20, max_len=30)
    if one_orientation:
        rows = rows.with_columns(pl.lit("Seated Straight").alias("orientation"))
    table = build_frame_table(rows)
    labels = (
        rows.group_by("sequence_id", maintain_order=True)
        .agg(pl.col("subject").first(), pl.col("gesture").first(), pl.col("orientation").first())
        .sort("sequence_id")
    )
    y = np.array([GESTURES.index(g) for g in labels["gesture"]])
    fold_ids = np.array([int(s[-1]) % 3 for s in labels["subject"]])  # one subject per fold
    return table, labels, y, fold_ids


def test_one_orientation_skips_the_orientation_model_and_keeps_the_protocol(tmp_path, caplog):
    # Old main: LightGBMError "Number of classes should be specified and greater than 1" at the end of training.
    table, labels, y, fold_ids = _pp_inputs()
    cfg = load_config({"CMI_N_THREADS": "1"})
    (tmp_path / "ensemble").mkdir()
    (tmp_path / "ensemble" / subject_pp.ORIENTATION_MODEL_FILE).write_text("an earlier run's model")
    with caplog.at_level(logging.WARNING, logger="subject_pp"):
        summary = subject_pp.fit_and_evaluate(tmp_path, table, labels, y, fold_ids, cfg)
    assert summary["protocol"]["kind"] == "gesture"  # the pair counts of one orientation, per gesture
    assert "one orientation" in summary["skipped"]["orientation model"]
    assert "weights.json" in summary["skipped"]["OOF replay"]  # no blend fitted here: nothing to replay
    assert not (tmp_path / "ensemble" / subject_pp.ORIENTATION_MODEL_FILE).exists()
    assert "orientation model skipped" in caplog.text
    written = json.loads((tmp_path / "oof" / "subject_pp_replay.json").read_text())
    assert written["skipped"] == summary["skipped"]
    stored = json.loads((tmp_path / "ensemble" / subject_pp.PROTOCOL_FILE).read_text())
    protocol = subject_pp.Protocol.from_dict(stored)  # what serving reads: an active per-gesture protocol
    assert protocol.active and protocol.kind == "gesture" and "orientation_features" not in stored
    assert sorted(g for _, g, _ in protocol.slots) == sorted(GESTURES[c] for c in (0, 1, 8, 9))


def test_no_orientation_column_skips_the_orientation_model(tmp_path):
    table, labels, y, fold_ids = _pp_inputs(one_orientation=False)
    summary = subject_pp.fit_and_evaluate(
        tmp_path, table, labels.drop("orientation"), y, fold_ids, load_config({"CMI_N_THREADS": "1"})
    )
    assert summary["protocol"]["kind"] == "gesture"
    assert "no orientation column" in summary["skipped"]["orientation model"]


def test_every_sequence_in_one_fold_skips_the_orientation_model(tmp_path):
    # several orientations, but the folds give no out-of-fold estimate (old main: an empty LightGBM dataset)
    table, labels, y, fold_ids = _pp_inputs(one_orientation=False)
    summary = subject_pp.fit_and_evaluate(
        tmp_path, table, labels, y, np.zeros_like(fold_ids), load_config({"CMI_N_THREADS": "1"})
    )
    assert "1 fold(s)" in summary["skipped"]["orientation model"]
    assert summary["protocol"]["kind"] == "gesture" and "orientation_oof_accuracy" not in summary
    with pytest.raises(subject_pp.ProtocolError, match="1 orientation class"):
        subject_pp.fit_orientation_model(
            np.zeros((6, 2)), np.zeros(6, int), 1, np.arange(6) % 2, load_config({}), ["a", "b"]
        )


def test_one_subject_skips_the_protocol(tmp_path):
    table, labels, y, fold_ids = _pp_inputs(n_subjects=1, one_orientation=False)
    (tmp_path / "ensemble").mkdir()
    write_json(tmp_path / "ensemble" / "weights.json", {"members": ["lgbm"]})
    summary = subject_pp.fit_and_evaluate(tmp_path, table, labels, y, fold_ids, load_config({"CMI_N_THREADS": "1"}))
    assert summary["protocol"]["kind"] == "none" and "1 training subject" in summary["skipped"]["protocol"]
    assert summary["simulation"] is None
    stored = json.loads((tmp_path / "ensemble" / subject_pp.PROTOCOL_FILE).read_text())
    assert not subject_pp.Protocol.from_dict(stored).active  # serving: no post-processing


# --------------------------------------------------------------------------- the report


def test_report_without_oof_says_so(tmp_path, caplog):
    write_json(
        tmp_path / "optional_steps.json",
        {"orientation model": {"status": "skipped", "reason": "one orientation ('Seated Straight')"}},
    )
    with caplog.at_level(logging.WARNING, logger="tools.report"):
        text = report.write_report(tmp_path).read_text()
    assert "No member OOF" in text and "no member OOF" in caplog.text
    assert "| orientation model | skipped | one orientation ('Seated Straight') |" in text
    # OOF summaries whose arrays are gone: the report is still written, and says why the plots are missing
    write_json(tmp_path / "oof" / "lgbm_summary.json", {"overall": {"full": 0.5, "imu_only": 0.4, "mean": 0.45}})
    text = report.write_report(tmp_path).read_text()
    assert "Plots and per-class F1 skipped" in text


# --------------------------------------------------------------------------- through main.stage_train


@pytest.mark.slow
def test_a_failing_optional_step_does_not_fail_a_finished_training(tmp_path, monkeypatch, caplog):
    """One small debug training on one-orientation data; the wear detector raises: training still finishes."""
    import main

    synth.write_dataset(tmp_path / "data", n_subjects=4, seed=1, n_test_subjects=0)
    train_csv = tmp_path / "data" / "train.csv"
    pl.read_csv(train_csv, infer_schema_length=0).with_columns(
        pl.lit("Seated Straight").alias("orientation")
    ).write_csv(train_csv)

    def boom(*args, **kwargs):
        raise RuntimeError("a bug in an optional step")

    monkeypatch.setattr(wear, "prepare_training_rows", boom)
    env = {"STRICT": "0", "CMI_N_THREADS": "1", "CMI_N_FOLDS": "2", "ENSEMBLE_SUBJECT_PP_ORDERS": "2"}
    cfg = load_config(env, data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), debug=True)
    with caplog.at_level(logging.WARNING):
        summaries = main.stage_train(cfg, ["lgbm"], main.StageTimer())
    out = tmp_path / "out"
    assert "lgbm" in summaries and (out / "bundles" / "lgbm" / "metadata.json").exists()
    assert (out / "ensemble" / "weights.json").exists()
    steps = json.loads((out / "optional_steps.json").read_text())
    assert steps["wear detector"] == {"status": "failed", "reason": "RuntimeError: a bug in an optional step"}
    assert "Traceback" in caplog.text and "optional step 'wear detector' failed" in caplog.text
    # one orientation: the protocol is per gesture, the orientation model skipped, the replay ran
    assert steps["subject post-processing"]["status"] == "fitted" and steps["orientation model"]["status"] == "skipped"
    replay = json.loads((out / "oof" / "subject_pp_replay.json").read_text())
    assert replay["protocol"]["kind"] == "gesture" and replay["simulation"]["mixed"]["orders"] == 2
    assert "orientation model" in report.write_report(out).read_text()
    # STRICT=1 (the test suite's mode): a bug in an optional step surfaces (the trained bundle is reused)
    monkeypatch.undo()  # the real wear detector again; the subject post-processing raises instead
    monkeypatch.setattr(subject_pp, "fit_and_evaluate", boom)
    strict = load_config({**env, "STRICT": "1"}, data_dir=str(tmp_path / "data"), out_dir=str(out), debug=True)
    with pytest.raises(RuntimeError, match="a bug in an optional step"):
        main.stage_train(strict, ["lgbm"], main.StageTimer())
