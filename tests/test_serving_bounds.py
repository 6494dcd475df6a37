"""Serving bounds (issue 23, item 7): long sequences cut to their tail, per-subject state bounded, concurrent
predict() calls serialised, and damaged start-up parts left out in serving / errors under STRICT=1.

Most cases use small in-test members (no training); the corrupt-bundle case copies one real LightGBM
bundle trained once for the module through ``main.stage_train``.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import ensemble
import serving_guard
import subject_pp
import wear
from config import load_config
from io_utils import write_json
from metric import GESTURES
from tests.factory import demographics, make_sequence, trained_lgbm_run

try:  # the ensemble files' seal; without it (older code) a damaged file is simply unreadable
    import ensemble_seal
except ImportError:  # pragma: no cover - only on code before the seal
    ensemble_seal = None


class LengthMember:
    """Answers class (number of rows % 18) with 0.83; records the row count of every table it is given."""

    classes_ = GESTURES

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.tables: list = []

    def predict_proba(self, table):
        if table.sequence_ids[0] != "WARMUP":
            self.rows.append(int(table.values.shape[0]))
            self.tables.append(table)
        p = np.full((table.n_sequences, 18), 0.01)
        p[np.arange(table.n_sequences), table.lengths % 18] = 0.83
        return p


class RaisingSource:
    """A member whose bundle does not load (what a damaged bundle does at start-up)."""

    name = "torch"

    def is_available(self):
        return True, ""

    def load(self, bundle_dir, cfg):
        import bundle

        raise bundle.BundleError(f"{bundle_dir}/fold0.pt is corrupt or truncated (sha256 differs from metadata.json)")


def _predictor(tmp_path: Path, env: dict[str, str], member=None, extra=()) -> ensemble.Predictor:
    member = member or LengthMember()
    (tmp_path / "bundles" / "lgbm").mkdir(parents=True, exist_ok=True)
    for spec in extra:
        (tmp_path / "bundles" / spec.name).mkdir(parents=True, exist_ok=True)
    specs = [ensemble.MemberSpec("lgbm", lambda d, c: member), *extra]
    return ensemble.Predictor(load_config(env, out_dir=str(tmp_path)), specs, bundle_root=tmp_path / "bundles")


def _free_protocol(capacity: int) -> subject_pp.Protocol:
    """One slot per gesture, each with room for ``capacity`` sequences: the assignment is every row's argmax."""
    return subject_pp.Protocol("gesture", tuple((subject_pp.ANY_ORIENTATION, g, capacity) for g in GESTURES))


# --------------------------------------------------------------------------- long sequences


def test_a_long_sequence_is_cut_to_its_tail_counted_and_listed(tmp_path, monkeypatch):
    member = LengthMember()
    pred = _predictor(tmp_path, {"ENSEMBLE_SERVE_MAX_ROWS": "50"}, member)
    built: list[int] = []
    real_build = ensemble.build_frame_table
    monkeypatch.setattr(
        ensemble, "build_frame_table", lambda rows, *a, **k: built.append(rows.height) or real_build(rows, *a, **k)
    )
    seq = make_sequence("SEQ_LONG", 400, seed=3)
    shuffled = seq.sample(fraction=1.0, shuffle=True, seed=1)  # the tail is by sequence_counter, not file order
    answer = pred.predict(shuffled, demographics(["SUBJ_000001"]))
    assert built == [50] and member.rows == [50]  # only the last 50 rows reached the features and the member
    expected = real_build(seq.tail(50), demographics(["SUBJ_000001"]))
    np.testing.assert_array_equal(member.tables[0].values, expected.values)
    assert answer == GESTURES[50 % 18]
    s = pred.summary()
    assert s["bounds"]["sequences_cut"] == 1 and s["bounds"]["max_rows"] == 50
    entry = s["degraded"]["sequences"]["SEQ_LONG"]
    assert entry["answer"] == "members" and any(
        "400 rows, more than ENSEMBLE_SERVE_MAX_ROWS=50" in p for p in entry["problems"]
    )
    pred.predict(make_sequence("SEQ_SHORT", 50), None)  # at the limit: not cut, not degraded
    assert member.rows[-1] == 50 and pred.summary()["bounds"]["sequences_cut"] == 1
    assert "SEQ_SHORT" not in pred.degraded_sequences()


def test_the_default_limit_bounds_what_reaches_the_features_and_strict_refuses(tmp_path, monkeypatch):
    member = LengthMember()
    pred = _predictor(tmp_path, {}, member)
    limit = pred.cfg.ensemble.serve_max_rows
    assert 5_000 <= limit <= 100_000  # far above real lengths (a few hundred rows), far below what costs minutes
    huge = make_sequence("SEQ_HUGE", 200, seed=4)
    huge = pl.concat([huge] * (limit // 200 + 10)).with_columns(pl.int_range(pl.len()).alias("sequence_counter"))
    assert pred.predict(huge, None) in GESTURES
    assert member.rows == [limit] and pred.summary()["bounds"]["sequences_cut"] == 1
    strict = _predictor(tmp_path, {"STRICT": "1", "ENSEMBLE_SERVE_MAX_ROWS": "50"})
    with pytest.raises(ensemble.PredictorError, match="400 rows, more than ENSEMBLE_SERVE_MAX_ROWS=50"):
        strict.predict(make_sequence("SEQ_LONG", 400), None)
    assert strict.predict(make_sequence("SEQ_OK", 50), None) in GESTURES


def test_cut_to_tail_without_or_with_unreadable_counters():
    seq = make_sequence("S", 30)
    out, problems = serving_guard.cut_to_tail(seq.drop("sequence_counter"), 10)
    assert out["row_id"].to_list() == seq["row_id"].to_list()[-10:] and "file order" in problems[0]
    text = seq.with_columns(pl.col("sequence_counter").cast(pl.String))
    text = text.with_columns(
        pl.when(pl.int_range(pl.len()) == 29)
        .then(pl.lit("x"))
        .otherwise(pl.col("sequence_counter"))
        .alias("sequence_counter")
    )
    out, _ = serving_guard.cut_to_tail(text, 10)  # "x" does not parse: ranked first, so cut first
    assert out["row_id"].to_list() == seq["row_id"].to_list()[19:29]
    assert serving_guard.cut_to_tail(seq, 30) == (seq, [])


# --------------------------------------------------------------------------- per-subject state


def test_per_subject_state_is_bounded_least_recently_seen_first(tmp_path, caplog):
    env = {"ENSEMBLE_SERVE_MAX_SUBJECTS": "3", "ENSEMBLE_WEAR_MAX_HISTORY": "2"}
    pred = _predictor(tmp_path, env)
    assert pred.wear.max_subjects == 3 and pred.wear.max_history == 2  # the settings reach the wear state
    # the two online steps, as training would have fitted them (built here: no files to seal)
    pred.subject_pp = subject_pp.SubjectPostProcessor(_free_protocol(8), None, pred.cfg)
    det = wear.Detector(coef=np.ones(len(wear.DETECTOR_FEATURES)), scale=np.ones(len(wear.DETECTOR_FEATURES)))
    pred.wear = wear.WearDetector(det, threshold=1e9, min_sequences=2, enabled=True).with_bounds(pred.cfg)
    order = ["A", "B", "C", "A", "D"]  # D evicts B (least recently seen), not A
    order += [f"S{i}" for i in range(10)]
    k = 0
    with caplog.at_level(logging.WARNING):
        for subj in order:
            for _ in range(2):
                pred.predict(make_sequence(f"SEQ_{k:04d}", 20 + k % 7, seed=k, subject=subj), demographics([subj]))
                k += 1
            if subj == "D":
                assert list(pred.wear.state) == ["C", "A", "D"] and list(pred.subject_pp.assigner.state) == [
                    "C",
                    "A",
                    "D",
                ]
    assert len(pred.wear.state) == 3 and len(pred.subject_pp.assigner.state) == 3
    assert list(pred.wear.state) == ["S7", "S8", "S9"]
    n_subjects = len(set(order))
    s = pred.summary()
    assert s["bounds"]["subjects_evicted"] == {"wear": n_subjects - 3, "subject_pp": n_subjects - 3}
    assert s["wear"]["subjects_evicted"] == n_subjects - 3 and s["subject_pp"]["subjects_evicted"] == n_subjects - 3
    logged = [r for r in caplog.records if "forgotten so far" in r.getMessage()]
    assert 2 <= len(logged) < 2 * (n_subjects - 3)  # logged now and then, not once per eviction


def test_wear_evidence_of_forgotten_sequence_ids_stays_in_the_sum():
    det = wear.Detector(
        coef=np.linspace(-1, 1, len(wear.DETECTOR_FEATURES)), scale=np.ones(len(wear.DETECTOR_FEATURES))
    )
    w = wear.WearDetector(det, threshold=1e9, min_sequences=1, enabled=True, max_history=2)
    from features import build_frame_table

    tables = [build_frame_table(make_sequence(f"SEQ_{i}", 30, seed=i)) for i in range(5)]
    for t in tables:
        w.observe("S", t)
    w.observe("S", tables[-1])  # a retried id counts once
    ev = w.state["S"]
    assert len(ev.per_sequence) == 2 and ev.n == 5
    expected = sum(float(det.log_odds(wear.detector_features(t, w.tail_fraction))[0]) for t in tables)
    assert ev.log_odds == pytest.approx(expected)


# --------------------------------------------------------------------------- concurrency


class _YieldingAssigner(subject_pp.SubjectAssigner):
    """The assigner, but it lets other threads run where it reads ``max_history``: right after it added the
    current sequence's row to the subject's state and before it reads the rows back (a forced thread switch
    in the middle of a per-subject update)."""

    @property
    def max_history(self) -> int:
        time.sleep(0.001)
        return self._max_history

    @max_history.setter
    def max_history(self, value: int) -> None:
        self._max_history = value


def test_concurrent_predict_calls_give_the_single_threaded_answers(tmp_path):
    """Two threads, one subject, forced thread switches: each answer is its own sequence's, no exception.

    The protocol has room for every sequence in its argmax slot, so the single-threaded answer of a
    sequence does not depend on the order; a sequence answered from another's row shows as a mismatch.
    """
    pred = _predictor(tmp_path, {})
    pred.subject_pp = subject_pp.SubjectPostProcessor(_free_protocol(4), None, pred.cfg)
    pred.subject_pp.assigner = _YieldingAssigner(_free_protocol(4), max_history=3)  # old rows forgotten, too
    demo = demographics(["SUBJ_000001"])
    work = {
        t: [make_sequence(f"SEQ_{t}{i:03d}", 20 + (i % 9) + 9 * t, seed=i) for i in range(25)] for t in (0, 1)
    }  # thread 0: 20..28 rows, thread 1: 29..37: every answer differs from the other thread's
    expected = {s["sequence_id"][0]: GESTURES[s.height % 18] for seqs in work.values() for s in seqs}
    got: dict[str, str] = {}
    errors: list[BaseException] = []

    def run(seqs):
        try:
            for s in seqs:
                got[s["sequence_id"][0]] = pred.predict(s, demo)
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=run, args=(work[t],)) for t in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:3]
    wrong = {k: (got.get(k), v) for k, v in expected.items() if got.get(k) != v}
    assert not wrong, f"{len(wrong)} answer(s) from another sequence: {list(wrong.items())[:3]}"
    assert pred.summary()["degraded"]["count"] == 0  # no call fell back to the prior on an internal error


# --------------------------------------------------------------------------- start-up: damaged parts


def _damage(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated, as an interrupted upload leaves it


def _ensemble_files(tmp_path: Path) -> Path:
    """A weights.json (with a class prior), protocol.json and wear.json, sealed as training seals them."""
    ens = tmp_path / "ensemble"
    weights = {
        "views": {v: {"weights": {"lgbm": 1.0}} for v in ("full", "imu_only")},
        "class_prior": [0.0] * 17 + [1.0],
    }
    write_json(ens / "weights.json", weights)
    write_json(ens / subject_pp.PROTOCOL_FILE, _free_protocol(4).to_dict())
    n = len(wear.DETECTOR_FEATURES)
    write_json(
        ens / wear.WEAR_FILE,
        {
            "format_version": wear.FORMAT_VERSION,
            "feature_names": list(wear.DETECTOR_FEATURES),
            "coef": [0.0] * n,
            "scale": [1.0] * n,
            "threshold": 6.9,
            "min_sequences": 2,
            "tail_fraction": 0.4,
        },
    )
    if ensemble_seal is not None:
        ensemble_seal.write_manifest(ens, {})
    return ens


STEPS = {"weights.json": "weights", subject_pp.PROTOCOL_FILE: "subject_pp", wear.WEAR_FILE: "wear"}


def test_intact_ensemble_files_are_all_used(tmp_path):
    _ensemble_files(tmp_path)
    pred = _predictor(tmp_path, {})
    assert pred.subject_pp.enabled and pred.wear.enabled and pred.prior.answer == GESTURES[17]
    assert pred.summary()["start_up"] == {"members_damaged": {}, "steps_left_out": {}, "count": 0}


@pytest.mark.parametrize("name", list(STEPS))
def test_a_damaged_ensemble_file_is_left_out_in_serving_and_an_error_in_strict(tmp_path, name, caplog):
    ens = _ensemble_files(tmp_path)
    _damage(ens / name)
    with pytest.raises(Exception, match=name.replace(".", r"\.")):
        _predictor(tmp_path, {"STRICT": "1"})
    with caplog.at_level(logging.ERROR):
        pred = _predictor(tmp_path, {})
    left = pred.summary()["start_up"]["steps_left_out"]
    assert STEPS[name] in left and name in left[STEPS[name]]
    assert name in caplog.text
    assert pred.predict(make_sequence("SEQ_000001", 25), demographics(["SUBJ_000001"])) == GESTURES[25 % 18]
    if name == "weights.json":  # the defaults, and no class prior read from the damaged file
        assert pred.weights == {"full": {"lgbm": 1.0}, "imu_only": {"lgbm": 1.0}}
        assert pred.prior.is_uniform
    else:
        assert pred.prior.answer == GESTURES[17]  # the intact weights.json still gives the prior
    assert pred.subject_pp.enabled == (name != subject_pp.PROTOCOL_FILE)
    assert pred.wear.enabled == (name != wear.WEAR_FILE)


def test_a_damaged_prior_source_gives_way_to_the_next_in_serving(tmp_path):
    w, oof = tmp_path / "ensemble" / "weights.json", tmp_path / "oof"
    write_json(w, {"class_prior": [1.0] * 5})
    oof.mkdir()
    np.save(oof / "y_true.npy", np.array([3, 3, 1]))
    problems: list[str] = []
    prior = serving_guard.load_class_prior(w, oof, problems)
    assert prior.answer == GESTURES[3] and prior.source.endswith("y_true.npy")
    assert len(problems) == 1 and "weights.json" in problems[0]
    with pytest.raises(serving_guard.PriorError, match="weights.json"):
        serving_guard.load_class_prior(w, oof)


def test_a_member_whose_bundle_raises_is_left_out_like_a_missing_one(tmp_path):
    member = LengthMember()
    pred = _predictor(tmp_path, {}, member, extra=[RaisingSource()])
    assert list(pred.members) == ["lgbm"]
    s = pred.summary()
    assert "corrupt or truncated" in s["missing"]["torch"] and "corrupt" in s["start_up"]["members_damaged"]["torch"]
    assert s["start_up"]["count"] == 1
    assert pred.predict(make_sequence("SEQ_000001", 21), None) == GESTURES[21 % 18]
    import bundle

    with pytest.raises(bundle.BundleError, match="fold0.pt is corrupt"):
        _predictor(tmp_path, {"STRICT": "1"}, member, extra=[RaisingSource()])
    with pytest.raises(ensemble.PredictorError, match="FAIL_IF_TORCH_MISSING=1.*corrupt"):
        _predictor(tmp_path, {"FAIL_IF_TORCH_MISSING": "1"}, member, extra=[RaisingSource()])


# --------------------------------------------------------------------------- a real damaged bundle


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    env = {"CMI_N_FOLDS": "2", "CMI_N_THREADS": "1", "LGBM_DEBUG_N_ESTIMATORS": "10"}
    return trained_lgbm_run(tmp_path_factory.mktemp("serving_bounds"), env, n_subjects=3, seed=5, n_test_subjects=2)


@pytest.mark.slow
def test_a_corrupt_real_bundle_is_left_out_in_serving_and_an_error_in_strict(trained, tmp_path):
    """Two copies of one real LightGBM bundle served as two members; one copy truncated."""
    import bundle
    import lgbm_pipeline

    root = tmp_path / "bundles"
    shutil.copytree(trained.bundles / "lgbm", root / "lgbm")
    shutil.copytree(trained.bundles / "lgbm", root / "torch")
    model = sorted((root / "torch").glob("fold*_full.txt"))[0]
    _damage(model)
    specs = [
        lgbm_pipeline.LGBMPipeline(),
        ensemble.MemberSpec("torch", lambda d, c: lgbm_pipeline.LGBMPipeline().load(d, c)),  # the damaged copy
    ]
    env = {"CMI_N_THREADS": "1", "USE_TORCH": "1"}
    pred = ensemble.Predictor(load_config(env, out_dir=str(tmp_path), debug=True), specs, bundle_root=root)
    assert list(pred.members) == ["lgbm"]
    damaged = pred.summary()["start_up"]["members_damaged"]
    assert list(damaged) == ["torch"] and model.name in damaged["torch"]
    assert pred.predict(trained.seq, trained.demo) in GESTURES
    assert pred.summary()["answers"] == {"members": 1}
    strict = load_config({**env, "STRICT": "1"}, out_dir=str(tmp_path), debug=True)
    with pytest.raises(bundle.BundleError, match=model.name):
        ensemble.Predictor(strict, specs, bundle_root=root)
