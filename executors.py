"""Training as independent jobs, and the executors that run them.

A job is one (member, fold, seed): train that fold of that member and hand
back what it made, as data — every file it wrote (bytes), its OOF rows for both
views and its record — so that it can run in another process or on another
machine without a shared filesystem. The member scaffold
(``member_base.MemberPipeline.train``) is the driver: it decides which folds
still need training (resume, skip-if-trained), hands them to an executor, and
writes each finished job into the work folder atomically (files, then OOF, then
``state.json``) the moment it arrives. The ensemble stages read only what the
driver wrote (``oof/`` and the bundles).

Executors (``CMI_EXECUTOR`` / ``--executor``):

* ``local`` (default): in this process, one fold after the other — with
  ``CMI_N_JOBS=k > 1``, k folds at once in joblib worker processes (the
  training data memory-mapped, not copied);
* ``ray``: every job a Ray task asking for ``CMI_JOB_CPUS`` CPUs and
  ``CMI_JOB_GPUS`` GPUs; the training data is put once into Ray's object
  store. ``CMI_RAY_ADDRESS`` joins a running cluster (the project's modules
  travel as the job's working directory), empty starts a local Ray. Ray is
  optional (``requirements-ray.txt``) and imported only here, only then.

A job run elsewhere finds its pipeline by the registry's ``"module:Class"``
entry (no registry lookup needed on the worker, so a member registered at run
time travels too), rebuilds the config from its dict, calls ``prepare`` and
``fit_fold``, and checks that its fingerprint of data, folds and settings is
the driver's: a worker with other code or settings fails loudly. Seeds come
from the config and the fold, so the same seed gives the same OOF whichever
executor ran the job (at the same thread count).

Imports only config, threads and the standard library at module level
(numpy is only handled as values); the scaffold imports this module.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import threads
from config import Config, config_from_dict

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
EXECUTORS = ("local", "ray")
RAY_REQUIREMENTS = "requirements-ray.txt"
# What a Ray cluster without our filesystem needs of the project: its modules, not its outputs or environments.
RAY_WORKING_DIR_EXCLUDES = [".git", ".venv", "outputs", "data", "*.npy", "*.parquet", "*.csv", "*.ipynb", ".gl", ".whl"]


class ExecutorError(RuntimeError):
    """An executor that cannot run here (Ray missing, a setting that does not fit), or a job that came back wrong."""


@dataclass(frozen=True)
class FoldJob:
    """One (member, fold, seed), in plain data: what a worker needs besides the training data."""

    member: str  # registry name
    entry: str  # "module:Class" of the pipeline (members.REGISTRY's entry for ``member``)
    fold: int
    seed: int
    config: dict[str, Any]  # Config.to_dict()
    config_class: str  # "module:Class" of the config (a project with more members has a bigger Config)
    fingerprint: str  # the driver's; the worker's must match
    n_threads: int  # intra-op threads in the worker

    @property
    def key(self) -> str:
        return f"{self.member}/fold{self.fold}/seed{self.seed}"


@dataclass
class JobOutput:
    """What a job hands back: every file it wrote, its OOF rows for both views, its record."""

    member: str
    fold: int
    files: dict[str, bytes]  # relative path -> content
    proba_full: Any  # np.ndarray (n_valid, 18)
    proba_imu: Any
    record: dict[str, Any]
    seconds: float
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


def entry_of(obj_or_cls: Any) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve(entry: str) -> Any:
    """The class named by ``"module:Class"`` (the registry's convention)."""
    module, _, name = entry.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------- a job


def run_job(pipeline: Any, ctx: Any, data: Any, cfg: Config, fold: int) -> JobOutput:
    """Train ``fold`` into a private temporary folder; return everything it wrote as data."""
    work = Path(tempfile.mkdtemp(prefix=f"cmi_{pipeline.name}_fold{fold}_"))
    try:
        t0 = time.perf_counter()
        result = pipeline.fit_fold(ctx, data, data.split(fold), cfg, work)
        seconds = time.perf_counter() - t0
        files = {p.relative_to(work).as_posix(): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}
        missing = [f for f in pipeline.fold_files(fold) if f not in files]
        if missing:
            raise ExecutorError(f"{pipeline.name} fold {fold}: fit_fold did not write {missing} (fold_files)")
        return JobOutput(pipeline.name, fold, files, result.proba_full, result.proba_imu, result.record, seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def execute_job(job: FoldJob, data: Any) -> JobOutput:
    """A job in a worker process: pipeline by entry, config from its dict, then ``prepare`` + ``fit_fold``."""
    if not logging.getLogger().handlers:  # a fresh worker: its log lines reach the driver's stderr
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    log.info("job %s starts on %s:%d", job.key, socket.gethostname(), os.getpid())
    pipeline = resolve(job.entry)()
    if pipeline.name != job.member:
        raise ExecutorError(f"{job.entry} says its name is {pipeline.name!r}, the job is for {job.member!r}")
    cfg = config_from_dict(job.config, config_class=resolve(job.config_class))
    cfg.run.n_threads = job.n_threads
    cfg = threads.configure_threads(cfg, "train")
    ctx = pipeline.prepare(data, cfg)
    fp = pipeline.fingerprint(ctx, data, cfg)
    if fp != job.fingerprint:
        raise ExecutorError(
            f"job {job.key} on {socket.gethostname()}: this worker's code or settings give another fingerprint "
            "than the driver's (same project version and packages on every node?)"
        )
    return run_job(pipeline, ctx, data, cfg, job.fold)


# --------------------------------------------------------------------------- executors


class LocalExecutor:
    """Today's loop: one fold after the other, in this process, on the driver's pipeline and context."""

    name = "local"

    def run(self, pipeline: Any, ctx: Any, data: Any, cfg: Config, folds: list[int], fp: str) -> Iterator[JobOutput]:
        for k in folds:
            yield run_job(pipeline, ctx, data, cfg, k)


def _jobs(pipeline: Any, cfg: Config, folds: list[int], fp: str, n_threads: int) -> list[FoldJob]:
    config = cfg.to_dict()
    return [
        FoldJob(pipeline.name, entry_of(pipeline), k, cfg.run.seed, config, entry_of(cfg), fp, n_threads) for k in folds
    ]


class JoblibExecutor:
    """``n_jobs`` folds at once in joblib (loky) processes; results written as each one finishes."""

    name = "local"

    def __init__(self, n_jobs: int) -> None:
        self.n_jobs = n_jobs

    def run(self, pipeline: Any, ctx: Any, data: Any, cfg: Config, folds: list[int], fp: str) -> Iterator[JobOutput]:
        from joblib import Parallel, delayed

        per_job = max(1, (cfg.run.n_threads or threads.available_cores()) // self.n_jobs)
        jobs = _jobs(pipeline, cfg, folds, fp, per_job)
        log.info(
            "%s: %d fold job(s) on %d joblib processes, %d thread(s) each",
            pipeline.name,
            len(jobs),
            self.n_jobs,
            per_job,
        )
        # Large arrays of the training data are memory-mapped into the workers, not copied (joblib's max_nbytes).
        parallel = Parallel(n_jobs=min(self.n_jobs, len(jobs)), backend="loky", return_as="generator_unordered")
        yield from parallel(delayed(execute_job)(job, data) for job in jobs)


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ExecutorError(
            f"--executor ray (CMI_EXECUTOR=ray) needs Ray, which is not importable here ({e}): "
            f"pip install -r {RAY_REQUIREMENTS}"
        ) from None
    return ray


def ensure_ray(cfg: Config) -> Any:
    """Ray joined once per process: the cluster at ``CMI_RAY_ADDRESS``, else a local one on this machine's cores."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if cfg.run.ray_address:
        # Another machine has neither our files nor our sys.path: the project's modules go as the working dir.
        kwargs["address"] = cfg.run.ray_address
        kwargs["runtime_env"] = {"working_dir": str(ROOT), "excludes": RAY_WORKING_DIR_EXCLUDES}
    else:
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        kwargs["num_cpus"] = threads.available_cores()
        kwargs["include_dashboard"] = False
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": pythonpath}}
    t0 = time.perf_counter()
    ray.init(**kwargs)
    log.info(
        "ray: %s in %.1f s; cluster resources %s",
        f"joined {cfg.run.ray_address}" if cfg.run.ray_address else "started a local Ray",
        time.perf_counter() - t0,
        ray.cluster_resources(),
    )
    return ray


class RayExecutor:
    """Every job a Ray task with its CPU/GPU request; the training data put once into the object store."""

    name = "ray"

    def __init__(self, cfg: Config) -> None:
        self.ray = ensure_ray(cfg)

    def run(self, pipeline: Any, ctx: Any, data: Any, cfg: Config, folds: list[int], fp: str) -> Iterator[JobOutput]:
        ray = self.ray
        jobs = _jobs(pipeline, cfg, folds, fp, cfg.run.job_cpus)
        data_ref = ray.put(data)
        task = ray.remote(execute_job).options(num_cpus=cfg.run.job_cpus, num_gpus=cfg.run.job_gpus)
        pending = {task.remote(job, data_ref): job for job in jobs}
        log.info(
            "%s: %d fold job(s) as Ray tasks (%d CPU, %g GPU each)",
            pipeline.name,
            len(jobs),
            cfg.run.job_cpus,
            cfg.run.job_gpus,
        )
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    out = ray.get(ref)
                    log.info("%s: job %s done on %s in %.1f s", pipeline.name, job.key, out.worker, out.seconds)
                    yield out
        finally:
            for ref in pending:  # an error (or an interrupted driver) leaves no task training for nothing
                ray.cancel(ref)


def check(cfg: Config) -> None:
    """Fail early (before data loading) when the configured executor cannot run here."""
    if cfg.run.executor not in EXECUTORS:
        raise ExecutorError(f"unknown executor {cfg.run.executor!r}; known: {', '.join(EXECUTORS)}")
    if cfg.run.executor == "ray":
        import_ray()


def make(cfg: Config, distributed: bool = False) -> Any:
    """The executor ``cfg.run`` asks for. Under torchrun (``distributed``): in-process, in step on every rank."""
    check(cfg)
    if distributed:
        if cfg.run.executor != "local" or cfg.run.n_jobs > 1:
            raise ExecutorError(
                "under torchrun every rank trains the same fold together: use --executor local with CMI_N_JOBS=1"
            )
        return LocalExecutor()
    if cfg.run.executor == "ray":
        return RayExecutor(cfg)
    return JoblibExecutor(cfg.run.n_jobs) if cfg.run.n_jobs > 1 else LocalExecutor()


__all__ = [
    "EXECUTORS",
    "ExecutorError",
    "FoldJob",
    "JobOutput",
    "JoblibExecutor",
    "LocalExecutor",
    "RayExecutor",
    "check",
    "ensure_ray",
    "execute_job",
    "import_ray",
    "make",
    "run_job",
]
