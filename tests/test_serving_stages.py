"""Serving as named stages (issue 24, item 1): admit -> correct wear -> featurize once -> call members -> blend
-> decide -> record, in that order; one rule for "the subject" under STRICT=1 and in serving.

Small in-test members (no training): each test takes well under a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

import ensemble
import serving_guard
import subject_pp
import wear
from config import load_config
from metric import GESTURES
from tests.factory import demographics, make_sequence


class LengthMember:
    """Answers class (number of rows % 18) with 0.83; keeps every table it is given (warm-up calls left out)."""

    classes_ = GESTURES

    def __init__(self) -> None:
        self.tables: list = []

    def predict_proba(self, table):
        if table.sequence_ids[0] != "WARMUP":
            self.tables.append(table)
        p = np.full((table.n_sequences, 18), 0.01)
        p[np.arange(table.n_sequences), table.lengths % 18] = 0.83
        return p


class SureDetector:
    """A wear detector stub: every sequence is strong evidence of a rotated wearer."""

    def log_odds(self, x):
        return np.full(len(x), 10.0)


def _predictor(tmp_path: Path, env: dict[str, str], member: LengthMember | None = None) -> ensemble.Predictor:
    member = member or LengthMember()
    (tmp_path / "bundles" / "lgbm").mkdir(parents=True, exist_ok=True)
    spec = ensemble.MemberSpec("lgbm", lambda d, c: member)
    pred = ensemble.Predictor(load_config(env, out_dir=str(tmp_path)), [spec], bundle_root=tmp_path / "bundles")
    # the two per-subject steps as training fits them (built here: no files to seal)
    protocol = subject_pp.Protocol("gesture", tuple((subject_pp.ANY_ORIENTATION, g, 8) for g in GESTURES))
    pred.subject_pp = subject_pp.SubjectPostProcessor(protocol, None, pred.cfg)
    return pred


def _count_features(monkeypatch) -> list[pl.DataFrame]:
    """Every frame the Predictor builds features from (``ensemble.build_frame_table`` is its one feature call)."""
    built: list[pl.DataFrame] = []
    real = ensemble.build_frame_table

    def counting(rows, *args, **kwargs):
        built.append(rows)
        return real(rows, *args, **kwargs)

    monkeypatch.setattr(ensemble, "build_frame_table", counting)
    return built


@pytest.mark.parametrize("strict", ["0", "1"])
def test_each_call_featurizes_once(tmp_path, monkeypatch, strict):
    pred = _predictor(tmp_path, {"STRICT": strict})
    built = _count_features(monkeypatch)
    for i in range(4):
        pred.predict(make_sequence(f"SEQ_{i:03d}", 20 + i, seed=i), demographics(["SUBJ_000001"]))
        assert len(built) == i + 1
    assert pred.summary()["answers"] == {"members": 4}


def test_only_the_call_that_tips_the_wear_evidence_featurizes_again(tmp_path, monkeypatch):
    member = LengthMember()
    pred = _predictor(tmp_path, {}, member)
    pred.wear = wear.WearDetector(SureDetector(), threshold=15.0, min_sequences=2, enabled=True).with_bounds(pred.cfg)
    built = _count_features(monkeypatch)
    seqs = [make_sequence(f"SEQ_{i:03d}", 30, seed=i) for i in range(3)]
    counts = []
    for seq in seqs:
        before = len(built)
        pred.predict(seq, demographics(["SUBJ_000001"]))
        counts.append(len(built) - before)
    # 1st: evidence 10 (not yet); 2nd: 20 > 15 after 2 sequences, answered from corrected rows; 3rd: corrected first
    assert counts == [1, 2, 1] and pred.wear.rotated_subjects() == ["SUBJ_000001"]
    acc_x = [float(rows["acc_x"].cast(pl.Float64)[0]) for rows in built]
    assert acc_x[0] == pytest.approx(float(seqs[0]["acc_x"][0]), rel=1e-6)  # as recorded
    assert acc_x[2] == pytest.approx(-float(seqs[1]["acc_x"][0]), rel=1e-6)  # the tipping call: rotated back
    assert acc_x[3] == pytest.approx(-float(seqs[2]["acc_x"][0]), rel=1e-6)  # known rotated: corrected once
    assert len(member.tables) == 3  # the members saw one table per call: the corrected one on the 2nd


def test_the_stages_run_in_one_direction(tmp_path, monkeypatch):
    pred = _predictor(tmp_path, {})
    order: list[str] = []

    def spy(obj, name, label):
        real = getattr(obj, name)

        def wrapped(*args, **kwargs):
            order.append(label)
            return real(*args, **kwargs)

        monkeypatch.setattr(obj, name, wrapped)

    for name, label in [
        ("_admit", "admit"),
        ("_featurize", "featurize"),
        ("_call_members", "call members"),
        ("_blend", "blend"),
        ("_decide", "decide"),
        ("_record", "record"),
    ]:
        spy(pred, name, label)
    spy(pred.wear, "correct", "correct wear")
    spy(pred.wear, "observe", "wear evidence")
    assert pred.predict(make_sequence("SEQ_1", 25), demographics(["SUBJ_000001"])) == GESTURES[25 % 18]
    assert order == [
        "admit",
        "correct wear",
        "featurize",
        "wear evidence",
        "call members",
        "blend",
        "decide",
        "record",
    ]


@pytest.mark.parametrize("strict", ["0", "1"])
def test_without_a_subject_column_the_demographics_row_names_the_subject_in_both_modes(tmp_path, strict):
    """Old main: under STRICT=1 the demographics row's subject was used, in serving no subject at all (so no slot
    assignment and no wear evidence when serving)."""
    pred = _predictor(tmp_path, {"STRICT": strict})
    det = wear.Detector(coef=np.zeros(len(wear.DETECTOR_FEATURES)), scale=np.ones(len(wear.DETECTOR_FEATURES)))
    pred.wear = wear.WearDetector(det, threshold=1e9, min_sequences=1, enabled=True).with_bounds(pred.cfg)
    for i in range(2):
        seq = make_sequence(f"SEQ_{i:03d}", 20 + i, seed=i).drop("subject")
        assert pred.predict(seq, demographics(["SUBJ_A"])) == GESTURES[(20 + i) % 18]
    s = pred.summary()
    assert s["subject_pp"]["calls_without_subject"] == 0 and s["subject_pp"]["subjects"] == 1
    assert list(pred.subject_pp.assigner.state) == ["SUBJ_A"] and list(pred.wear.state) == ["SUBJ_A"]


def test_subject_of_is_one_rule():
    seq = make_sequence("S", 5, subject="SUBJ_ROWS")
    demo = demographics(["SUBJ_DEMO"])
    assert serving_guard.subject_of(seq, demo) == "SUBJ_ROWS"  # the rows say it first
    first_null = seq.with_columns(pl.when(pl.int_range(pl.len()) < 2).then(None).otherwise("subject").alias("subject"))
    assert serving_guard.subject_of(first_null, demo) == "SUBJ_ROWS"  # the first row that names one
    blank = seq.with_columns(pl.lit("").alias("subject"))
    assert serving_guard.subject_of(blank, demo) == "SUBJ_DEMO"  # empty: the demographics row
    assert serving_guard.subject_of(seq.drop("subject"), demo) == "SUBJ_DEMO"
    assert serving_guard.subject_of(seq.drop("subject"), demographics(["A", "B"])) == ""  # two rows: which?
    assert serving_guard.subject_of(seq.drop("subject"), None) == ""


def test_a_failing_stage_in_serving_falls_back_and_strict_raises(tmp_path, monkeypatch):
    pred = _predictor(tmp_path, {})

    def broken(subject, table, proba):
        raise RuntimeError("assignment broken")

    monkeypatch.setattr(pred, "_decide", broken)
    assert pred.predict(make_sequence("SEQ_1", 25), demographics(["SUBJ_000001"])) == pred.prior.answer
    entry = pred.summary()["degraded"]["sequences"]["SEQ_1"]
    assert entry["answer"] == "uniform_prior" and entry["problems"][0] == "members: RuntimeError: assignment broken"
    assert [p.split(":")[0] for p in entry["problems"]] == ["members", "imu_only", "imu_only without demographics"]
    strict = _predictor(tmp_path, {"STRICT": "1"})
    monkeypatch.setattr(strict, "_decide", broken)
    with pytest.raises(RuntimeError, match="assignment broken"):
        strict.predict(make_sequence("SEQ_1", 25), demographics(["SUBJ_000001"]))
