"""The member contract, checked for every registered member (and a test-only one).

Each member trains once per module on small generated data with tiny settings;
every test then checks one promise of ``member_base.MemberPipeline``: OOF files
for both views, a bundle that round-trips, mismatch errors that name the
difference, IMU-only routing, seeded determinism with resume after a crash, and
skip-if-trained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import bundle
import cv
import ensemble
import features
import members
from config import ConfigError, load_config
from member_base import FoldResult, FoldSplit, MemberPipeline, TrainingData
from metric import GESTURES, N_CLASSES
from tests.centroid_pipeline import ConfigWithCentroid
from tests.factory import labelled_rows, training_data

TEST_MEMBER = "centroid"
TEST_MEMBER_ENTRY = "tests.centroid_pipeline:CentroidPipeline"
# Tiny settings per member: seconds of training. Every registered member needs a line here.
TINY: dict[str, dict[str, str]] = {
    "lgbm": {"LGBM_DEBUG_N_ESTIMATORS": "15", "LGBM_NUM_LEAVES": "7", "LGBM_MIN_CHILD_SAMPLES": "3"},
    "torch": {
        "TORCH_CONV1_CHANNELS": "8",
        "TORCH_CONV2_CHANNELS": "16",
        "TORCH_RNN_HIDDEN": "8",
        "TORCH_HEAD_HIDDEN": "16",
        "TORCH_DEBUG_EPOCHS": "2",
        "TORCH_BATCH_SIZE": "16",
    },
    "keras": {
        "KERAS_IMU_FILTERS": "8,8,8",
        "KERAS_TOF_FILTERS": "8,8",
        "KERAS_RNN_UNITS": "8",
        "KERAS_DEBUG_EPOCHS": "1",
        "KERAS_BATCH_SIZE": "16",
        "FEAT_PAD_LEN": "32",
    },
    "branchnet": {
        "BRANCHNET_WIDTH": "8",
        "BRANCHNET_RNN_HIDDEN": "8",
        "BRANCHNET_TOF_CHANNELS": "2",
        "BRANCHNET_DEBUG_EPOCHS": "2",
        "BRANCHNET_BATCH_SIZE": "16",
    },
    TEST_MEMBER: {},
}
# Keras costs TensorFlow's start-up and graph building: part of `make test`, not of the quick loop.
ALL = [pytest.param(n, marks=pytest.mark.slow) if n == "keras" else n for n in [*members.names(), TEST_MEMBER]]


@pytest.fixture(autouse=True)
def _register_test_member(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test-only member is one file plus this one registry line.
    monkeypatch.setitem(members.REGISTRY, TEST_MEMBER, TEST_MEMBER_ENTRY)


def tiny_cfg(name: str, out: Path):
    env = {"CMI_N_THREADS": "1", "CMI_SEED": "3", "CMI_DEBUG": "1", "CMI_N_FOLDS": "2", **TINY[name]}
    return load_config(env, config_class=ConfigWithCentroid, out_dir=str(out))


@pytest.fixture(scope="module")
def data():
    raw = labelled_rows(n_subjects=4, classes=(0, 3, 9), reps=3, seed=5, imu_only_every=3, min_len=24, max_len=48)
    return {"raw": raw, "td": training_data(raw, n_folds=2)}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """Each member trained once; a member whose framework is missing here is skipped."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            with pytest.MonkeyPatch.context() as mp:
                mp.setitem(members.REGISTRY, TEST_MEMBER, TEST_MEMBER_ENTRY)
                try:
                    pipeline = members.get(name)
                except ImportError as e:
                    pytest.skip(f"{name} not importable: {e}")
                ok, why = pipeline.is_available()
                if not ok:
                    pytest.skip(f"{name} unavailable: {why}")
                out = tmp_path_factory.mktemp(f"member_{name}")
                cfg = tiny_cfg(name, out)
                summary = pipeline.train(data["td"], cfg, out)
                cache[name] = {
                    "pipeline": pipeline,
                    "cfg": cfg,
                    "out": out,
                    "summary": summary,
                    "bundle": out / "bundles" / name,
                    "member": pipeline.load(out / "bundles" / name, cfg),
                }
        return cache[name]

    return get


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_metadata(b: Path, edit) -> None:
    meta = json.loads((b / "metadata.json").read_text())
    edit(meta)
    (b / "metadata.json").write_text(json.dumps(meta))


# --------------------------------------------------------------------------- the registry


def test_registry_lists_the_members_in_blend_order_and_each_has_a_config_section():
    assert members.names()[:3] == ["lgbm", "torch", "keras"]
    cfg = ConfigWithCentroid()
    for name in members.names():
        assert cfg.member(name).use is True and name in TINY
        assert members.get(name).name == name
    with pytest.raises(members.UnknownMemberError, match="nope.*known: lgbm"):
        members.get("nope")
    with pytest.raises(ConfigError, match="no config section"):
        cfg.member("nope")


def test_a_new_member_gets_its_switches_and_weight_from_its_section():
    cfg = load_config(
        {"USE_CENTROID": "0", "CENTROID_TRAIN": "0", "ENSEMBLE_W_CENTROID": "0.3", "CENTROID_TEMPERATURE": "2.5"},
        config_class=ConfigWithCentroid,
    )
    assert (cfg.centroid.use, cfg.centroid.train, cfg.centroid.weight, cfg.centroid.temperature) == (
        False,
        False,
        0.3,
        2.5,
    )
    with pytest.raises(ConfigError, match="CENTROID_TEMPERATUR"):
        load_config({"CENTROID_TEMPERATUR": "1"}, config_class=ConfigWithCentroid)


# --------------------------------------------------------------------------- the contract, per member


@pytest.mark.parametrize("name", ALL)
def test_oof_files_and_summary(name, trained, data):
    t = trained(name)
    td = data["td"]
    oof = cv.read_member_oof(t["out"] / "oof", name)
    n = td.n_sequences
    assert oof.proba_full.shape == oof.proba_imu.shape == (n, N_CLASSES)
    np.testing.assert_allclose(oof.proba_full.sum(1), 1.0, atol=1e-4)
    np.testing.assert_allclose(oof.proba_imu.sum(1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(oof.sequence_ids, np.sort(td.table.sequence_ids))
    assert t["summary"]["folds_hash"] == td.folds_hash and set(t["summary"]["per_fold"]) == {"0", "1"}
    assert t["summary"]["train_seconds"] > 0
    assert not (t["out"] / "bundles" / f".{name}_work").exists()  # spent once bundle and OOF exist


@pytest.mark.parametrize("name", ALL)
def test_bundle_round_trip_classes_and_feature_order(name, trained, data):
    t = trained(name)
    meta = json.loads((t["bundle"] / "metadata.json").read_text())
    assert meta["member"] == name and meta["classes"] == list(GESTURES)
    assert meta["feature_names"] == t["pipeline"].feature_names(None, t["cfg"])
    assert meta["folds"] == [0, 1] and meta["fingerprint"]
    assert not list(t["bundle"].glob("*.pkl")) and (t["bundle"] / "config.json").is_file()
    saved = json.loads((t["bundle"] / "config.json").read_text())  # resolved before training: effective values
    assert saved["branchnet"]["preset"] in ("cpu", "gpu") and saved["branchnet"]["epochs"] > 0
    member = t["member"]
    assert tuple(member.classes_) == GESTURES
    p = member.predict_proba(data["td"].table)
    assert p.shape == (data["td"].n_sequences, N_CLASSES) and np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-4)
    again = t["pipeline"].load(t["bundle"], t["cfg"]).predict_proba(data["td"].table)
    np.testing.assert_allclose(again, p, atol=1e-6)
    one = member.predict_proba(data["td"].table.select([4]))  # the serving path: one sequence per call
    np.testing.assert_allclose(one[0], p[4], atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_imu_only_sequences_take_the_imu_only_view(name, trained, data):
    t, td = trained(name), data["td"]
    full_rows = np.flatnonzero(td.table.has_tof_thm)[:4]
    p_imu_view = t["member"].predict_proba(td.imu_table.select(full_rows))
    raw = data["raw"]
    stripped = features.build_frame_table(
        features.drop_tof_thm(raw.filter(raw["sequence_id"].is_in(list(td.table.sequence_ids[full_rows]))))
    )
    assert not stripped.has_tof_thm.any()
    np.testing.assert_allclose(t["member"].predict_proba(stripped), p_imu_view, atol=1e-5)
    p_full_view = t["member"].predict_proba(td.table.select(full_rows))
    assert not np.allclose(p_full_view, p_imu_view, atol=1e-6)  # thm/tof change the answer


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("what", ["feature_names", "classes"])
def test_metadata_mismatch_names_the_difference(name, what, trained, tmp_path):
    t = trained(name)
    b = _copy(t["bundle"], tmp_path / name)

    def swap(meta):
        meta[what][0], meta[what][1] = meta[what][1], meta[what][0]

    _edit_metadata(b, swap)
    with pytest.raises(bundle.BundleError, match=f"{what}.*position 0"):
        t["pipeline"].load(b, t["cfg"])


@pytest.mark.parametrize("name", ALL)
def test_missing_or_truncated_fold_file_is_a_bundle_error_naming_it(name, trained, tmp_path):
    t = trained(name)
    first = t["pipeline"].fold_files(1)[0]
    b = _copy(t["bundle"], tmp_path / "missing")
    (b / first).unlink()
    with pytest.raises(bundle.BundleError, match=f"{first}.*missing|missing.*{first}"):
        t["pipeline"].load(b, t["cfg"])
    b = _copy(t["bundle"], tmp_path / "truncated")
    data = (b / first).read_bytes()
    (b / first).write_bytes(data[: len(data) // 2])
    with pytest.raises(bundle.BundleError, match=f"{first} is corrupt or truncated"):
        t["pipeline"].load(b, t["cfg"])


@pytest.mark.parametrize("name", ALL)
def test_other_format_version_is_named(name, trained, tmp_path):
    t = trained(name)
    b = _copy(t["bundle"], tmp_path / name)
    _edit_metadata(b, lambda meta: meta.update(format_version=99))
    with pytest.raises(bundle.BundleError, match="format_version: bundle 99"):
        t["pipeline"].load(b, t["cfg"])


@pytest.mark.parametrize("name", ALL)
def test_complete_bundle_is_skipped_and_force_retrains(name, trained, data, monkeypatch, caplog):
    t = trained(name)
    pipeline: MemberPipeline = t["pipeline"]
    calls: list[int] = []
    real = type(pipeline).fit_fold

    def counting(self, ctx, td, split, cfg, work):
        calls.append(split.fold)
        return real(self, ctx, td, split, cfg, work)

    monkeypatch.setattr(type(pipeline), "fit_fold", counting)
    created = json.loads((t["bundle"] / "metadata.json").read_text())["created"]
    with caplog.at_level(logging.INFO, logger="member_base"):
        summary = pipeline.train(data["td"], t["cfg"], t["out"])
    assert calls == [] and "skipped" in caplog.text
    assert summary["overall"] == t["summary"]["overall"]
    assert json.loads((t["bundle"] / "metadata.json").read_text())["created"] == created
    # Other settings of the member's own section: no longer complete, retrained.
    other = tiny_cfg(name, t["out"])
    other.run.seed = 11
    assert (
        pipeline.fingerprint(pipeline.prepare(data["td"], other), data["td"], other)
        != json.loads((t["bundle"] / "metadata.json").read_text())["fingerprint"]
    )
    # Switches and the blend weight do not change what is trained.
    switched = tiny_cfg(name, t["out"])
    switched.member(name).weight = 0.9
    switched.member(name).use = False
    ctx = pipeline.prepare(data["td"], switched)
    assert (
        pipeline.fingerprint(ctx, data["td"], switched)
        == json.loads((t["bundle"] / "metadata.json").read_text())["fingerprint"]
    )
    # Other orientation / phase labels: retrained only by a member that trains on them.
    relabelled = dataclasses.replace(data["td"], orientation=(data["td"].orientation + 1) % 4)
    changed = pipeline.fingerprint(ctx, relabelled, switched) != pipeline.fingerprint(ctx, data["td"], switched)
    assert changed == pipeline.uses_aux_labels


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_resume_after_a_crash_gives_the_uninterrupted_oof(name, trained, data, tmp_path, monkeypatch, caplog):
    """Seeded end to end: a run killed in fold 1 and resumed writes the same OOF, bit for bit."""
    t = trained(name)
    pipeline: MemberPipeline = t["pipeline"]
    cfg = tiny_cfg(name, tmp_path)
    real = type(pipeline).fit_fold
    calls: list[int] = []

    def crash_in_fold_1(self, ctx, td, split, cfg_, work):
        if split.fold == 1:
            raise KeyboardInterrupt("simulated kill in fold 1")
        calls.append(split.fold)
        return real(self, ctx, td, split, cfg_, work)

    monkeypatch.setattr(type(pipeline), "fit_fold", crash_in_fold_1)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(data["td"], cfg, tmp_path)
    assert not (tmp_path / "bundles" / name).exists()

    def record(self, ctx, td, split, cfg_, work):
        calls.append(split.fold)
        return real(self, ctx, td, split, cfg_, work)

    monkeypatch.setattr(type(pipeline), "fit_fold", record)
    with caplog.at_level(logging.INFO, logger="member_base"):
        pipeline.train(data["td"], cfg, tmp_path)
    assert calls == [0, 1] and "fold 0 already finished" in caplog.text
    for f in (f"oof_{name}_proba.npy", f"oof_{name}_imu_proba.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "oof" / f), np.load(t["out"] / "oof" / f))
    monkeypatch.setattr(type(pipeline), "fit_fold", real)
    calls.clear()
    monkeypatch.setattr(type(pipeline), "fit_fold", record)
    pipeline.train(data["td"], cfg, tmp_path, force=True)
    assert calls == [0, 1]  # --force retrains a complete bundle


def test_state_of_another_run_is_discarded(trained, tmp_path, caplog):
    pipeline = trained("lgbm")["pipeline"]
    work = tmp_path / "work"
    work.mkdir()
    (work / "state.json").write_text(json.dumps({"fingerprint": "old", "folds": {"0": {}}}))
    with caplog.at_level(logging.WARNING, logger="member_base"):
        assert pipeline._load_state(work, "new") is None
    assert "starting over" in caplog.text
    assert pipeline._load_state(work, "old") == {"fingerprint": "old", "folds": {"0": {}}}


def test_test_member_blends_with_a_registered_one(trained, data, tmp_path):
    """The Predictor reaches a new member through the registry like any other."""
    for name in ("lgbm", TEST_MEMBER):
        shutil.copytree(trained(name)["bundle"], tmp_path / "bundles" / name)
    cfg = tiny_cfg(TEST_MEMBER, tmp_path)
    pred = ensemble.Predictor(cfg, members.importable(["lgbm", TEST_MEMBER]), bundle_root=tmp_path / "bundles")
    assert list(pred.members) == ["lgbm", TEST_MEMBER]
    assert pred.weights["full"] == pytest.approx({"lgbm": 0.2 / 0.7, TEST_MEMBER: 0.5 / 0.7})
    cfg.centroid.use = False
    pred = ensemble.Predictor(cfg, members.importable(["lgbm", TEST_MEMBER]), bundle_root=tmp_path / "bundles")
    assert list(pred.members) == ["lgbm"] and "USE_CENTROID=0" in pred.missing[TEST_MEMBER]


@pytest.mark.parametrize("name", ["lgbm", TEST_MEMBER])
def test_early_exit_switch_off_retrains(name, trained, data, monkeypatch, caplog):
    """<M>_SKIP_IF_TRAINED=0 (once the original Keras notebook's <M>_EARLY_EXIT_IF_BEST_EXISTS) retrains."""
    t = trained(name)
    pipeline = t["pipeline"]
    calls: list[int] = []
    real = type(pipeline).fit_fold
    monkeypatch.setattr(
        type(pipeline),
        "fit_fold",
        lambda self, ctx, td, split, cfg, work: calls.append(split.fold) or real(self, ctx, td, split, cfg, work),
    )
    cfg = load_config(
        {
            **{"CMI_N_THREADS": "1", "CMI_SEED": "3", "CMI_DEBUG": "1", "CMI_N_FOLDS": "2"},
            **TINY[name],
            f"{name.upper()}_SKIP_IF_TRAINED": "0",
        },
        config_class=ConfigWithCentroid,
        out_dir=str(t["out"]),
    )
    with caplog.at_level(logging.INFO, logger="member_base"):
        pipeline.train(data["td"], cfg, t["out"])
    assert calls == [0, 1] and "skip-if-trained is off" in caplog.text


# --------------------------------------------------------------------------- honest selection

# Long enough for every kind of selection to have its chance: LightGBM's inner-split early stopping stops
# well before the last round; the networks run 4-12 epochs at a learning rate at which they learn within
# them (without mixup / label smoothing / dropout where those kept them from it), so the scored fold's loss
# turns, and a best epoch chosen on it differs between the true and the changed labels; BranchNet's log-only
# validation pass runs after every epoch. The leaking variants (tests/leaky_members.py) use the same settings.
# Every registered member needs a line here and a leaking variant there.
LEAK_SETTINGS: dict[str, dict[str, str]] = {
    "lgbm": {"LGBM_DEBUG_N_ESTIMATORS": "100", "LGBM_EARLY_STOPPING_ROUNDS": "5"},
    "torch": {"TORCH_DEBUG_EPOCHS": "12", "TORCH_BATCH_SIZE": "4", "TORCH_LR": "0.01"},
    "keras": {
        "KERAS_DEBUG_EPOCHS": "4",
        "KERAS_BATCH_SIZE": "9",
        "KERAS_LR": "0.05",
        "KERAS_LABEL_SMOOTHING": "0",
        "KERAS_DROPOUT": "0",
        "FEAT_PAD_LEN": "16",
    },
    "branchnet": {
        "BRANCHNET_DEBUG_EPOCHS": "6",
        "BRANCHNET_LOG_EVERY": "1",
        "BRANCHNET_BATCH_SIZE": "4",
        "BRANCHNET_LR": "0.02",
        "BRANCHNET_MIXUP_PROB": "0",
        "BRANCHNET_LABEL_SMOOTHING": "0",
    },
    TEST_MEMBER: {},
}


def leak_cfg(name: str, out: Path):
    env = {"CMI_N_THREADS": "1", "CMI_SEED": "3", "CMI_DEBUG": "1", "CMI_N_FOLDS": "2", **TINY[name]}
    return load_config({**env, **LEAK_SETTINGS[name]}, config_class=ConfigWithCentroid, out_dir=str(out))


def _fit_fold_0(pipeline: MemberPipeline, td: TrainingData, cfg, work: Path) -> FoldResult:
    split = FoldSplit(0, np.flatnonzero(td.fold_ids != 0), np.flatnonzero(td.fold_ids == 0))
    work.mkdir(parents=True, exist_ok=True)
    return pipeline.fit_fold(pipeline.prepare(td, cfg), td, split, cfg, work)


def validation_labels_leak(
    pipeline: MemberPipeline, td: TrainingData, cfg, tmp: Path, records: list[dict] | None = None
) -> bool:
    """Train fold 0 twice, the second time with its validation rows relabelled: any change = selection.

    ``records``, when given, receives the two runs' fold records (to check that selection had its chance).
    """
    present, rng = np.unique(td.y), np.random.default_rng(0)
    y = td.y.copy()
    held = td.fold_ids == 0
    y[held] = [rng.choice(present[present != v]) for v in y[held].tolist()]  # another class, counts change too
    assert (y[held] != td.y[held]).all()
    orientation, phase = td.orientation, td.phase  # the auxiliary labels of the held fold change too
    if orientation is not None:
        orientation = orientation.copy()
        orientation[held] = (orientation[held] + 1) % 4
    if phase is not None:
        rows = np.repeat(held, np.diff(td.table.offsets))
        phase = phase.copy()
        phase[rows] = 1 - np.maximum(phase[rows], 0)
    permuted = TrainingData(td.table, td.imu_table, y, td.fold_ids, td.folds_hash, orientation, phase)
    a = _fit_fold_0(pipeline, td, cfg, tmp / "true")
    b = _fit_fold_0(pipeline, permuted, cfg, tmp / "permuted")
    if records is not None:
        records += [a.record, b.record]
    return not all(np.array_equal(p, q) for p, q in ((a.proba_full, b.proba_full), (a.proba_imu, b.proba_imu)))


def _pipeline(name: str, make=members.get) -> MemberPipeline:
    try:
        pipeline = make(name)
    except ImportError as e:
        pytest.skip(f"{name} not importable: {e}")
    ok, why = pipeline.is_available()
    if not ok:
        pytest.skip(f"{name} unavailable: {why}")
    return pipeline


def _selection_had_its_chance(name: str, record: dict, cfg) -> None:
    """The run behind the leak check was long enough for the member's selection points to run."""
    if name == "lgbm":  # the inner split's early stopping stopped each model before its last round
        stopped = [
            m["rounds"] + cfg.lgbm.early_stopping_rounds <= cfg.lgbm.debug_n_estimators for m in record["models"]
        ]
        assert cfg.lgbm.stopping == "inner" and all(stopped), record["models"]
    elif name == "torch":
        assert record["epochs"] == cfg.torch.debug_epochs >= 4
    elif name == "keras":  # both models ran every epoch, the scored fold validated after each
        assert record["full"]["epochs_run"] == record["imu"]["epochs_run"] == cfg.keras.debug_epochs >= 4
    elif name == "branchnet":  # the log-only validation pass ran after every epoch
        assert cfg.branchnet.log_every == 1 and cfg.branchnet.debug_epochs >= 4
        (epochs,) = record["epoch_log"]
        assert len(epochs) == cfg.branchnet.debug_epochs and all("val_full" in e for e in epochs)


@pytest.mark.parametrize("name", ALL)
def test_the_leak_check_catches_each_members_leaking_variant(name, data, tmp_path):
    """Positive controls (tests/leaky_members.py): a decision on the scored fold changes its OOF."""
    from tests.leaky_members import leaky

    variant = _pipeline(name, leaky)
    assert validation_labels_leak(variant, data["td"], leak_cfg(name, tmp_path), tmp_path) is True


@pytest.mark.parametrize("name", ALL)
def test_no_oof_is_chosen_with_its_own_labels(name, data, tmp_path):
    """Issue 12: epochs, rounds and schedules come from the training folds; the scored fold's labels never count."""
    cfg = leak_cfg(name, tmp_path)
    records: list[dict] = []
    assert validation_labels_leak(_pipeline(name), data["td"], cfg, tmp_path, records) is False
    _selection_had_its_chance(name, records[0], cfg)
