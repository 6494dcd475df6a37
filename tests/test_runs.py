"""Runs that cannot go stale, mix or leak (issue 23).

* skip-if-trained: the fingerprint covers the training values and the code that shapes a member's output
  (a comment or docstring does not count);
* one writer per output folder (``<out>/.lock``), stale temporaries of killed runs removed at start;
* ``folds.csv`` reused only for the same sequences, subjects and gestures (``--force`` remakes it);
* a sequence id shared by two subjects is an error naming it.
"""

from __future__ import annotations

import ast
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import cv
import data
import io_utils
import main
import member_base
from config import load_config
from metric import GESTURES
from tests.centroid_pipeline import CentroidPipeline, ConfigWithCentroid
from tests.factory import demographics, labelled_rows, training_data

ROOT = Path(__file__).resolve().parents[1]


def _raw(seed: int = 5) -> pl.DataFrame:
    return labelled_rows(n_subjects=4, classes=(0, 3, 9), reps=2, seed=seed, imu_only_every=3, min_len=20, max_len=30)


def _cfg(out: Path):
    env = {"CMI_N_THREADS": "1", "CMI_SEED": "3", "CMI_DEBUG": "1", "CMI_N_FOLDS": "2"}
    return load_config(env, config_class=ConfigWithCentroid, out_dir=str(out))


def _counting_fit(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = CentroidPipeline.fit_fold

    def counting(self, ctx, td, split, cfg, work):
        calls.append(split.fold)
        return real(self, ctx, td, split, cfg, work)

    monkeypatch.setattr(CentroidPipeline, "fit_fold", counting)
    return calls


# --------------------------------------------------------------------------- fingerprint: data and code


def test_one_changed_sensor_value_retrains_the_same_data_skips(tmp_path, monkeypatch, caplog):
    raw = _raw()
    pipeline, cfg = CentroidPipeline(), _cfg(tmp_path)
    calls = _counting_fit(monkeypatch)
    pipeline.train(training_data(raw, n_folds=2), cfg, tmp_path)
    assert calls == [0, 1]
    calls.clear()
    with caplog.at_level(logging.INFO, logger="member_base"):
        pipeline.train(training_data(raw, n_folds=2), cfg, tmp_path)  # the same values: skipped
    assert calls == [] and "skipped" in caplog.text
    # one accelerometer value of one row: same ids, labels, lengths, folds, settings
    changed = raw.with_columns(
        pl.when(pl.int_range(pl.len()) == 7).then(pl.col("acc_x") + 0.5).otherwise(pl.col("acc_x")).alias("acc_x")
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="member_base"):
        pipeline.train(training_data(changed, n_folds=2), cfg, tmp_path)
    assert calls == [0, 1], "a bundle trained on other sensor values was kept"
    assert "trained with other sensor data" in caplog.text


def _with_source(monkeypatch: pytest.MonkeyPatch, module: str, edit) -> None:
    real = member_base.module_source

    def reader(name: str) -> tuple[str, str]:
        source, path = real(name)
        return (edit(source), path) if name == module else (source, path)

    monkeypatch.setattr(member_base, "module_source", reader)


def test_code_changes_change_the_fingerprint_comments_and_docstrings_do_not(monkeypatch):
    td = training_data(_raw(), n_folds=2)
    pipeline, cfg = CentroidPipeline(), _cfg(Path("unused"))
    ctx = pipeline.prepare(td, cfg)
    base = pipeline.fingerprint(ctx, td, cfg)
    assert {"features", "member_base", "tests.centroid_pipeline"} <= set(pipeline.code_module_names())

    def prose_only(source: str) -> str:  # a comment, blank lines and a reworded docstring
        source = source.replace('"""', '"""Reworded. ', 1)
        return "# a new comment\n\n" + source.replace("\ndef ", "\n# note\n\ndef ", 3)

    original = member_base.module_source("features")[0]
    with monkeypatch.context() as mp:
        _with_source(mp, "features", prose_only)
        assert member_base.module_source("features")[0] != original  # the text did change
        assert pipeline.fingerprint(ctx, td, cfg) == base
    for module in ("features", "member_base", "tests.centroid_pipeline"):
        with monkeypatch.context() as mp:
            _with_source(mp, module, lambda s: s + "\nNEW_CONSTANT = 2\n")
            assert pipeline.fingerprint(ctx, td, cfg) != base, f"a code change in {module} kept the fingerprint"


def test_normalised_source_ignores_prose_only():
    src = 'def f(x):\n    """Doc."""\n    return x + 1  # add\n\n\nclass A:\n    """Doc."""\n'
    same = '\n\ndef f(x):\n    """Other doc."""\n    # a comment\n    return x + 1\n\nclass A:\n    """Changed."""\n'
    other = 'def f(x):\n    """Doc."""\n    return x + 2\n\n\nclass A:\n    """Doc."""\n'
    digest = member_base.normalised_source_digest
    assert digest(src) == digest(same) != digest(other)


# Project modules a member's code imports that do not shape what it learns: loading/sealing, atomic files,
# thread counts, settings (their values are in the fingerprint), job running, torchrun plumbing of the scaffold.
NOT_SHAPING = {"bundle", "io_utils", "threads", "config", "executors", "distributed"}


def _project_imports(module: str) -> set[str]:
    source, _ = member_base.module_source(module)
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return {n for n in names if (ROOT / f"{n}.py").is_file()}


@pytest.mark.parametrize("name", ["lgbm", "torch", "keras", "branchnet"])
def test_every_module_a_member_imports_is_fingerprinted_or_declared_not_shaping(name):
    import members

    try:
        pipeline = members.get(name)
    except ImportError:
        pytest.skip(f"{name} not importable here")
    listed = set(pipeline.code_module_names())
    assert members.REGISTRY[name].split(":")[0] in listed
    for module in sorted(listed):
        missing = _project_imports(module) - listed - NOT_SHAPING
        assert not missing, f"{name}: {module} imports {sorted(missing)}: list them in code_modules or NOT_SHAPING"


def test_data_digest_covers_every_table_array():
    td = training_data(_raw(), n_folds=2)
    base = member_base.data_digest(td)
    assert member_base.data_digest(training_data(_raw(), n_folds=2)) == base  # deterministic
    for table_name in ("table", "imu_table"):
        for field in ("values", "demographics"):
            arr = getattr(getattr(td, table_name), field)
            keep = arr.flat[3]
            arr.flat[3] = 0.25 if keep == 1.5 else 1.5  # demographics here are NaN: NaN + 1 would be NaN again
            try:
                assert member_base.data_digest(td) != base, f"{table_name}.{field}"
            finally:
                arr.flat[3] = keep
    assert td.table.tof_pixels is not None
    td.table.tof_pixels.flat[-10] = 3.0 if td.table.tof_pixels.flat[-10] == 7.0 else 7.0  # one ToF pixel
    assert member_base.data_digest(td) != base


# --------------------------------------------------------------------------- one writer per output folder

_HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import io_utils
    with io_utils.output_lock({out!r}, command="holder train --out here"):
        print("locked", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path / 'out'`` (killed at the end)."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(root=str(ROOT), out=str(out))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield out, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stdout.close()


def test_a_second_writer_is_refused_with_the_holder_named_and_the_work_kept(holder, tmp_path):
    out, proc = holder
    work = out / "bundles" / ".lgbm_work"
    work.mkdir(parents=True)
    (work / "state.json").write_text('{"fingerprint": "first run", "folds": {}}')
    (work / "fold0_oof_full.npy").write_bytes(b"the first run's fold")
    (out / "bundles" / ".lgbm.x1.tmp").mkdir()  # the holder's live temporary: a second process must not touch it
    with pytest.raises(io_utils.OutputLockError) as e:
        with io_utils.output_lock(out):
            pass
    msg = str(e.value)
    assert str(out) in msg and f"pid {proc.pid}" in msg and "holder train --out here" in msg and "since 20" in msg
    # through the training stage: refused before it reads, writes or removes anything
    cfg = load_config({"CMI_N_THREADS": "1"}, data_dir=str(tmp_path / "no data"), out_dir=str(out))
    with pytest.raises(io_utils.OutputLockError, match=f"pid {proc.pid}"):
        main.stage_train(cfg, ["lgbm"], main.StageTimer())
    assert (work / "state.json").read_text() == '{"fingerprint": "first run", "folds": {}}'
    assert (work / "fold0_oof_full.npy").exists() and (out / "bundles" / ".lgbm.x1.tmp").is_dir()
    assert not (out / "config.json").exists()
    # the CLI says it in one line
    with pytest.raises(SystemExit, match=f"train: output folder .* in use .*pid {proc.pid}"):
        main.main(["train", "--data-dir", str(tmp_path), "--out", str(out), "--members", "lgbm"])
    # a killed holder leaves nothing locked: the kernel drops its lock
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    with io_utils.output_lock(out) as info:
        assert info["pid"] == os.getpid()


def test_lock_records_its_holder_is_not_reentrant_and_is_emptied_on_release(tmp_path):
    with io_utils.output_lock(tmp_path, command="first") as info:
        held = (tmp_path / io_utils.LOCK_FILE).read_text()
        assert f'"pid": {os.getpid()}' in held and '"command": "first"' in held and info["command"] == "first"
        with pytest.raises(io_utils.OutputLockError, match="first"):  # a second open file description
            with io_utils.output_lock(tmp_path):
                pass
    assert (tmp_path / io_utils.LOCK_FILE).read_text() == ""
    with io_utils.output_lock(tmp_path, command="second"):  # free again
        pass


def test_stale_temporaries_are_removed_at_start_resumable_work_is_kept(tmp_path, caplog):
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not ours")
    stale = [
        out / "bundles" / ".lgbm.ab12cd.tmp",  # atomic_dir's half-built bundle
        out / "bundles" / ".torch.old",  # atomic_dir's replaced bundle
        out / "oof" / ".oof_lgbm_proba.npy.x9.tmp",  # atomic_path's temporary file
        out / "ensemble" / ".weights.json.q.tmp",
        out / "ensemble" / "oof" / ".blend_summary.json.z.tmp",
        out / "bundles" / ".lgbm_work" / ".fold1_oof_full.npy.k.tmp",  # inside the work folder: a dead write
    ]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.name.endswith(".old") or p.parent.name == "bundles":
            p.mkdir()
            (p / "fold0.txt").write_text("half")
        else:
            p.write_text("half")
    (out / "bundles" / ".evil.tmp").symlink_to(outside, target_is_directory=True)
    kept = [
        out / "bundles" / "lgbm" / "fold0.txt",
        out / "bundles" / ".lgbm_work" / "state.json",
        out / "bundles" / ".lgbm_work" / "fold0_oof_full.npy",
        out / "oof" / "oof_lgbm_proba.npy",
        out / "ensemble" / "weights.json",
        out / "data" / ".user_file.tmp",  # outside bundles/, ensemble/, oof/: not ours to judge
    ]
    for p in kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("whole")
    with caplog.at_level(logging.INFO, logger="cmi"), main.claim_output(out):
        pass
    assert [p for p in stale if p.exists()] == []
    assert not (out / "bundles" / ".evil.tmp").is_symlink()
    assert (outside / "keep.txt").read_text() == "not ours"  # a link is removed, never followed
    assert all(p.read_text() == "whole" for p in kept)
    assert "removed 7 stale temporary" in caplog.text


# --------------------------------------------------------------------------- folds.csv


def _ids(n: int = 60):
    seq = np.array([f"SEQ_{i:06d}" for i in range(n)])
    subj = np.array([f"SUBJ_{i % 6:03d}" for i in range(n)])
    gest = np.array([GESTURES[i % 4] for i in range(n)])
    return seq, subj, gest


def test_folds_of_other_subjects_or_gestures_are_refused_and_force_remakes(tmp_path, caplog):
    path = tmp_path / "folds.csv"
    seq, subj, gest = _ids()
    made = cv.load_or_make_folds(path, seq, subj, gest, 3, 0)
    assert made.columns == ["sequence_id", "subject", "gesture", "fold"]
    assert cv.folds_hash(cv.load_or_make_folds(path, seq, subj, gest, 3, 99)) == cv.folds_hash(made)  # reused
    # the probe of the issue: same sequence ids, every subject relabelled -> the old folds would split subjects
    moved = np.array([f"SUBJ_{(i // 10) % 6:03d}" for i in range(len(seq))])
    with pytest.raises(cv.FoldsError, match=r"(?s)sequence\(s\) changed subject \(e\.g\. SEQ_0000.*--force"):
        cv.load_or_make_folds(path, seq, moved, gest, 3, 0)
    regest = gest.copy()
    regest[[4, 9]] = GESTURES[10]
    with pytest.raises(cv.FoldsError, match=r"2 sequence\(s\) changed gesture \(e\.g\. SEQ_000004, SEQ_000009\)"):
        cv.load_or_make_folds(path, seq, subj, regest, 3, 0)
    assert path.read_text() == made.write_csv()  # refused, not replaced
    with caplog.at_level(logging.INFO, logger="cv"):
        remade = cv.load_or_make_folds(path, seq, moved, gest, 3, 0, remake=True)
    assert "remaking" in caplog.text
    assert remade.group_by("subject").agg(pl.col("fold").n_unique())["fold"].max() == 1  # grouped by the new subjects
    assert cv.folds_hash(cv.load_or_make_folds(path, seq, moved, gest, 3, 0)) == cv.folds_hash(remade)


def test_an_old_folds_file_without_gestures_or_with_a_split_subject_is_refused(tmp_path):
    seq, subj, gest = _ids()
    path = tmp_path / "folds.csv"
    made = cv.make_folds(seq, subj, gest, 3, 0)
    made.drop("gesture").write_csv(path)  # the layout of older versions
    with pytest.raises(cv.FoldsError, match="no gesture column.*older version.*--force"):
        cv.load_or_make_folds(path, seq, subj, gest, 3, 0)
    split = made.with_columns(
        pl.when(pl.col("sequence_id") == seq[0]).then((pl.col("fold") + 1) % 3).otherwise("fold").alias("fold")
    )
    split.write_csv(path)
    with pytest.raises(cv.FoldsError, match=f"subject\\(s\\) in more than one fold \\(e.g. {subj[0]}\\)"):
        cv.load_or_make_folds(path, seq, subj, gest, 3, 0)


def _write_data(d: Path, raw: pl.DataFrame) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    raw.write_csv(d / "train.csv")
    demographics(sorted(raw["subject"].unique().to_list())).write_csv(d / "train_demographics.csv")
    return d


def test_train_refuses_folds_of_other_subjects_and_train_force_remakes_them(tmp_path):
    raw = _raw()
    out = tmp_path / "out"
    env = {"CMI_N_THREADS": "1", "CMI_N_FOLDS": "2", "ENSEMBLE_WEAR_CORRECT_TRAINING": "0"}
    cfg = load_config(env, data_dir=str(_write_data(tmp_path / "a", raw)), out_dir=str(out))
    with main.claim_output(out):  # as `main.py run` holds the folder around the stage (no nesting)
        with pytest.raises(io_utils.OutputLockError, match="in use"):
            main.stage_train(cfg, [], main.StageTimer())
        main.stage_train(cfg, [], main.StageTimer(), output_claimed=True)  # no member: data, features and folds
    first = (out / "folds.csv").read_text()
    # every sequence of subject 0 now belongs to subject 1 and vice versa
    swap = {"SUBJ_000000": "SUBJ_000001", "SUBJ_000001": "SUBJ_000000"}
    cfg.run.data_dir = str(_write_data(tmp_path / "b", raw.with_columns(pl.col("subject").replace(swap))))
    with pytest.raises(cv.FoldsError, match="changed subject"):
        main.stage_train(cfg, [], main.StageTimer())
    assert (out / "folds.csv").read_text() == first
    main.stage_train(cfg, [], main.StageTimer(), force=True)
    folds = pl.read_csv(out / "folds.csv")
    want = dict(raw.with_columns(pl.col("subject").replace(swap)).select("sequence_id", "subject").unique().iter_rows())
    assert dict(folds.select("sequence_id", "subject").iter_rows()) == want


# --------------------------------------------------------------------------- training input


def test_a_sequence_id_of_two_subjects_is_an_error_naming_it(tmp_path):
    raw = _raw()
    seq = raw["sequence_id"][0]
    n = raw.filter(pl.col("sequence_id") == seq).height
    row = pl.int_range(pl.len())
    merged = raw.with_columns(
        pl.when((pl.col("sequence_id") == seq) & (row >= n // 2))
        .then(pl.lit("SUBJ_000003"))
        .otherwise(pl.col("subject"))
        .alias("subject")
    )
    _write_data(tmp_path, merged)
    with pytest.raises(data.DataError, match=f"sequence_id {seq} belongs to 2 subjects \\(SUBJ_000000, SUBJ_000003\\)"):
        data.load_train(tmp_path)
    _write_data(tmp_path, raw)
    assert data.load_train(tmp_path).labels.height == raw["sequence_id"].n_unique()
