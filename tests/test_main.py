"""End to end through the CLI and the exported notebook, on small generated data (LightGBM only: fast)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import main
from metric import GESTURES
from tests import import_graph
from tests.factory import LGBM_ONLY_ENV
from tools import notebook_export

pytestmark = pytest.mark.slow  # subprocesses running the CLI and the exported notebook end to end

ROOT = Path(__file__).resolve().parents[1]
SMALL = {**LGBM_ONLY_ENV}


def _run(args, env_extra, cwd=ROOT, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CMI_", "LGBM_", "DL_", "KERAS_", "USE_"))}
    env.update(env_extra)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    r = _run(["main.py", "synth", "--out", str(out), "--subjects", "4", "--seed", "5"], {})
    assert r.returncode == 0, r.stderr
    return out


def test_help_lists_subcommands():
    r = _run(["main.py", "--help"], {})
    assert r.returncode == 0
    for cmd in ("synth", "train", "serve", "run", "report", "bench", "export-notebook"):
        assert cmd in r.stdout


def test_unknown_member_and_bad_env_are_errors(small_data, tmp_path):
    r = _run(["main.py", "train", "--data-dir", str(small_data), "--out", str(tmp_path), "--members", "xgb"], {})
    assert r.returncode != 0 and "xgb" in r.stderr
    r = _run(["main.py", "train", "--data-dir", str(small_data), "--out", str(tmp_path)], {"KERAS_EPOCHZ": "3"})
    assert r.returncode != 0 and "KERAS_EPOCHZ" in r.stderr


def test_train_serve_report_end_to_end(small_data, tmp_path):
    out = tmp_path / "run"
    r = _run(["main.py", "train", "--data-dir", str(small_data), "--out", str(out), "--debug"], SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "folds.csv").exists() and (out / "config.json").exists()
    assert (out / "bundles" / "lgbm" / "metadata.json").exists()
    assert json.loads((out / "ensemble" / "weights.json").read_text())["members"] == ["lgbm"]
    assert json.loads((out / "oof" / "lgbm_summary.json").read_text())["train_seconds"] > 0
    r = _run(["main.py", "serve", "--data-dir", str(small_data), "--out", str(out)], SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    sub = pl.read_parquet(out / "submission.parquet")
    sol = pl.read_csv(small_data / "test_solution.csv")
    assert sorted(sub["sequence_id"].to_list()) == sorted(sol["sequence_id"].to_list())
    assert set(sub["gesture"].to_list()) <= set(GESTURES)
    serve = json.loads((out / "serve.json").read_text())
    assert 0.0 <= serve["holdout"]["score"] <= 1.0 and serve["latency"]["calls"] == sub.height
    # well above chance: the serving path computes what training did
    assert serve["holdout"]["score"] > 0.4
    assert {"holdout_full", "holdout_imu_only"} <= set(serve)  # the generated test is half IMU-only
    r = _run(["main.py", "report", "--out", str(out)], {})
    assert r.returncode == 0, r.stderr[-3000:]
    text = (out / "report" / "report.md").read_text()
    for needle in ("| lgbm |", "Hold-out", "confusion_matrix.png", "Per-class F1"):
        assert needle in text
    assert (out / "report" / "confusion_matrix.png").stat().st_size > 10_000


def test_serve_on_the_real_sample_test_file(small_data, tmp_path):
    out = tmp_path / "run"
    assert (
        _run(["main.py", "train", "--data-dir", str(small_data), "--out", str(out), "--debug"], SMALL).returncode == 0
    )
    real = ROOT.parent / "shared" / "data" / "cmi"
    r = _run(["main.py", "serve", "--data-dir", str(real), "--out", str(out)], SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    sub = pl.read_parquet(out / "submission.parquet")
    assert sorted(sub["sequence_id"].to_list()) == ["SEQ_000001", "SEQ_000011"]


def test_no_import_cycle_and_nothing_imports_main():
    import graphlib

    graph = import_graph.graph()  # the top-level modules and tools/ (tools.synth, ...)
    assert {"features", "main", "tools.synth", "tools.bench.common"} <= set(graph)
    importers_of_main = sorted(m for m, deps in graph.items() if "main" in deps)
    assert importers_of_main == [], importers_of_main
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
    # tooling is imported by main's commands only: no other top-level module reaches into tools/
    tooling = {m for m in graph if m == "tools" or m.startswith("tools.")}
    product_importers = sorted(m for m, deps in graph.items() if m not in tooling | {"main"} and deps & tooling)
    assert product_importers == [], product_importers
    for low in ("config", "metric", "io_utils"):
        assert graph[low] == set(), (low, graph[low])
    pipelines = [m for m in graph if m.endswith("_pipeline")]
    for p in pipelines:  # a pipeline never imports another pipeline, nor the ensemble
        assert not graph[p] & (set(pipelines) | {"ensemble", "members", "main"}), (p, graph[p])


def test_member_registry_is_the_one_place():
    import members

    assert members.names() == ["lgbm", "torch", "keras", "branchnet"]
    assert not hasattr(main, "MEMBER_MODULES")
    for name in members.names():  # the exported notebook carries every registered pipeline
        assert f"{members.module_name(name)}.py" in notebook_export.modules()


def test_exported_notebook_first_cell_shows_the_original_switches(monkeypatch):
    import re

    from config import load_config

    first = notebook_export.notebook_code(_write_notebook(notebook_export))[0]
    for name in (
        "USE_TORCH",
        "TORCH_TRAIN",
        "USE_KERAS",
        "KERAS_TRAIN",
        "ENSEMBLE_WEIGHTS",
        "TORCH_BUNDLE_PATH",
        "KERAS_BUNDLE_PATH",
        "LOAD_TORCH_FOLDS_IN_MEMORY",
        "LOAD_KERAS_FOLDS_IN_MEMORY",
        "FAIL_IF_TORCH_MISSING",
        "KERAS_SKIP_IF_TRAINED",
    ):
        assert f'"{name}"' in first, name
    # Every switch it proposes, uncommented, is accepted by the config.
    env = dict(re.findall(r'"([A-Z_]+)": "([^"]*)"', first))
    cfg = load_config(env)
    assert cfg.torch.folds_in_memory is False and cfg.torch.fail_if_missing is True


def _write_notebook(module):
    import tempfile

    return module.export_notebook(Path(tempfile.mkdtemp()) / "nb.ipynb")
