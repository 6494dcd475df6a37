"""The member scaffold: what every member does, written once.

A member is a ``MemberPipeline`` subclass in its own ``*_pipeline.py``. Its
public entry ``train()`` is a template method (aeon's ``fit`` / ``_fit``): it
checks the inputs, skips a member whose bundle is complete for exactly these
data, folds and settings, resumes at the first unfinished fold after a crash,
drives the fold loop, assembles the OOF matrices of both views (full sensors
and IMU-only), writes them with ``cv.write_member_oof``, and writes the bundle
atomically. The member fills small hooks:

* ``prepare(data, cfg)``: per-run work shared by the folds (e.g. aggregates);
* ``fit_fold(ctx, data, split, cfg, work)``: train one fold, write its model
  files into ``work`` and return its OOF rows for both views;
* ``fold_files(fold)``: the files ``fit_fold`` wrote that the bundle keeps;
* ``bundle_extra`` / ``summary_extra`` / ``write_extra_files``: what the
  member adds to ``metadata.json``, the OOF summary and the bundle;
* ``load(bundle_dir, cfg)``: the loaded member, an object with
  ``predict_proba(table) -> (n, 18)``.

Each fold is a job (``executors.py``): ``fit_fold`` writes into a private,
empty folder, and whatever it wrote comes back as data, so the job can run in
this process, in a worker process or on another machine (``CMI_EXECUTOR``);
``fit_fold`` must not rely on other folds' files. Under ``torchrun`` a member
with ``supports_ddp`` trains each fold on every rank together, and only rank 0
writes. Work files live in ``<out>/bundles/.<member>_work/`` with a ``state.json``
keyed on a fingerprint of everything that shapes the result: the training data's
values (both frame tables), labels and folds, the settings, and the code of the
modules that shape the member's output (``code_modules``, normalised so that a
comment or docstring does not count). The bundle's ``metadata.json`` carries the
same fingerprint, which is how a complete bundle is recognised and skipped.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import json
import logging
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import polars as pl

import bundle
import cv
import distributed
import executors
import io_utils
from config import SWITCH_FIELDS, Config
from features import FRAME_FEATURES, FrameTable, ScalerStats, build_frame_table, drop_tof_thm, fit_scaler
from metric import GESTURES, N_CLASSES
from schema import ORIENTATIONS, PHASES

log = logging.getLogger(__name__)

SCAFFOLD_FORMAT = 1  # layout of the work folder and the fingerprint
STATE_FILE = "state.json"


class LoadedMember(Protocol):
    """What the ensemble needs of a loaded member."""

    classes_: tuple[str, ...] | list[str]

    def predict_proba(self, table: FrameTable) -> np.ndarray: ...


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class TrainingData:
    """Everything a member trains on: both views of the frame table, labels and the shared folds.

    Checked once on construction, so no member has to repeat the checks.
    """

    table: FrameTable
    imu_table: FrameTable  # the same sequences with every thm/tof value removed
    y: np.ndarray  # (n,) int64 indices into metric.GESTURES
    fold_ids: np.ndarray  # (n,) int64
    folds_hash: str
    # Labels beyond the gesture, for auxiliary targets (None: the data have none). A member must not read
    # them for validation rows when scoring; they never reach serving.
    orientation: np.ndarray | None = None  # (n,) int64 indices into schema.ORIENTATIONS, -1 = unknown
    phase: np.ndarray | None = None  # (n_rows,) int8 per frame-table row: 1 Gesture, 0 Transition, -1 unknown

    def __post_init__(self) -> None:
        n = self.table.n_sequences
        y, fold_ids = np.asarray(self.y), np.asarray(self.fold_ids)
        if not (len(y) == len(fold_ids) == n == self.imu_table.n_sequences):
            raise ValueError(
                f"length mismatch: table {n}, imu_table {self.imu_table.n_sequences}, "
                f"y {len(y)}, fold_ids {len(fold_ids)}"
            )
        if not np.array_equal(np.asarray(self.table.sequence_ids), np.asarray(self.imu_table.sequence_ids)):
            raise ValueError("imu_table must hold the same sequences as table, in the same order")
        if tuple(self.table.feature_names) != tuple(self.imu_table.feature_names):
            raise ValueError("table and imu_table have different feature orders")
        if tuple(self.table.feature_names) != tuple(FRAME_FEATURES):
            raise ValueError(
                bundle.diff_list("table.feature_names", list(self.table.feature_names), list(FRAME_FEATURES))
            )
        if not np.array_equal(self.table.lengths, self.imu_table.lengths):
            raise ValueError("table and imu_table disagree on sequence lengths: they must hold the same rows")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"y must hold integer class indices into metric.GESTURES, got dtype {y.dtype}")
        if n and (y.min() < 0 or y.max() >= N_CLASSES):
            raise ValueError(f"y holds class indices outside 0..{N_CLASSES - 1}")
        if len(np.unique(fold_ids)) < 2:
            raise ValueError(f"fold_ids hold {len(np.unique(fold_ids))} fold(s); cross-validation needs at least 2")
        object.__setattr__(self, "y", y.astype(np.int64))
        object.__setattr__(self, "fold_ids", fold_ids.astype(np.int64))
        if self.orientation is not None:
            orientation = np.asarray(self.orientation)
            if orientation.shape != (n,) or not np.issubdtype(orientation.dtype, np.integer):
                raise ValueError(f"orientation must be ({n},) integers, got {orientation.shape} {orientation.dtype}")
            if n and (orientation.min() < -1 or orientation.max() >= len(ORIENTATIONS)):
                raise ValueError(f"orientation holds indices outside -1..{len(ORIENTATIONS) - 1}")
            object.__setattr__(self, "orientation", orientation.astype(np.int64))
        if self.phase is not None:
            phase = np.asarray(self.phase)
            n_rows = int(self.table.offsets[-1])
            if phase.shape != (n_rows,) or not np.issubdtype(phase.dtype, np.integer):
                raise ValueError(f"phase must be ({n_rows},) integers (one per row), got {phase.shape} {phase.dtype}")
            if n_rows and (phase.min() < -1 or phase.max() > 1):
                raise ValueError("phase holds values outside -1 (unknown), 0 (Transition), 1 (Gesture)")
            object.__setattr__(self, "phase", phase.astype(np.int8))

    @property
    def n_sequences(self) -> int:
        return self.table.n_sequences

    @property
    def folds(self) -> list[int]:
        return sorted(int(k) for k in np.unique(self.fold_ids))

    def split(self, fold: int) -> FoldSplit:
        return FoldSplit(fold, np.flatnonzero(self.fold_ids != fold), np.flatnonzero(self.fold_ids == fold))


@dataclass(frozen=True)
class FoldSplit:
    fold: int
    train: np.ndarray  # sequence positions
    valid: np.ndarray


@dataclass
class FoldResult:
    """What ``fit_fold`` returns: OOF rows of the validation fold for both views, and a JSON-able record."""

    proba_full: np.ndarray  # (n_valid, 18), routed exactly as the loaded member routes
    proba_imu: np.ndarray  # (n_valid, 18), the same sequences with thm/tof removed
    record: dict[str, Any]


# --------------------------------------------------------------------------- the scaffold


def eta_text(done: float, total: float, elapsed_s: float) -> str:
    """``"ETA 1 min 05 s"`` for the rest of ``total`` units at the rate of the ``done`` ones (``"done"`` at the end)."""
    if done >= total:
        return "done"
    if done <= 0 or elapsed_s <= 0:
        return "ETA unknown"
    left = elapsed_s / done * (total - done)
    return f"ETA {int(left // 60)} min {int(left % 60):02d} s" if left >= 60 else f"ETA {left:.0f} s"


class MemberPipeline(ABC):
    """One member: training hooks, bundle layout and loading. Subclasses fill the hooks."""

    name: ClassVar[str]
    packages: ClassVar[tuple[str, ...]] = ()  # library versions recorded in the bundle
    bundle_format: ClassVar[int] = 1  # this member's own layout inside the bundle
    # Trains one fold across the ranks of a torchrun job (DistributedDataParallel, distributed.py).
    supports_ddp: ClassVar[bool] = False
    # Trains on TrainingData.orientation / .phase (auxiliary targets): they then enter the fingerprint.
    uses_aux_labels: ClassVar[bool] = False
    # Modules whose code shapes every member's output (frame features, scalers and padding; the fold loop and
    # OOF assembly; OOF files; class order and schema): their normalised source enters the fingerprint.
    shared_code_modules: ClassVar[tuple[str, ...]] = ("features", "member_base", "cv", "metric", "schema")
    # The member's own modules: its pipeline (always counted, listed or not) and the model files it uses.
    code_modules: ClassVar[tuple[str, ...]] = ()

    # ---- hooks ---------------------------------------------------------------------------
    def is_available(self) -> tuple[bool, str]:
        """(False, reason) when the member's framework cannot be used here."""
        return True, "no extra dependencies"

    def prepare(self, data: TrainingData, cfg: Config) -> Any:
        """Per-run work shared by every fold; its result is handed to the other hooks."""
        return None

    @abstractmethod
    def fit_fold(self, ctx: Any, data: TrainingData, split: FoldSplit, cfg: Config, work: Path) -> FoldResult:
        """Train one fold, write ``fold_files(split.fold)`` into ``work``, return the fold's OOF rows."""

    @abstractmethod
    def fold_files(self, fold: int) -> list[str]:
        """Names of the files ``fit_fold`` writes into the work folder and the bundle keeps."""

    def feature_names(self, ctx: Any, cfg: Config) -> list[str]:
        """The input feature order recorded in (and checked against) the bundle."""
        return list(FRAME_FEATURES)

    def fingerprint_settings(self, ctx: Any, cfg: Config) -> dict[str, Any]:
        """Settings that shape the trained result beyond the member's own section (override to add)."""
        return {}

    def bundle_extra(self, ctx: Any, records: dict[int, dict], cfg: Config) -> dict[str, Any]:
        return {}

    def summary_extra(self, ctx: Any, records: dict[int, dict], cfg: Config) -> dict[str, Any]:
        return {}

    def write_extra_files(self, bundle_tmp: Path, ctx: Any, records: dict[int, dict], work: Path) -> None:
        """Further files of the bundle (e.g. importances), written into the bundle's temporary folder."""
        return None  # most members have none

    @abstractmethod
    def load(self, bundle_dir: Path, cfg: Config) -> LoadedMember:
        """Read and check the bundle, build every fold's model once."""

    def predict_proba_reload_per_call(self, bundle_dir: Path, table: FrameTable, cfg: Config) -> np.ndarray:
        """The original notebook's design (every fold reloaded from disk per call): for benchmarks."""
        return self.load(bundle_dir, cfg).predict_proba(table)

    # ---- the template --------------------------------------------------------------------
    def train(self, data: TrainingData, cfg: Config, out_dir: str | Path, force: bool = False) -> dict[str, Any]:
        """Train every fold (resuming, or skipping a complete bundle), write OOF and the bundle; return the summary.

        The folds still to train are jobs (``executors.py``): run in this process by default, in worker
        processes or as Ray tasks by ``cfg.run.executor``; each finished job is written into the work folder
        here, atomically, as it arrives. Under ``torchrun`` a member with ``supports_ddp`` trains every fold on
        all ranks together (only rank 0 writes); any other member is trained by rank 0 alone.
        """
        ok, why = self.is_available()
        if not ok:
            raise RuntimeError(f"the {self.name} member cannot be trained: {why}")
        if distributed.is_distributed() and not self.supports_ddp:
            log.info("%s: no DistributedDataParallel training: rank 0 trains it alone, other ranks wait", self.name)
            summary = self._train(data, cfg, Path(out_dir), force, ddp=False) if distributed.is_main() else None
            return distributed.broadcast_object(summary)
        return self._train(data, cfg, Path(out_dir), force, ddp=distributed.is_distributed())

    def _train(self, data: TrainingData, cfg: Config, out_dir: Path, force: bool, ddp: bool) -> dict[str, Any]:
        main = distributed.is_main() or not ddp  # the one process that reads and writes the output folder
        cfg = cfg.resolved()  # BranchNet's preset filled in: the fingerprint and the bundle's config.json show it
        bundle_dir = out_dir / "bundles" / self.name
        oof_dir = out_dir / "oof"
        t_start = time.perf_counter()
        ctx = self.prepare(data, cfg)
        t_fp = time.perf_counter()
        parts = self.fingerprint_parts(ctx, data, cfg)
        fp = _digest_parts(parts)
        log.debug("%s: fingerprint %s in %.2f s", self.name, fp[:16], time.perf_counter() - t_fp)
        summary = self._skip_summary(bundle_dir, oof_dir, parts, data, cfg, force) if main else None
        if ddp:
            summary = distributed.broadcast_object(summary)
        if summary is not None:
            return summary
        work = out_dir / "bundles" / f".{self.name}_work"
        state: dict[str, Any] = {}
        pending: list[int] | None = None
        if main:
            state = self._open_work(work, fp)
            pending = [k for k in data.folds if not self._finished(work, state, k)]
        if ddp:
            pending = distributed.broadcast_object(pending)
        prepare_s = time.perf_counter() - t_start
        if pending:
            t_folds = time.perf_counter()
            for done, job in enumerate(executors.make(cfg, distributed=ddp).run(self, ctx, data, cfg, pending, fp), 1):
                if main:  # under torchrun the other ranks trained the same fold with rank 0: nothing to write
                    self._write_fold(work, state, data, job)
                    elapsed = time.perf_counter() - t_folds
                    log.info(
                        "%s: %d/%d fold(s) trained in %.0f s, %s",
                        self.name,
                        done,
                        len(pending),
                        elapsed,
                        eta_text(done, len(pending), elapsed),
                    )
        if not main:
            return distributed.broadcast_object(None)  # rank 0's summary, once it has written everything
        records = {k: state["folds"][str(k)] for k in data.folds}

        n = data.n_sequences
        oof_full = np.zeros((n, N_CLASSES), dtype=np.float32)
        oof_imu = np.zeros((n, N_CLASSES), dtype=np.float32)
        for k in data.folds:
            va = data.split(k).valid
            oof_full[va] = io_utils.read_npy(work / f"fold{k}_oof_full.npy")
            oof_imu[va] = io_utils.read_npy(work / f"fold{k}_oof_imu.npy")
        train_s = prepare_s + sum(float(r.get("seconds", 0.0)) for r in records.values())
        extra = {
            **self.summary_extra(ctx, records, cfg),
            "train_seconds": train_s,
            # training sequences seen per second, all folds
            "train_sequences_per_s": n * (len(data.folds) - 1) / max(train_s, 1e-9),
        }
        summary = cv.write_member_oof(
            oof_dir,
            self.name,
            data.table.sequence_ids,
            data.y,
            data.fold_ids,
            oof_full,
            oof_imu,
            data.folds_hash,
            extra=extra,
        )
        self.write_bundle(bundle_dir, work, ctx, data.folds_hash, records, cfg, fp, summary, fingerprint_parts=parts)
        shutil.rmtree(work, ignore_errors=True)  # bundle and OOF are written: the work folder is spent
        summary = io_utils.read_json(oof_dir / f"{self.name}_summary.json")  # as a skipped run returns it
        return distributed.broadcast_object(summary) if ddp else summary

    def _skip_summary(
        self, bundle_dir: Path, oof_dir: Path, parts: dict[str, Any], data: TrainingData, cfg: Config, force: bool
    ) -> dict | None:
        """The summary of a complete bundle that skip-if-trained keeps (logged), else None."""
        if not force and not cfg.member(self.name).skip_if_trained:
            log.info("%s: skip-if-trained is off (%s_SKIP_IF_TRAINED=0): retraining", self.name, self.name.upper())
            return None
        if force:
            return None
        summary = self._complete_summary(bundle_dir, oof_dir, parts, data)
        if summary is not None:
            log.info(
                "%s: bundle %s is complete for these data, folds, settings and code: skipped (train --force retrains)",
                self.name,
                bundle_dir,
            )
        return summary

    def _open_work(self, work: Path, fp: str) -> dict[str, Any]:
        """The work folder's state for this run: resumed when it belongs to fingerprint ``fp``, else a fresh one."""
        state = self._load_state(work, fp)
        if state is None:
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            state = {"fingerprint": fp, "folds": {}}
            io_utils.write_json(work / STATE_FILE, state)
        return state

    def _finished(self, work: Path, state: dict[str, Any], k: int) -> bool:
        if str(k) in state["folds"] and self._fold_done(work, k):
            log.info("%s: fold %d already finished (%s): skipped", self.name, k, work / STATE_FILE)
            return True
        return False

    def _write_fold(self, work: Path, state: dict[str, Any], data: TrainingData, job: executors.JobOutput) -> None:
        """A finished job into the work folder: its files, then its OOF rows, then ``state.json`` (each atomic)."""
        k = job.fold
        n_valid = int((data.fold_ids == k).sum())
        views = (("full", job.proba_full), ("imu", job.proba_imu))
        for view, p in views:
            if np.shape(p) != (n_valid, N_CLASSES):
                raise ValueError(
                    f"{self.name} fold {k}: {view} OOF rows have shape {np.shape(p)}, expected ({n_valid}, {N_CLASSES})"
                )
        for name, blob in job.files.items():
            with io_utils.atomic_path(work / name) as tmp:
                tmp.write_bytes(blob)
        for view, p in views:
            io_utils.write_npy(work / f"fold{k}_oof_{view}.npy", np.asarray(p, dtype=np.float32))
        state["folds"][str(k)] = {**job.record, "seconds": job.seconds}
        io_utils.write_json(work / STATE_FILE, state)  # last: the fold counts as done once its files exist

    # ---- fingerprint, state, completeness -------------------------------------------------
    def fingerprint(self, ctx: Any, data: TrainingData, cfg: Config) -> str:
        """What must not change between a killed run and its resume, or a bundle and a skip."""
        return _digest_parts(self.fingerprint_parts(ctx, data, cfg))

    def code_module_names(self) -> tuple[str, ...]:
        """The modules whose code enters the fingerprint: the shared ones, this pipeline's, ``code_modules``."""
        names = (*self.shared_code_modules, type(self).__module__, *self.code_modules)
        return tuple(dict.fromkeys(names))

    def fingerprint_parts(self, ctx: Any, data: TrainingData, cfg: Config) -> dict[str, Any]:
        """The fingerprint's parts, each a digest (kept in metadata.json to say what changed when one differs).

        ``data``: every value of both frame tables (``data_digest``); ``labels``: sequence ids, labels, folds,
        lengths (and the auxiliary labels of a member that trains on them); ``settings``: the member's config
        section without its switches and weight, feature settings, seed, debug, feature order, and the
        member's ``fingerprint_settings``; ``code``: per module of ``code_module_names``, its normalised source.
        """
        h = hashlib.sha256()
        h.update("\n".join(map(str, data.table.sequence_ids)).encode())
        for arr in (data.y, data.fold_ids, data.table.lengths):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        if self.uses_aux_labels:
            for arr in (data.orientation, data.phase):
                h.update(b"-" if arr is None else np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        section = dataclasses.asdict(cfg.member(self.name).resolved())  # a preset as the values it stands for
        for key in SWITCH_FIELDS:  # switches, bundle location and blend weight do not change what is trained
            section.pop(key, None)
        settings = {
            "scaffold": SCAFFOLD_FORMAT,
            "member": self.name,
            "bundle_format": self.bundle_format,
            "folds_hash": data.folds_hash,
            "section": section,
            "features": dataclasses.asdict(cfg.features),
            "seed": cfg.run.seed,
            "debug": cfg.run.debug,
            "feature_names": self.feature_names(ctx, cfg),
            **self.fingerprint_settings(ctx, cfg),
        }
        return {
            "data": data_digest(data),
            "labels": h.hexdigest(),
            "settings": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest(),
            "code": code_version(self.code_module_names()),
        }

    def _load_state(self, work: Path, fingerprint: str) -> dict | None:
        """The saved state when it belongs to this exact run, else None (logged)."""
        path = work / STATE_FILE
        if not path.exists():
            return None
        try:
            state = io_utils.read_json(path)
        except ValueError as e:
            log.warning("%s: unreadable training state (%s): starting over", self.name, e)
            return None
        if state.get("fingerprint") != fingerprint:
            log.warning("%s: training state %s was made with other data/folds/config: starting over", self.name, path)
            return None
        log.info("%s: resuming from %s (finished folds: %s)", self.name, path, sorted(state.get("folds", {}), key=int))
        return state

    def _fold_done(self, work: Path, k: int) -> bool:
        names = [*self.fold_files(k), f"fold{k}_oof_full.npy", f"fold{k}_oof_imu.npy"]
        return all((work / nm).is_file() for nm in names)

    def _complete_summary(
        self, bundle_dir: Path, oof_dir: Path, parts: dict[str, Any], data: TrainingData
    ) -> dict | None:
        """The OOF summary when bundle and OOF files are complete for these fingerprint ``parts``, else None
        (logged why)."""
        if not (bundle_dir / bundle.METADATA_FILE).exists():
            return None
        try:
            meta = bundle.read_metadata(bundle_dir, self.name)  # checks every sealed file's digest
            if meta.get("fingerprint") != _digest_parts(parts):
                log.info(
                    "%s: the bundle in %s was trained with other %s: retraining",
                    self.name,
                    bundle_dir,
                    what_changed(meta.get("fingerprint_parts"), parts),
                )
                return None
            oof = cv.read_member_oof(oof_dir, self.name)
        except (bundle.BundleError, cv.FoldsError, FileNotFoundError, ValueError) as e:
            log.info("%s: bundle or OOF incomplete (%s): retraining", self.name, e)
            return None
        if not np.array_equal(oof.sequence_ids, np.asarray(data.table.sequence_ids).astype(str)):
            return None
        return oof.summary

    def write_bundle(
        self,
        bundle_dir: Path,
        work: Path,
        ctx: Any,
        folds_hash: str,
        records: dict[int, dict],
        cfg: Config,
        fp: str,
        summary: dict[str, Any],
        fingerprint_parts: dict[str, Any] | None = None,
    ) -> None:
        """Copy the fold files of ``records``' folds from ``work``, write config and metadata under a temporary
        name, then swap the bundle in (a reader never sees half of it)."""
        folds = sorted(records)
        extra = {
            "bundle_format": self.bundle_format,
            "fingerprint": fp,
            **({"fingerprint_parts": fingerprint_parts} if fingerprint_parts is not None else {}),
            "folds": folds,
            "seed": cfg.run.seed,
            "fold_records": {str(k): r for k, r in records.items()},
            "cv_summary": summary,
            **self.bundle_extra(ctx, records, cfg),
        }
        meta = bundle.bundle_metadata(
            self.name, self.feature_names(ctx, cfg), folds_hash, extra, packages=self.packages
        )
        with io_utils.atomic_dir(bundle_dir) as tmp:
            for k in folds:
                for name in self.fold_files(k):
                    shutil.copy2(work / name, tmp / name)
            self.write_extra_files(tmp, ctx, records, work)
            cfg.save(tmp / "config.json")
            bundle.write_metadata(tmp, meta)
        log.info("%s: bundle written to %s", self.name, bundle_dir)

    # ---- loading helpers -----------------------------------------------------------------
    def read_bundle(
        self, bundle_dir: Path, feature_names: list[str] | tuple[str, ...] | None = None, pad_side: str | None = None
    ) -> dict[str, Any]:
        """metadata.json checked against the code (classes, features, sealed files, fold files, pad side)."""
        bundle_dir = Path(bundle_dir)
        meta = bundle.read_metadata(bundle_dir, self.name, feature_names)
        folds = bundle.field(meta, "folds", list, bundle_dir / bundle.METADATA_FILE, default=None, items=int)
        if not folds:
            raise bundle.BundleError(f"{bundle_dir / bundle.METADATA_FILE}: no folds listed")
        missing = [f for k in folds for f in self.fold_files(int(k)) if not (bundle_dir / f).is_file()]
        if missing:
            raise bundle.BundleError(
                f"{self.name} bundle {bundle_dir}: missing fold file(s) "
                + ", ".join(str(bundle_dir / f) for f in missing)
            )
        if pad_side is not None and meta.get("pad_side", pad_side) != pad_side:
            raise bundle.BundleError(
                f"{bundle_dir / bundle.METADATA_FILE}: pad_side {meta.get('pad_side')!r}, "
                f"this code pads on the {pad_side!r}"
            )
        return meta


# --------------------------------------------------------------------------- fingerprint parts


def _digest_parts(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


_TABLE_ARRAYS = ("offsets", "values", "tof_pixels", "has_tof_thm", "rot_missing", "demographics")


def _hash_array(h: Any, label: str, arr: np.ndarray | None) -> None:
    """Feed ``arr``'s dtype, shape and bytes to ``h`` (zero-copy for a contiguous array)."""
    if arr is None:
        h.update(f"{label}:none;".encode())
        return
    a = np.ascontiguousarray(arr)
    h.update(f"{label}:{a.dtype.str}:{a.shape};".encode())
    view = memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")
    block = 1 << 26  # 64 MiB at a time: slices of the view, no copy
    for i in range(0, len(view), block):
        h.update(view[i : i + block])


def data_digest(data: TrainingData) -> str:
    """sha256 of every value the members train on: both frame tables' arrays (frame features, ToF grids,
    demographics, flags, row offsets) and subjects. Any changed sensor value that reaches the features changes it.

    Measured on the 81-subject generated set (8,262 sequences, 583k rows, 607 MB of arrays): 0.4-0.7 s on two
    shared cores, next to ~23 s to build its two tables and minutes to train.
    """
    h = hashlib.sha256()
    for name, table in (("table", data.table), ("imu_table", data.imu_table)):
        for field in _TABLE_ARRAYS:
            _hash_array(h, f"{name}.{field}", getattr(table, field))
        h.update("\n".join(map(str, table.subjects)).encode())
    return h.hexdigest()


def normalised_source_digest(source: str, filename: str = "<source>") -> str:
    """sha256 of a module's syntax tree without docstrings, positions or comments: code, not its prose."""
    tree = ast.parse(source, filename=filename)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


def module_source(name: str) -> tuple[str, str]:
    """(source text, file) of the importable module ``name``, read from its ``__file__``."""
    module = importlib.import_module(name)
    path = getattr(module, "__file__", None)
    if not path or not str(path).endswith(".py"):
        raise RuntimeError(
            f"cannot read the source of module {name} ({path or 'no __file__'}): the training fingerprint "
            "covers the code of the modules that shape a member's output"
        )
    return Path(path).read_text(encoding="utf-8"), str(path)


def code_version(modules: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Per module, the digest of its normalised source (``normalised_source_digest``)."""
    out = {}
    for name in modules:
        source, path = module_source(name)
        out[name] = normalised_source_digest(source, path)
    return out


def what_changed(old: Any, new: dict[str, Any]) -> str:
    """Which fingerprint parts differ, in words, for the log line that says why a member is retrained."""
    if not isinstance(old, dict):
        return "data, folds, settings or code (the bundle predates per-part fingerprints)"
    words = {"data": "sensor data", "labels": "sequences, labels or folds", "settings": "settings"}
    out = [words[k] for k in ("data", "labels", "settings") if old.get(k) != new.get(k)]
    old_code, new_code = old.get("code") if isinstance(old.get("code"), dict) else {}, new.get("code", {})
    changed = sorted(m for m in set(old_code) | set(new_code) if old_code.get(m) != new_code.get(m))
    if changed:
        out.append("code (" + ", ".join(changed) + ")")
    return ", ".join(out) or "fingerprint"


def fit_fold_scaler(data: TrainingData, split: FoldSplit) -> ScalerStats:
    """Scaler statistics of the training folds only (never the fold being scored)."""
    return fit_scaler(data.table, split.train)


def training_data(
    rows: Any,
    demographics: Any,
    labels: Any,
    cfg: Config,
    folds_path: Path,
    table: FrameTable | None = None,
    remake_folds: bool = False,
) -> TrainingData:
    """Both views of the frame table, labels and the shared folds (computed once, then reused from ``folds_path``).

    ``rows``/``demographics``/``labels`` are ``data.load_train``'s frames; labels are sorted by sequence_id,
    like the frame tables. ``table``: the full view of ``rows`` when the caller has built it already. A saved
    ``folds_path`` of other sequences, subjects or gestures is a ``cv.FoldsError``; ``remake_folds``
    (``train --force``) makes the folds afresh.
    """
    table = build_frame_table(rows, demographics, cfg.features) if table is None else table
    imu_table = build_frame_table(drop_tof_thm(rows), demographics, cfg.features)
    if not np.array_equal(labels["sequence_id"].to_numpy().astype(str), table.sequence_ids):
        raise RuntimeError("label and feature tables disagree on the sequence order")
    index = {g: i for i, g in enumerate(GESTURES)}  # data.load_train has checked every label is one of them
    y = np.array([index[g] for g in labels["gesture"].to_list()], dtype=np.int64)
    folds = cv.load_or_make_folds(
        folds_path,
        table.sequence_ids,
        table.subjects,
        labels["gesture"].to_numpy(),
        cfg.run.n_folds,
        cfg.run.fold_seed,
        remake=remake_folds,
    )
    return TrainingData(
        table,
        imu_table,
        y,
        cv.fold_array(folds, table.sequence_ids),
        cv.folds_hash(folds),
        orientation=orientation_indices(labels),
        phase=phase_per_row(rows, table),
    )


def orientation_indices(labels: Any) -> np.ndarray | None:
    """Per sequence, its ``orientation``'s index in ``schema.ORIENTATIONS`` (-1 unknown); None without the column."""
    if "orientation" not in labels.columns:
        return None
    index = {o: i for i, o in enumerate(ORIENTATIONS)}
    values = labels["orientation"].to_list()
    out = np.array([index.get(o, -1) for o in values], dtype=np.int64)
    unknown = int((out < 0).sum())
    if unknown:
        seen = sorted({str(o) for o, k in zip(values, out, strict=True) if k < 0})[:3]
        log.warning("%d sequence(s) with an unknown orientation (no auxiliary target), e.g. %s", unknown, seen)
    return out


def phase_per_row(rows: Any, table: FrameTable) -> np.ndarray | None:
    """Per frame-table row, 1 for ``phase`` "Gesture", 0 for "Transition", -1 unknown; None without the column.

    The frame table holds the rows sorted by (sequence_id, sequence_counter), as ``features.clean_sensors``
    sorts them; the phase column is sorted the same way.
    """
    if "phase" not in rows.columns or "sequence_counter" not in rows.columns:
        return None
    ordered = rows.select(
        pl.col("sequence_id").cast(pl.String), pl.col("sequence_counter").cast(pl.Int64, strict=False), "phase"
    ).sort(["sequence_id", "sequence_counter"], maintain_order=True)
    if ordered.height != int(table.offsets[-1]):
        raise RuntimeError(f"phase column has {ordered.height} rows, the frame table {int(table.offsets[-1])}")
    code = {p: i for i, p in enumerate(PHASES)}  # Transition 0, Gesture 1
    phase = ordered["phase"].replace_strict(code, default=-1, return_dtype=pl.Int8).to_numpy()
    unknown = int((phase < 0).sum())
    if unknown:
        log.warning("%d row(s) with an unknown phase (no auxiliary target there)", unknown)
    return phase
