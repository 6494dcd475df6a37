"""The bundle seal and the sealed ensemble set (issue 23): every file a loader opens is listed with its digest,
lies inside its folder and is checked before a parser sees it; the ensemble files are one set, bound to the
bundles they were fitted with; Keras is pinned and checked before loading.

The tests on a real run share one debug-size lgbm run through ``main.stage_train`` (module fixture) and edit a
copy of its ``bundles/`` and ``ensemble/`` each. Loads that could crash the interpreter run in a subprocess.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import bundle
import features
from bundle import BundleError
from metric import GESTURES
from tests.factory import trained_lgbm_run

pytest.importorskip("lightgbm")

ROOT = Path(__file__).resolve().parents[1]
slow = pytest.mark.slow  # the tests on the shared trained run


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real lgbm run (2 folds, debug size): bundles/lgbm and a full ensemble/ (weights, protocol, orientation
    model, wear detector, manifest)."""
    env = {"CMI_N_FOLDS": "2", "CMI_N_THREADS": "1", "STRICT": "1", "ENSEMBLE_SUBJECT_PP_ORDERS": "2"}
    return trained_lgbm_run(tmp_path_factory.mktemp("seal"), env, n_subjects=4, seed=3)


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the run's bundles/ and ensemble/ that a test may damage."""
    shutil.copytree(trained.root / "out" / "bundles", tmp_path / "bundles")
    shutil.copytree(trained.root / "out" / "ensemble", tmp_path / "ensemble")
    return tmp_path


def _edit_json(path: Path, fn) -> None:
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def _load_lgbm(trained, bundle_dir: Path):
    import lgbm_pipeline

    return lgbm_pipeline.load_member(bundle_dir, trained.cfg)


def _predictor(trained, root: Path):
    import ensemble
    import lgbm_pipeline

    return ensemble.Predictor(trained.cfg, [lgbm_pipeline.LGBMPipeline()], bundle_root=root / "bundles")


def _reseal_ensemble(root: Path) -> None:
    """Seal the ensemble files as they are now, with the run's bundles (so that the content is what is tested)."""
    import ensemble_seal

    ensemble_seal.write_manifest(root / "ensemble", {"lgbm": root / "bundles" / "lgbm"})


def _run_script(script: str) -> subprocess.CompletedProcess:
    # In a subprocess: a parser crash takes the interpreter down, which would end the whole test session.
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, errors="replace", timeout=120, cwd=ROOT
    )


# --------------------------------------------------------------------------- the bundle seal


@slow
def test_the_intact_run_loads_through_the_seal(trained, run_copy):
    assert _load_lgbm(trained, run_copy / "bundles" / "lgbm").n_folds == 2
    pred = _predictor(trained, run_copy)
    assert pred.subject_pp.orientation is not None  # protocol.json and orientation_model.txt were read
    assert pred.predict(trained.seq, trained.demo) in GESTURES


@slow
@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_a_model_path_outside_the_bundle_is_refused(trained, run_copy, how):
    d = run_copy / "bundles" / "lgbm"
    outside = run_copy / "outside"
    outside.mkdir()
    shutil.copy2(d / "fold0_full.txt", outside / "model.txt")  # a valid model: only its place is wrong
    name = str(outside / "model.txt") if how == "absolute" else "../../outside/model.txt"

    def point_outside(meta):
        next(e for e in meta["models"] if e["file"] == "fold0_full.txt")["file"] = name
        meta["files"][name] = bundle.file_digest(outside / "model.txt")  # sealed with its true digest
        del meta["files"]["fold0_full.txt"]

    _edit_json(d / "metadata.json", point_outside)
    (d / "fold0_full.txt").unlink()
    with pytest.raises(BundleError, match="not a plain file name inside the bundle") as info:
        _load_lgbm(trained, d)
    assert name in str(info.value)


@slow
def test_a_symlink_out_of_the_bundle_is_refused(trained, run_copy):
    d = run_copy / "bundles" / "lgbm"
    outside = run_copy / "outside"
    outside.mkdir()
    shutil.copy2(d / "fold0_full.txt", outside / "model.txt")  # same bytes: the sealed digest matches
    (d / "fold0_full.txt").unlink()
    (d / "fold0_full.txt").symlink_to(outside / "model.txt")
    with pytest.raises(BundleError, match="symbolic link") as info:
        _load_lgbm(trained, d)
    assert str(d / "fold0_full.txt") in str(info.value)


@slow
@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_bundle_without_digests_is_refused(trained, run_copy, how):
    d = run_copy / "bundles" / "lgbm"
    _edit_json(d / "metadata.json", lambda m: m.pop("files") if how == "deleted" else m.update(files={}))
    with pytest.raises(BundleError, match="field files is missing or empty.*not sealed"):
        _load_lgbm(trained, d)
    with pytest.raises(BundleError, match="not sealed"):
        _predictor(trained, run_copy)  # STRICT=1: the start-up error is the bundle's


# Loads in a child process, so that a parser crash (SIGABRT/SIGSEGV) shows as a signal, not a dead test run.
_LOAD_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    import bundle, config, lgbm_pipeline, subject_pp
    cfg = config.load_config({{"CMI_N_THREADS": "1"}}, debug=True)
    try:
        {call}
        print("LOADED")
    except bundle.BundleError as e:
        print("BUNDLE_ERROR", e)
""")


def _load_in_child(call: str) -> subprocess.CompletedProcess:
    return _run_script(_LOAD_SCRIPT.format(root=str(ROOT), call=call))


@slow
def test_a_truncated_model_in_an_unsealed_bundle_is_an_error_not_a_crash(trained, run_copy):
    d = run_copy / "bundles" / "lgbm"
    _edit_json(d / "metadata.json", lambda m: m.pop("files"))  # the old way around every check
    model = d / "fold1_full.txt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    proc = _load_in_child(f"lgbm_pipeline.load_member(Path({str(d)!r}), cfg)")
    assert proc.returncode == 0, f"loader process died with {proc.returncode}: {proc.stderr[-400:]}"
    assert "BUNDLE_ERROR" in proc.stdout and "not sealed" in proc.stdout, proc.stdout


def _classes_as_object(meta):
    meta["classes"] = {g: i for i, g in enumerate(GESTURES)}  # equal as a list of keys


@slow
@pytest.mark.parametrize(
    "edit,field",
    [
        (_classes_as_object, "field classes"),
        (lambda m: m["models"][0].pop("fold"), "field models[0].fold"),
        (lambda m: m["models"][1].update(present_classes="0,1,2"), "field models[1].present_classes"),
        (lambda m: m.pop("models"), "field models is missing"),
        (lambda m: m.update(params=[1, 2]), "field params"),
        (lambda m: m.pop("feature_names_imu"), "field feature_names_imu is missing"),
        (lambda m: m.update(files=sorted(m["files"])), "field files"),
        (lambda m: m["files"]["fold0_imu.txt"].update(sha256=None), "field files.fold0_imu.txt.sha256"),
    ],
    ids=["classes", "fold", "present_classes", "models", "params", "imu_names", "files_list", "digest"],
)
def test_malformed_metadata_is_a_bundle_error_naming_the_field(trained, run_copy, edit, field):
    d = run_copy / "bundles" / "lgbm"
    _edit_json(d / "metadata.json", edit)
    with pytest.raises(BundleError) as info:
        _load_lgbm(trained, d)
    assert field in str(info.value) and str(d / "metadata.json") in str(info.value), str(info.value)


# ---- torch members: the same rules on hand-made bundles (nothing is trained)


def _torch_bundle(d: Path, member: str, extra: dict) -> Path:
    d.mkdir(parents=True)
    (d / "fold0.pt").write_bytes(b"not a checkpoint")
    n = len(features.FRAME_FEATURES)
    meta = bundle.bundle_metadata(
        member,
        features.FRAME_FEATURES,
        "hash",
        {
            "folds": [0],
            "fold_files": {"0": "fold0.pt"},
            "pad_side": "left",
            "pad_len": {"0": 16},
            "scalers": {"0": {"mean": [0.0] * n, "std": [1.0] * n}},
            "model_args": {"n_channels": n},
            **extra,
        },
    )
    bundle.write_metadata(d, meta)
    return d


def _torch_loader(member: str):
    pytest.importorskip("torch")
    if member == "torch":
        import torch_pipeline

        return torch_pipeline.load_member
    import branchnet_pipeline

    return branchnet_pipeline.load_member


@pytest.mark.parametrize("member", ["torch", "branchnet"])
@pytest.mark.parametrize(
    "extra,field",
    [
        ({"fold_files": {}}, "field fold_files.0 is missing"),
        ({"pad_len": {"0": "16"}}, "field pad_len.0"),
        ({"folds": ["0"]}, "field folds[0]"),
        ({"folds": "01"}, "field folds"),
        ({"model_args": [3]}, "field model_args"),
    ],
    ids=["fold_files", "pad_len", "fold_as_text", "folds_as_text", "model_args"],
)
def test_torch_members_name_the_malformed_field(tmp_path, member, extra, field):
    from config import Config

    d = _torch_bundle(tmp_path / member, member, extra)
    with pytest.raises(BundleError) as info:
        _torch_loader(member)(d, Config())
    assert field in str(info.value), str(info.value)


@pytest.mark.parametrize("member", ["torch", "branchnet"])
def test_torch_members_open_only_sealed_files(tmp_path, member):
    from config import Config

    d = _torch_bundle(tmp_path / member, member, {"fold_files": {"0": "extra.pt"}})
    (d / "extra.pt").write_bytes(b"written after the seal")  # inside the bundle, but not sealed
    with pytest.raises(BundleError, match="not sealed") as info:
        _torch_loader(member)(d, Config())
    assert str(d / "extra.pt") in str(info.value)


# --------------------------------------------------------------------------- the ensemble set


@slow
def test_the_manifest_seals_every_ensemble_file_and_names_the_bundles(trained):
    import ensemble_seal
    import subject_pp
    import wear

    assert set(ensemble_seal.FILES) == {
        "weights.json",
        subject_pp.PROTOCOL_FILE,
        subject_pp.ORIENTATION_MODEL_FILE,
        wear.WEAR_FILE,
    }
    ens = trained.root / "out" / "ensemble"
    manifest = ensemble_seal.read_manifest(ens)
    assert sorted(manifest["files"]) == sorted(ensemble_seal.FILES)
    for name, digest in manifest["files"].items():
        assert bundle.file_digest(ens / name) == digest
    ident = manifest["bundles"]["lgbm"]
    assert ident == ensemble_seal.bundle_identity(trained.bundles / "lgbm") and ident["fingerprint"]


@slow
def test_an_ensemble_without_manifest_is_refused_saying_how_to_reseal(trained, run_copy):
    (run_copy / "ensemble" / "manifest.json").unlink()
    with pytest.raises(BundleError, match="not sealed") as info:
        _predictor(trained, run_copy)
    assert str(run_copy / "ensemble" / "manifest.json") in str(info.value)
    assert "main.py train" in str(info.value)


@slow
@pytest.mark.parametrize("name", ["weights.json", "protocol.json", "orientation_model.txt", "wear.json"])
@pytest.mark.parametrize("how", ["truncated", "same size"])
def test_a_damaged_ensemble_file_is_named(trained, run_copy, name, how):
    path = run_copy / "ensemble" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else data[:-2] + b"  ")
    with pytest.raises(BundleError, match="is damaged") as info:
        _predictor(trained, run_copy)
    assert str(path) in str(info.value)


@slow
def test_an_ensemble_file_the_manifest_does_not_list_is_unsealed(trained, run_copy):
    _edit_json(run_copy / "ensemble" / "manifest.json", lambda m: m["files"].pop("wear.json"))
    with pytest.raises(BundleError, match="wear.json is not sealed"):
        _predictor(trained, run_copy)


@slow
def test_a_missing_ensemble_file_still_means_not_fitted(trained, run_copy):
    (run_copy / "ensemble" / "wear.json").unlink()  # listed in the manifest, absent: no detector, no error
    pred = _predictor(trained, run_copy)
    assert pred.predict(trained.seq, trained.demo) in GESTURES
    assert pred.summary()["wear"]["enabled"] is False


@slow
@pytest.mark.parametrize("value", [math.nan, math.inf, -0.5])
def test_a_weight_that_is_not_finite_and_non_negative_is_refused(trained, run_copy, value):
    def edit(w):
        w["views"]["imu_only"]["weights"]["lgbm"] = value

    _edit_json(run_copy / "ensemble" / "weights.json", edit)
    _reseal_ensemble(run_copy)  # sealed as it is: the value itself is what is wrong
    with pytest.raises(BundleError, match=r"finite and >= 0; found lgbm in view imu_only"):
        _predictor(trained, run_copy)


@slow
@pytest.mark.parametrize("change", ["fingerprint", "created"])
def test_an_ensemble_set_of_other_bundles_names_the_member(trained, run_copy, change):
    meta = run_copy / "bundles" / "lgbm" / "metadata.json"
    _edit_json(meta, lambda m: m.update({change: "another run"}))  # the model files stay sealed and intact
    assert _load_lgbm(trained, run_copy / "bundles" / "lgbm").n_folds == 2
    with pytest.raises(BundleError, match="belong to other bundles") as info:
        _predictor(trained, run_copy)
    why = "other data or settings" if change == "fingerprint" else "another training run"
    assert "member lgbm" in str(info.value) and why in str(info.value), str(info.value)


@slow
def test_a_truncated_orientation_model_is_refused_before_lightgbm_parses_it(trained, run_copy):
    model = run_copy / "ensemble" / "orientation_model.txt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    proc = _load_in_child(f"subject_pp.SubjectPostProcessor.load({str(run_copy / 'ensemble')!r}, cfg)")
    assert proc.returncode == 0, f"loader process died with {proc.returncode}: {proc.stderr[-400:]}"
    assert "BUNDLE_ERROR" in proc.stdout and f"{model} is damaged" in proc.stdout, proc.stdout


@slow
def test_lightgbm_never_sees_a_damaged_orientation_model(trained, run_copy, monkeypatch):
    import lightgbm

    import subject_pp

    model = run_copy / "ensemble" / "orientation_model.txt"
    data = model.read_bytes()
    model.write_bytes(data[:100] + b"#" * 20 + data[120:])  # same size: only the digest can tell
    parsed = []
    monkeypatch.setattr(lightgbm, "Booster", lambda *a, **k: parsed.append(k))
    with pytest.raises(BundleError, match="is damaged"):
        subject_pp.SubjectPostProcessor.load(run_copy / "ensemble", trained.cfg)
    assert parsed == []


# --------------------------------------------------------------------------- Keras: pinned, checked before loading


def _keras_bundle(d: Path) -> Path:
    import keras_pipeline

    d.mkdir(parents=True)
    for kind in ("full", "imu"):
        (d / f"fold0_{kind}.keras").write_bytes(b"a model archive")
    n = len(features.FRAME_FEATURES)
    meta = bundle.bundle_metadata(
        "keras",
        features.FRAME_FEATURES,
        "hash",
        {
            "folds": [0],
            "keras_format": keras_pipeline.FORMAT,
            "pad_len": 16,
            "pad_side": "left",
            "imu_features": list(features.IMU_FEATURES),
            "tofthm_features": list(features.TOFTHM_FEATURES),
            "scalers": {"0": {"mean": [0.0] * n, "std": [1.0] * n}},
        },
    )
    bundle.write_metadata(d, meta)
    return d


def _fake_keras(monkeypatch, version: str) -> list:
    """keras_pipeline's Keras and TensorFlow replaced by a stand-in of ``version`` that records every load."""
    import keras_pipeline

    loads: list = []
    fake = types.SimpleNamespace(
        __version__=version,
        saving=types.SimpleNamespace(load_model=lambda path, **kw: loads.append((Path(path).name, kw)) or object()),
    )
    monkeypatch.setattr(keras_pipeline, "_keras", lambda cfg: fake)
    monkeypatch.setattr(keras_pipeline, "_tf", lambda *a, **k: None)
    monkeypatch.setattr(keras_pipeline, "_make_infer_fn", lambda *a, **k: None)
    return loads


@pytest.mark.parametrize("version", ["3.13.2", "3.11.3", "2.15.0"])
def test_keras_older_than_the_minimum_is_refused_before_any_model_is_loaded(tmp_path, monkeypatch, version):
    import keras_pipeline
    from config import Config

    loads = _fake_keras(monkeypatch, version)
    with pytest.raises(BundleError, match=f"keras {version} is installed.*keras >= {keras_pipeline.MIN_KERAS}"):
        keras_pipeline.load_member(_keras_bundle(tmp_path / "keras"), Config())
    assert loads == []


def test_keras_models_load_in_safe_mode_through_the_seal(tmp_path, monkeypatch):
    import keras_pipeline
    from config import Config

    loads = _fake_keras(monkeypatch, keras_pipeline.PINNED_KERAS)
    d = _keras_bundle(tmp_path / "keras")
    member = keras_pipeline.load_member(d, Config())
    assert member.n_folds == 1
    assert loads == [(f"fold0_{k}.keras", {"compile": False, "safe_mode": True}) for k in ("full", "imu")]
    (d / "fold0_imu.keras").write_bytes(b"a model archivE")  # same size, other bytes
    with pytest.raises(BundleError, match="fold0_imu.keras is corrupt"):
        keras_pipeline.load_member(d, Config())


def test_keras_is_pinned_at_or_above_the_minimum():
    import importlib.metadata

    from packaging.version import Version

    import keras_pipeline

    pins = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines() if ln.startswith("keras")]
    assert pins == [f"keras=={keras_pipeline.PINNED_KERAS}"]
    assert Version(keras_pipeline.PINNED_KERAS) >= Version(keras_pipeline.MIN_KERAS) >= Version("3.14.0")
    try:
        installed = importlib.metadata.version("keras")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("keras not installed")
    assert Version(installed) >= Version(keras_pipeline.MIN_KERAS)
