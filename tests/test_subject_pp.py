"""Subject-level post-processing: protocol learning, online assignment, the Predictor hook, the OOF replay."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import ensemble
import ensemble_seal
import subject_pp
from config import load_config
from io_utils import write_json
from metric import GESTURES
from subject_pp import (
    Protocol,
    SubjectAssigner,
    learn_protocol,
    simulate_online,
    slot_log_proba,
)
from tests.factory import demographics, make_sequence

A, B, C = GESTURES[0], GESTURES[1], GESTURES[9]
ORIENTS = ("Seated Straight", "Lie on Back")


def _labels(per_subject: dict[str, list[tuple[str, str]]]) -> tuple[list[str], list[str], list[str]]:
    s, o, g = [], [], []
    for subj, pairs in per_subject.items():
        for orient, gest in pairs:
            s.append(subj), o.append(orient), g.append(gest)
    return s, o, g


def _regular(n_subjects: int = 4) -> dict[str, list[tuple[str, str]]]:
    pairs = [(o, g) for o in ORIENTS for g in (A, B)] + [(ORIENTS[0], C)]
    return {f"S{i}": [p for p in pairs for _ in range(2)] for i in range(n_subjects)}


# ---------------------------------------------------------------- protocol learning
def test_regular_subjects_give_a_per_pair_protocol():
    p = learn_protocol(*_labels(_regular()))
    assert p.kind == "pair" and p.active
    assert sorted(p.slots) == sorted(
        (o, g, 2) for o, g in {(o, g) for o in ORIENTS for g in (A, B)} | {(ORIENTS[0], C)}
    )
    assert p.orientations == tuple(sorted(ORIENTS))
    assert p.info["share_within"] == 1.0 and p.info["capacity_total"] == 10
    assert Protocol.from_dict(p.to_dict()) == p  # stored as data, read back the same


def test_a_short_subject_still_fits_an_at_most_protocol():
    subj = _regular(5)
    subj["S0"] = subj["S0"][:-3]  # a subject who did fewer sequences (the real train set has such)
    p = learn_protocol(*_labels(subj))
    assert p.kind == "pair" and p.info["share_within"] == 1.0
    assert all(c == 2 for *_, c in p.slots)


def test_irregular_pairs_fall_back_to_gesture_counts_then_to_nothing(caplog):
    rng = np.random.default_rng(0)
    # each subject does A and B four times each but in random postures: pairs irregular, gestures regular
    subj = {f"S{i}": [(ORIENTS[int(rng.integers(2))], g) for g in (A, B) for _ in range(4)] for i in range(6)}
    p = learn_protocol(*_labels(subj), min_share=0.9)
    assert p.kind == "gesture" and sorted(p.slots) == [
        (subject_pp.ANY_ORIENTATION, A, 4),
        (subject_pp.ANY_ORIENTATION, B, 4),
    ]
    # random gestures and counts: no regularity, so no post-processing (logged)
    chaos = {
        f"S{i}": [(ORIENTS[0], GESTURES[int(rng.integers(18))]) for _ in range(int(rng.integers(5, 30)))]
        for i in range(6)
    }
    with caplog.at_level(logging.INFO):
        p = learn_protocol(*_labels(chaos))
    assert p.kind == "none" and not p.active and p.info["reason"]
    assert "it will do nothing" in caplog.text
    assert learn_protocol(["S1"], [ORIENTS[0]], [A]).kind == "none"  # one subject: nothing to learn from


# ---------------------------------------------------------------- assignment
def _gesture_protocol(caps: dict[str, int]) -> Protocol:
    return Protocol("gesture", tuple((subject_pp.ANY_ORIENTATION, g, c) for g, c in caps.items()))


def _proba(d: dict[str, float]) -> np.ndarray:
    p = np.full(18, 1e-3)
    for g, v in d.items():
        p[GESTURES.index(g)] = v
    return p / p.sum()


def test_assignment_fixes_a_slot_that_argmax_double_books():
    proto = _gesture_protocol({A: 1, B: 1})
    a = SubjectAssigner(proto)
    p1, p2 = _proba({A: 0.9, B: 0.1}), _proba({A: 0.6, B: 0.4})
    assert GESTURES[p1.argmax()] == A and GESTURES[p2.argmax()] == A  # argmax: A twice, one slot for A
    assert GESTURES[a.answer("S", slot_log_proba(proto, p1[None], None)[0])] == A
    assert GESTURES[a.answer("S", slot_log_proba(proto, p2[None], None)[0])] == B


def test_a_confident_later_sequence_moves_an_earlier_one_in_the_assignment():
    # the earlier row is re-assigned (its answer stays sent): the newcomer takes the slot it is sure of
    proto = _gesture_protocol({A: 1, B: 1})
    a = SubjectAssigner(proto)
    assert GESTURES[a.answer("S", slot_log_proba(proto, _proba({A: 0.55, B: 0.45})[None], None)[0])] == A
    assert GESTURES[a.answer("S", slot_log_proba(proto, _proba({A: 0.99, B: 0.01})[None], None)[0])] == A


def test_orientation_splits_a_gesture_into_pair_slots():
    proto = Protocol("pair", ((ORIENTS[1], A, 1), (ORIENTS[0], A, 1), (ORIENTS[0], B, 1)), tuple(sorted(ORIENTS)))
    a = SubjectAssigner(proto)
    pa = _proba({A: 0.8, B: 0.2})
    seated = np.array([0.1, 0.9])  # sorted: "Lie on Back", "Seated Straight"
    first = a.answer("S", slot_log_proba(proto, pa[None], seated[None])[0])
    second = a.answer("S", slot_log_proba(proto, pa[None], seated[None])[0])
    # two seated A's but one seated-A slot: the second goes to seated B, not to lying A
    assert GESTURES[first] == A and GESTURES[second] == B


def _random_stream(n_subjects: int, n_seq: int, seed: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(f"S{i}", rng.dirichlet(np.ones(18) * 0.3)) for i in range(n_subjects) for _ in range(n_seq)]


def test_deterministic_and_interleaving_does_not_matter():
    proto = _gesture_protocol({g: 2 for g in GESTURES})
    stream = _random_stream(3, 30, 1)
    logp = [(s, slot_log_proba(proto, p[None], None)[0]) for s, p in stream]

    def run(items):
        a = SubjectAssigner(proto)
        return [(s, a.answer(s, lp)) for s, lp in items]

    grouped = run(logp)
    assert grouped == run(logp)  # same order, same answers
    inter = [logp[i] for i in np.argsort(np.tile(np.arange(30), 3), kind="stable")]  # S0, S1, S2, S0, ...
    assert sorted(run(inter), key=str) == sorted(grouped, key=str)
    by_subject = {s: [x for t, x in run(inter) if t == s] for s in ("S0", "S1", "S2")}
    assert by_subject == {s: [x for t, x in grouped if t == s] for s in ("S0", "S1", "S2")}


def test_more_sequences_than_slots_degrades_gracefully(caplog):
    proto = _gesture_protocol({A: 1, B: 1})
    a = SubjectAssigner(proto, max_history=6)
    with caplog.at_level(logging.WARNING):
        answers = [a.answer("S", slot_log_proba(proto, _proba({A: 0.7, B: 0.3})[None], None)[0]) for _ in range(9)]
    assert {GESTURES[x] for x in answers} <= {A, B}
    assert "capacities relaxed" in caplog.text and "forgotten" in caplog.text
    assert len(a.state["S"].rows) == 6 and a.summary()["subjects_over_capacity"] == 1


def test_oof_replay_gains_on_noisy_probabilities():
    rng = np.random.default_rng(3)
    proto = _gesture_protocol({g: 2 for g in GESTURES})
    subjects = np.repeat([f"S{i}" for i in range(4)], 36)
    y = np.tile(np.repeat(np.arange(18), 2), 4)
    logits = rng.normal(0, 1.0, (len(y), 18))
    logits[np.arange(len(y)), y] += 2.5  # right about 3 times in 4: where the protocol pays
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    r = simulate_online(proto, y, p, None, subjects, n_orders=5, seed=0, fold_ids=np.repeat([0, 1], 72))
    assert r["orders"] == 5 and len(r["scores"]) == 5 and r["min"] <= r["mean"] <= r["max"]
    assert r["gain_mean"] > 0.01 and set(r["per_fold"]) == {0, 1}


# ---------------------------------------------------------------- the Predictor hook
class TableMember:
    """Probabilities looked up by sequence id."""

    classes_ = GESTURES

    def __init__(self, by_id: dict[str, np.ndarray]):
        self.by_id = by_id

    def predict_proba(self, table):
        return np.stack([self.by_id.get(s, np.full(18, 1 / 18)) for s in table.sequence_ids])


def _predictor(tmp_path: Path, env: dict[str, str], by_id: dict[str, np.ndarray]) -> ensemble.Predictor:
    (tmp_path / "bundles" / "lgbm").mkdir(parents=True, exist_ok=True)
    write_json(tmp_path / "ensemble" / subject_pp.PROTOCOL_FILE, _gesture_protocol({A: 1, B: 1}).to_dict())
    ensemble_seal.write_manifest(tmp_path / "ensemble", {})  # served only as a sealed set
    spec = ensemble.MemberSpec("lgbm", lambda d, c: TableMember(by_id))
    return ensemble.Predictor(load_config(env, out_dir=str(tmp_path)), [spec], bundle_root=tmp_path / "bundles")


@pytest.mark.parametrize("switch, expect", [("1", [A, B, A]), ("0", [A, A, A])])
def test_predictor_assigns_per_subject_and_the_switch_gives_argmax(tmp_path, switch, expect):
    by_id = {
        "SEQ_000001": _proba({A: 0.9, B: 0.1}),
        "SEQ_000002": _proba({A: 0.6, B: 0.4}),
        "SEQ_000003": _proba({A: 0.6, B: 0.4}),
    }
    pred = _predictor(tmp_path, {"ENSEMBLE_SUBJECT_PP": switch}, by_id)
    answers = [
        pred.predict(make_sequence("SEQ_000001", 10, subject="SUBJ_000001"), demographics(["SUBJ_000001"])),
        pred.predict(make_sequence("SEQ_000002", 10, subject="SUBJ_000001"), demographics(["SUBJ_000001"])),
        # another subject has its own slots
        pred.predict(make_sequence("SEQ_000003", 10, subject="SUBJ_000002"), demographics(["SUBJ_000002"])),
    ]
    assert answers == expect
    assert pred.summary()["subject_pp"]["enabled"] is (switch == "1")


def test_predictor_without_a_subject_answers_argmax(tmp_path):
    by_id = {"SEQ_000001": _proba({A: 0.9, B: 0.1}), "SEQ_000002": _proba({A: 0.6, B: 0.4})}
    pred = _predictor(tmp_path, {}, by_id)
    for sid in ("SEQ_000001", "SEQ_000002"):
        assert pred.predict(make_sequence(sid, 10).drop("subject"), None) == A
    assert pred.summary()["subject_pp"]["calls_without_subject"] == 2


def test_a_retried_sequence_id_replaces_its_row():
    proto = _gesture_protocol({A: 1, B: 1})
    a = SubjectAssigner(proto)
    lp = slot_log_proba(proto, _proba({A: 0.9, B: 0.1})[None], None)[0]
    assert [GESTURES[a.answer("S", lp, "SEQ_1")] for _ in range(3)] == [A, A, A]  # same id: one row, same slot
    assert len(a.state["S"].rows) == 1
    assert GESTURES[a.answer("S", lp, "SEQ_2")] == B  # a new id competes for the slot


def test_orientation_model_round_trips_through_the_ensemble_folder(tmp_path):
    from features import build_frame_table
    from io_utils import atomic_path
    from tests.factory import make_table

    cfg = load_config({"CMI_N_THREADS": "1"})
    table = build_frame_table(make_table([30 + 3 * i for i in range(24)]))
    X, names = subject_pp.orientation_features(table, cfg)
    assert names and all(n.split("__")[0] in subject_pp.ORIENTATION_CHANNELS for n in names)
    o_idx = np.arange(24) % 2
    booster, oof = subject_pp.fit_orientation_model(X, o_idx, 2, np.arange(24) % 3, cfg, names, rounds=5)
    assert oof.shape == (24, 2) and np.allclose(oof.sum(1), 1)
    proto = Protocol("pair", ((ORIENTS[1], A, 1), (ORIENTS[0], A, 1), (ORIENTS[0], B, 1)), tuple(sorted(ORIENTS)))
    write_json(tmp_path / subject_pp.PROTOCOL_FILE, {**proto.to_dict(), "orientation_features": names})
    with atomic_path(tmp_path / subject_pp.ORIENTATION_MODEL_FILE) as tmp:
        booster.save_model(str(tmp))
    ensemble_seal.write_manifest(tmp_path, {})
    pp = subject_pp.SubjectPostProcessor.load(tmp_path, cfg)
    assert pp.enabled and pp.orientation is not None
    assert pp.answer("S", table.select([0]), _proba({A: 0.9, B: 0.1})) in (GESTURES.index(A), GESTURES.index(B))
    write_json(tmp_path / subject_pp.PROTOCOL_FILE, {**proto.to_dict(), "orientation_features": names[::-1]})
    ensemble_seal.write_manifest(tmp_path, {})  # sealed: the mismatch itself is what is caught
    with pytest.raises(subject_pp.ProtocolError, match="does not match"):
        subject_pp.SubjectPostProcessor.load(tmp_path, cfg)
