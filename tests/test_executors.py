"""Training jobs and their executors: a job is data in and data out, and every executor gives the same OOF.

The slow tests train LightGBM, torch and the test-only member on the same tiny
data as tests/test_members.py with the local executor in this process, with
two joblib worker processes (``CMI_N_JOBS=2``) and as tasks of a local Ray
(``CMI_EXECUTOR=ray``; skipped where Ray is not installed), and assert the OOF
files are equal bit for bit: the seeds come from the config and the fold, not
from the process that ran the job, and every run uses one thread
(``CMI_N_THREADS=1``; thread counts may change float reductions).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import executors
import main
import members
from config import Config, load_config
from member_base import FoldResult
from tests.centroid_pipeline import CentroidPipeline, ConfigWithCentroid
from tests.factory import labelled_rows, training_data
from tests.test_members import TEST_MEMBER, TEST_MEMBER_ENTRY, TINY

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ["centroid", "lgbm", "torch"]  # Keras is compared by the same code; its TF start-up is left out here


def tiny_cfg(out: Path, **env: str):
    base = {"CMI_N_THREADS": "1", "CMI_SEED": "3", "CMI_DEBUG": "1", "CMI_N_FOLDS": "2"}
    for name in COMPARED:
        base.update(TINY[name])
    return load_config({**base, **env}, config_class=ConfigWithCentroid, out_dir=str(out))


@pytest.fixture(scope="module")
def td():
    raw = labelled_rows(n_subjects=4, classes=(0, 3, 9), reps=3, seed=5, imu_only_every=3, min_len=24, max_len=48)
    return training_data(raw, n_folds=2)


@pytest.fixture(autouse=True)
def _register_test_member(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(members.REGISTRY, TEST_MEMBER, TEST_MEMBER_ENTRY)


def _oof(out: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(out / "oof" / f"oof_{name}_proba.npy"), np.load(out / "oof" / f"oof_{name}_imu_proba.npy")


# --------------------------------------------------------------------------- quick: the job contract


def test_a_job_hands_back_every_file_it_wrote_as_data(td, tmp_path):
    cfg = tiny_cfg(tmp_path)
    pipeline = CentroidPipeline()
    out = executors.run_job(pipeline, pipeline.prepare(td, cfg), td, cfg, fold=1)
    assert set(pipeline.fold_files(1)) <= set(out.files) and all(isinstance(b, bytes) for b in out.files.values())
    n_valid = int((td.fold_ids == 1).sum())
    assert out.proba_full.shape == out.proba_imu.shape == (n_valid, 18) and out.fold == 1 and out.seconds >= 0
    assert not list(Path(tmp_path).iterdir())  # nothing written outside the job's own, removed, folder


def test_a_job_runs_from_plain_data_and_refuses_another_fingerprint(td, tmp_path):
    cfg = tiny_cfg(tmp_path)
    pipeline = CentroidPipeline()
    fp = pipeline.fingerprint(pipeline.prepare(td, cfg), td, cfg)
    job = executors._jobs(pipeline, cfg, [0], fp, n_threads=1)[0]
    assert (job.member, job.entry, job.config_class) == (
        TEST_MEMBER,
        "tests.centroid_pipeline:CentroidPipeline",
        "tests.centroid_pipeline:ConfigWithCentroid",
    )
    json.dumps(job.config)  # the config travels as plain data
    out = executors.execute_job(job, td)  # what a worker process runs, here in this one
    local = executors.run_job(pipeline, pipeline.prepare(td, cfg), td, cfg, fold=0)
    np.testing.assert_array_equal(out.proba_full, local.proba_full)
    assert out.files == local.files
    other = executors.FoldJob(**{**job.__dict__, "fingerprint": "another"})
    with pytest.raises(executors.ExecutorError, match="another fingerprint"):
        executors.execute_job(other, td)


def test_a_fit_fold_that_forgets_its_files_is_named(td, tmp_path):
    class Forgetful(CentroidPipeline):
        def fit_fold(self, ctx, data, split, cfg, work):
            r = super().fit_fold(ctx, data, split, cfg, work)
            (work / f"fold{split.fold}_centroids.npy").unlink()
            return FoldResult(r.proba_full, r.proba_imu, r.record)

    cfg = tiny_cfg(tmp_path)
    with pytest.raises(executors.ExecutorError, match="did not write.*fold0_centroids.npy"):
        executors.run_job(Forgetful(), None, td, cfg, fold=0)


def test_executor_choice_and_settings(tmp_path):
    cfg = Config()
    assert isinstance(executors.make(cfg), executors.LocalExecutor)
    cfg.run.n_jobs = 3
    assert isinstance(executors.make(cfg), executors.JoblibExecutor) and executors.make(cfg).n_jobs == 3
    with pytest.raises(executors.ExecutorError, match="under torchrun"):
        executors.make(cfg, distributed=True)
    env = {"CMI_EXECUTOR": "ray", "CMI_RAY_ADDRESS": "ray://head:10001", "CMI_JOB_CPUS": "4", "CMI_JOB_GPUS": "0.5"}
    cfg = load_config(env)
    assert (cfg.run.executor, cfg.run.ray_address, cfg.run.job_cpus, cfg.run.job_gpus) == (
        "ray",
        "ray://head:10001",
        4,
        0.5,
    )
    with pytest.raises(ValueError, match="CMI_EXECUTOR='dask'"):
        load_config({"CMI_EXECUTOR": "dask"})


def test_cli_executor_flags_reach_the_config(tmp_path):
    args = main.build_parser().parse_args(["train", "--out", str(tmp_path), "--executor", "ray", "--n-jobs", "2"])
    cfg = main.make_config(args)
    assert (cfg.run.executor, cfg.run.n_jobs) == ("ray", 2)
    args = main.build_parser().parse_args(["run", "--out", str(tmp_path), "--executor", "local"])
    assert main.make_config(args).run.executor == "local"
    with pytest.raises(SystemExit):
        main.build_parser().parse_args(["train", "--executor", "dask"])


def test_ray_missing_is_an_error_saying_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    cfg = Config()
    cfg.run.executor = "ray"
    with pytest.raises(executors.ExecutorError, match=r"pip install -r requirements-ray\.txt"):
        executors.check(cfg)
    with pytest.raises(executors.ExecutorError, match="requirements-ray"):
        executors.make(cfg)


def test_no_module_imports_ray_or_starts_a_cluster_on_import():
    code = "import sys, main, member_base, executors, distributed, torch_pipeline; print('ray' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"


# --------------------------------------------------------------------------- slow: the same OOF everywhere


@pytest.fixture(scope="module")
def local_run(td, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(members.REGISTRY, TEST_MEMBER, TEST_MEMBER_ENTRY)
        cfg = tiny_cfg(out)
        for name in COMPARED:
            members.get(name).train(td, cfg, out)
    return out


@pytest.mark.slow
def test_joblib_processes_give_the_local_oof(td, local_run, tmp_path):
    cfg = tiny_cfg(tmp_path, CMI_N_JOBS="2")
    for name in COMPARED:
        members.get(name).train(td, cfg, tmp_path)
        for a, b in zip(_oof(local_run, name), _oof(tmp_path, name)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_ray_tasks_give_the_local_oof_and_resume_a_local_run(td, local_run, tmp_path, monkeypatch):
    """A local Ray (as on a cluster: code by entry, config as data, data in the object store, files back as bytes).

    Also across executors: a local run killed in fold 1 is finished by Ray, and the OOF is the uninterrupted one.
    """
    ray = pytest.importorskip("ray")
    try:
        _ray_runs(td, local_run, tmp_path, monkeypatch)
    finally:
        ray.shutdown()  # the local Ray this test started


def _ray_runs(td, local_run, tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path / "ray", CMI_EXECUTOR="ray")
    for name in COMPARED:
        summary = members.get(name).train(td, cfg, tmp_path / "ray")
        assert summary["train_seconds"] > 0
        for a, b in zip(_oof(local_run, name), _oof(tmp_path / "ray", name)):
            np.testing.assert_array_equal(a, b)
    bundle_meta = json.loads((tmp_path / "ray" / "bundles" / "torch" / "metadata.json").read_text())
    assert bundle_meta["folds"] == [0, 1]
    p = members.get("torch").load(tmp_path / "ray" / "bundles" / "torch", cfg).predict_proba(td.table)
    q = members.get("torch").load(local_run / "bundles" / "torch", cfg).predict_proba(td.table)
    np.testing.assert_array_equal(p, q)  # the bundle's files came back from the workers whole

    out = tmp_path / "resumed"
    pipeline = members.get("lgbm")
    real = type(pipeline).fit_fold

    def crash_in_fold_1(self, ctx, data, split, cfg_, work):
        if split.fold == 1:
            raise KeyboardInterrupt("simulated kill in fold 1")
        return real(self, ctx, data, split, cfg_, work)

    monkeypatch.setattr(type(pipeline), "fit_fold", crash_in_fold_1)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(td, tiny_cfg(out), out)
    monkeypatch.setattr(type(pipeline), "fit_fold", real)
    pipeline.train(td, tiny_cfg(out, CMI_EXECUTOR="ray"), out)  # fold 0 from the work folder, fold 1 on Ray
    for a, b in zip(_oof(local_run, "lgbm"), _oof(out, "lgbm")):
        np.testing.assert_array_equal(a, b)
