"""Faults: interrupted or killed gateways, failing predict calls, killed atomic writes, killed training.

The rule under test: a reader never sees a half-written file as complete, an earlier complete output is
never half-overwritten, and one bad sequence never costs the answers for the others.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import inference_server
from metric import GESTURES
from schema import TEST_COLUMNS
from tests.factory import demographics, make_sequence

pytestmark = pytest.mark.slow  # subprocesses killed mid-training and mid-serving

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
N_SEQ = 8


def _kill_when(proc: subprocess.Popen, ready, timeout: float, what: str, why_dead=lambda: "") -> None:
    """Poll until ``ready()``, then SIGKILL ``proc`` and check that the kill is what ended it."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the process died before {what}: {why_dead()}"
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


def _temp_leftovers(folder: Path) -> list[str]:
    # io_utils.atomic_path / atomic_dir name their temporaries ".<name>.<random>.tmp"
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name)


@pytest.fixture
def test_files(tmp_path):
    rows = pl.concat([make_sequence(f"SEQ_{i:06d}", 12, seed=i, imu_only=(i % 2 == 0)) for i in range(N_SEQ)])
    rows.select(TEST_COLUMNS).write_csv(tmp_path / "test.csv")
    demographics(["SUBJ_000001"]).write_csv(tmp_path / "test_demographics.csv")
    out = tmp_path / "out"
    out.mkdir()
    return tmp_path / "test.csv", tmp_path / "test_demographics.csv", out


def _earlier_submission(out: Path) -> bytes:
    sub = out / "submission.parquet"
    pl.DataFrame(
        {"sequence_id": [f"SEQ_{i:06d}" for i in range(N_SEQ)], "gesture": ["Wave hello"] * N_SEQ}
    ).write_parquet(sub)
    return sub.read_bytes()


# --------------------------------------------------------------------------- gateway interrupted


@pytest.mark.parametrize("earlier", [False, True])
def test_keyboard_interrupt_leaves_no_new_or_half_written_submission(test_files, earlier):
    test_csv, demo_csv, out = test_files
    before = _earlier_submission(out) if earlier else None
    calls = []

    def predict(sequence, demographics):
        calls.append(sequence["sequence_id"][0])
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C mid-run: not an Exception, must not be swallowed per sequence
        return "Text on phone"

    with pytest.raises(KeyboardInterrupt):
        inference_server.run_local_gateway(predict, test_csv, demo_csv, out / "submission.parquet")
    assert len(calls) == 5
    if earlier:  # renamed aside before the run (issue 16), intact, not half-overwritten
        assert (out / "submission.parquet.stale").read_bytes() == before
    assert not (out / "submission.parquet").exists()  # no earlier run's file passes for this one's
    assert not (out / "submission_partial.parquet").exists()
    assert _temp_leftovers(out) == []


_GATEWAY_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import inference_server
    calls = []
    def predict(sequence, demographics):
        calls.append(1)
        if len(calls) == 4:
            open({marker!r}, "w").close()
            time.sleep(120)  # killed here, in the middle of the run
        return "Wave hello"
    inference_server.run_local_gateway(predict, {test!r}, {demo!r}, {out!r})
""")


@pytest.mark.parametrize("earlier", [False, True])
def test_killed_gateway_leaves_no_new_or_half_written_submission(test_files, earlier):
    test_csv, demo_csv, out = test_files
    before = _earlier_submission(out) if earlier else None
    marker = out.parent / "reached_call_4"
    script = _GATEWAY_SCRIPT.format(
        root=str(ROOT), marker=str(marker), test=str(test_csv), demo=str(demo_csv), out=str(out / "submission.parquet")
    )
    proc = subprocess.Popen([PY, "-c", script], cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _kill_when(
            proc,
            marker.exists,
            60,
            "the gateway's 4th call",
            lambda: proc.stderr.read().decode(errors="replace")[-600:],
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    if earlier:
        assert (out / "submission.parquet.stale").read_bytes() == before
    assert not (out / "submission.parquet").exists()
    assert not (out / "submission_partial.parquet").exists()
    assert _temp_leftovers(out) == []


# --------------------------------------------------------------------------- one failing sequence


@pytest.mark.parametrize("bad", [["SEQ_000003"], ["SEQ_000000", "SEQ_000005"]])
def test_failing_sequences_cost_only_themselves(test_files, bad):
    test_csv, demo_csv, out = test_files
    answer = {f"SEQ_{i:06d}": GESTURES[i] for i in range(N_SEQ)}

    def predict(sequence, demographics):
        sid = sequence["sequence_id"][0]
        if sid in bad:
            raise ValueError(f"cannot featurise {sid}")
        return answer[sid]

    with pytest.raises(inference_server.GatewayError) as info:
        inference_server.run_local_gateway(predict, test_csv, demo_csv, out / "submission.parquet", seed=3)
    msg = str(info.value)
    assert f"{len(bad)} of {N_SEQ} sequence(s)" in msg and "submission_partial.parquet" in msg
    assert any(b in msg for b in bad)  # an example failure is named
    assert not (out / "submission.parquet").exists()
    partial = dict(pl.read_parquet(out / "submission_partial.parquet").iter_rows())
    assert partial == {s: g for s, g in answer.items() if s not in bad}  # every other answer kept, unchanged
    assert _temp_leftovers(out) == []


# --------------------------------------------------------------------------- atomic writes under SIGKILL

_WRITER_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import numpy as np
    import io_utils
    a = np.arange({n}, dtype=np.float64)
    i = 0
    while True:
        a[0] = i
        io_utils.write_npy({target!r}, a)
        i += 1
        print(i, flush=True)
""")


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.4])
def test_killed_write_npy_never_leaves_a_truncated_target(tmp_path, delay):
    import io_utils

    n = 1_000_000  # 8 MB: each write takes long enough for the kill to land inside one
    target = tmp_path / "big.npy"
    script = _WRITER_SCRIPT.format(root=str(ROOT), n=n, target=str(target))
    proc = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        if delay:
            assert proc.stdout.readline(), "the writer died before its first write"
            time.sleep(delay)
        else:
            time.sleep(0.3)  # usually inside the first write: the target must then be absent
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    if target.exists():
        arr = io_utils.read_npy(target)  # a complete, valid array or nothing
        assert arr.shape == (n,) and arr.dtype == np.float64
        np.testing.assert_array_equal(arr[1:], np.arange(1, n, dtype=np.float64))
    # a killed process cannot clean up; what it leaves is a hidden temporary, never the target name
    for name in _temp_leftovers(tmp_path):
        assert name.startswith(".big.npy.")
    assert {p.name for p in tmp_path.iterdir()} - set(_temp_leftovers(tmp_path)) <= {"big.npy"}


_DIR_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import numpy as np
    import io_utils
    with io_utils.atomic_dir({target!r}) as tmp:
        io_utils.write_npy(tmp / "weights.npy", np.zeros(1000))
        open({marker!r}, "w").close()
        time.sleep(120)  # killed while the new bundle is half built
""")


def test_killed_bundle_rebuild_leaves_the_old_bundle_whole(tmp_path):
    import io_utils

    target = tmp_path / "bundles" / "lgbm"
    with io_utils.atomic_dir(target) as tmp:
        io_utils.write_npy(tmp / "weights.npy", np.ones(1000))
        io_utils.write_json(tmp / "metadata.json", {"member": "lgbm"})
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    marker = tmp_path / "half_built"
    proc = subprocess.Popen(
        [PY, "-c", _DIR_SCRIPT.format(root=str(ROOT), target=str(target), marker=str(marker))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _kill_when(proc, marker.exists, 60, "the bundle writer got going")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the old bundle, whole
    assert not (target.parent / ".lgbm.old").exists()
    # the half-built one stays under a hidden temporary name nobody loads
    assert all(
        p.name.startswith(".lgbm.") and p.name.endswith(".tmp") for p in target.parent.iterdir() if p.name != "lgbm"
    )


# --------------------------------------------------------------------------- training killed and restarted


def _train_cmd(data: Path, out: Path) -> list[str]:
    return [
        PY,
        str(ROOT / "main.py"),
        "train",
        "--members",
        "lgbm",
        "--debug",
        "--data-dir",
        str(data),
        "--out",
        str(out),
    ]


def _env() -> dict[str, str]:
    # our own settings only: a developer's STRICT/CMI_*/LGBM_* must not leak into the runs
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CMI_", "FEAT_", "LGBM_", "DL_", "KERAS_", "ENSEMBLE_", "USE_", "STRICT"))
    }
    env.update(CMI_N_FOLDS="3", CMI_N_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def _fold_state(work: Path) -> dict[str, dict]:
    """The folds the work folder's state.json records as finished ({} while it is absent or being replaced)."""
    try:
        return dict(json.loads((work / "state.json").read_text())["folds"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _fold_files(folder: Path, k: int) -> dict[str, tuple[bytes, int]]:
    """Every file of fold ``k`` in ``folder`` (models, importances, OOF rows): name -> (bytes, mtime in ns)."""
    return {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(folder.glob(f"fold{k}_*"))}


def test_training_killed_after_a_recorded_fold_resumes_without_retraining_it(tmp_path):
    """SIGKILL once state.json records fold 0; the restart must skip fold 0, not retrain it, and still
    end with the OOF and bundle of an uninterrupted run (LightGBM with one thread is deterministic)."""
    import config
    import lgbm_pipeline
    from io_utils import read_json, read_npy

    data = tmp_path / "data"
    subprocess.run(
        [PY, str(ROOT / "main.py"), "synth", "--out", str(data), "--subjects", "4"],
        check=True,
        env=_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=300,
    )
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    work = killed / "bundles" / ".lgbm_work"
    # the reference run goes alongside the run that gets killed: the two cores are used, the wall time halves
    errs = [open(tmp_path / "clean.err", "wb"), open(tmp_path / "killed.err", "wb")]
    ref = subprocess.Popen(_train_cmd(data, clean), env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=errs[0])
    victim = subprocess.Popen(
        _train_cmd(data, killed), env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=errs[1]
    )
    try:
        # killed once fold 0 is recorded (state.json is written last, after the fold's files and OOF rows),
        # not on a log line: fit_fold logs before the driver records the fold
        _kill_when(
            victim,
            lambda: "0" in _fold_state(work),
            240,
            "fold 0 recorded in state.json",
            lambda: (tmp_path / "killed.err").read_text(errors="replace")[-800:],
        )
        assert ref.wait(300) == 0, (tmp_path / "clean.err").read_text(errors="replace")[-800:]
    finally:
        for p in (ref, victim):
            if p.poll() is None:
                p.kill()
                p.wait(30)
        for f in errs:
            f.close()
    log = killed / "logs" / "run.log"
    # member_base's "lgbm: bundle written to <folder>" ends a member's training
    assert "lgbm: bundle written" not in log.read_text(errors="replace"), "killed too late: training had finished"
    # after the kill nothing claims to be complete: no bundle, no OOF probabilities
    assert not (killed / "bundles" / "lgbm").exists()
    assert not (killed / "oof" / "oof_lgbm_proba.npy").exists()
    recorded = _fold_state(work)
    assert "0" in recorded and len(recorded) < 3, f"killed too late: folds {sorted(recorded)} all recorded"
    fold0_before = _fold_files(work, 0)
    model_files = set(lgbm_pipeline.LGBMPipeline().fold_files(0))
    assert model_files | {"fold0_oof_full.npy", "fold0_oof_imu.npy"} <= set(fold0_before), sorted(fold0_before)
    log_before = log.read_text(errors="replace")

    with open(tmp_path / "restart.err", "wb") as err:
        subprocess.run(
            _train_cmd(data, killed),
            env=_env(),
            cwd=tmp_path,
            check=True,
            timeout=300,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    full_log = log.read_text(errors="replace")
    assert full_log.startswith(log_before)
    restart_log = full_log[len(log_before) :]
    assert "reusing folds" in restart_log  # the killed run's folds.csv was complete
    # the restart resumed: fold 0 was skipped, never trained again; every other fold was trained by it
    driver = "\n".join(line for line in restart_log.splitlines() if "member_base" in line)  # resume or not, and why
    assert "lgbm: resuming from" in restart_log, driver
    for k in recorded:
        assert f"lgbm: fold {k} already finished" in restart_log, driver
        assert f"lgbm fold {k}:" not in restart_log, f"fold {k} was retrained after the restart"
    for k in {"0", "1", "2"} - set(recorded):
        assert f"lgbm fold {k}:" in restart_log, f"fold {k} was not trained by the restart"
    # fold 0's record and model files are the killed run's, not rewritten: the bundle carries the record as
    # state.json had it (its training seconds included), and its copies of the fold-0 models have the
    # bytes and the modification times (write_bundle copies with timestamps) the killed run gave them
    meta = read_json(killed / "bundles" / "lgbm" / "metadata.json")
    for k in recorded:
        assert meta["fold_records"][k] == recorded[k], f"fold {k}'s record was rewritten"
    for name in sorted(model_files):
        blob, mtime_ns = fold0_before[name]
        copy = killed / "bundles" / "lgbm" / name
        assert copy.read_bytes() == blob, name
        assert copy.stat().st_mtime_ns == mtime_ns, f"{name} was written again by the restart"
    assert not work.exists()  # the restart finished: the work folder is spent

    # the resumed run's outputs equal the uninterrupted run's
    for name in ("oof_lgbm_proba.npy", "oof_lgbm_imu_proba.npy", "y_true.npy", "sequence_ids.npy", "fold_ids.npy"):
        a, b = read_npy(clean / "oof" / name), read_npy(killed / "oof" / name)
        assert a.shape == b.shape and np.array_equal(a, b), name
    assert (clean / "folds.csv").read_text() == (killed / "folds.csv").read_text()
    cfg = config.load_config({"CMI_N_FOLDS": "3", "CMI_N_THREADS": "1"}, debug=True)
    member = lgbm_pipeline.load_member(killed / "bundles" / "lgbm", cfg)  # complete: every fold loads
    assert member.n_folds == 3
    clean_models = sorted((clean / "bundles" / "lgbm").glob("fold*.txt"))
    assert len(clean_models) == 3 * len(model_files)
    for f in clean_models:
        assert (killed / "bundles" / "lgbm" / f.name).read_bytes() == f.read_bytes(), f.name
