"""The exported Kaggle notebook on both of Kaggle's runs: the commit run and the hidden-test re-run.

The re-run starts with an empty working folder (KAGGLE_IS_COMPETITION_RERUN set) and the gateway waits at most
15 minutes for the server, so it must serve attached bundles, or train the small fallback, or stop at once with a
message saying what to attach — never train for hours, never die at start-up with nothing said.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import bundle
import main
from config import load_config
from tests import import_graph
from tests.factory import LGBM_ONLY_ENV
from tools import notebook_export

ROOT = Path(__file__).resolve().parents[1]
SMALL = {**LGBM_ONLY_ENV, "CMI_DEBUG": "1"}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    return main.stage_synth(tmp_path_factory.mktemp("data"), subjects=4, seed=5, test_subjects=None)


def _clean_env() -> dict[str, str]:
    prefixes = ("CMI_", "LGBM_", "DL_", "KERAS_", "USE_", "TORCH_", "BRANCHNET_", "ENSEMBLE_", "KAGGLE_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def _notebook_script(tmp_path: Path) -> Path:
    nb = notebook_export.export_notebook(tmp_path / "nb.ipynb", src_dir=str(tmp_path / "src"))
    script = tmp_path / "nb.py"
    script.write_text("\n\n".join(notebook_export.notebook_code(nb)))
    return script


def _run_notebook(script: Path, work: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    work.mkdir(parents=True)  # a fresh working folder, as Kaggle gives each run
    env = {**_clean_env(), **SMALL, "CMI_OUT_DIR": str(work / "out"), **env_extra}
    return subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=600)


def _answers(path: Path) -> dict[str, str]:
    sub = pl.read_parquet(path)
    return dict(zip(sub["sequence_id"].to_list(), sub["gesture"].to_list()))


@pytest.mark.slow
def test_exported_notebook_succeeds_on_the_commit_run_and_on_the_rerun(small_data, tmp_path):
    script = _notebook_script(tmp_path)
    kaggle_input = tmp_path / "input"
    kaggle_input.mkdir()
    common = {"CMI_DATA_DIR": str(small_data), "CMI_KAGGLE_INPUT": str(kaggle_input)}

    # 1. The commit run trains (the default switches) and serves; it warns that the re-run will not see its bundles.
    commit = _run_notebook(script, tmp_path / "commit", common)
    assert commit.returncode == 0, commit.stderr[-3000:]
    commit_sub = tmp_path / "commit" / "out" / "submission.parquet"
    assert pl.read_parquet(commit_sub).height > 0
    assert "will not see them" in commit.stderr
    assert (tmp_path / "src" / "features.py").read_text() == (ROOT / "features.py").read_text()

    # 2. The re-run, fresh working folder, nothing attached: old main died here ("no member could be loaded").
    rerun = _run_notebook(script, tmp_path / "rerun", {**common, "KAGGLE_IS_COMPETITION_RERUN": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert pl.read_parquet(tmp_path / "rerun" / "out" / "submission.parquet").height > 0
    served = json.loads((tmp_path / "rerun" / "out" / "serve.json").read_text())
    assert served["kaggle"]["fallback"] is True and served["kaggle"]["train"] == ["lgbm"]
    assert "training lgbm at debug size" in rerun.stderr

    # 3. The re-run with the commit run's output attached as a dataset: served as it is, nothing trained.
    dataset = kaggle_input / "my-cmi-models"
    for part in ("bundles", "ensemble"):
        shutil.copytree(tmp_path / "commit" / "out" / part, dataset / part)
    attached = _run_notebook(script, tmp_path / "attached", {**common, "KAGGLE_IS_COMPETITION_RERUN": "1"})
    assert attached.returncode == 0, attached.stderr[-3000:]
    timings = json.loads((tmp_path / "attached" / "out" / "timings.json").read_text())
    assert not any(k.startswith("train ") for k in timings), timings
    served = json.loads((tmp_path / "attached" / "out" / "serve.json").read_text())
    assert served["kaggle"]["bundle_dir"] == str(dataset / "bundles") and not served["kaggle"]["fallback"]
    assert _answers(tmp_path / "attached" / "out" / "submission.parquet") == _answers(commit_sub)

    # 4. The re-run with the fallback switched off and nothing attached stops at once, saying what to attach.
    dataset.rename(tmp_path / "detached")
    stop = _run_notebook(
        script, tmp_path / "stop", {**common, "KAGGLE_IS_COMPETITION_RERUN": "1", "CMI_RERUN_TRAIN": ""}
    )
    assert stop.returncode != 0
    assert "CMI_BUNDLE_DIR=/kaggle/input/<dataset>/bundles" in stop.stderr
    assert not (tmp_path / "stop" / "out" / "bundles").exists()


# --------------------------------------------------------------------------- what the notebook carries

# main.py's product path: the notebook's entry point and the CLI's train and serve commands. Its other
# commands (synth, run, report, bench, ...) are tooling and import from tools/ inside themselves.
MAIN_ENTRY_POINTS = {"kaggle_main", "cmd_train", "cmd_serve"}


def _needed_modules() -> set[str]:
    """The modules training and serving import (ast, transitively): main's product path, the Predictor and
    the gateway, and every pipeline of the member registry (imported by name at run time, so named here)."""
    import members

    edges = import_graph.graph()
    edges["main"] = import_graph.path_imports(ROOT / "main.py", MAIN_ENTRY_POINTS, set(edges))
    roots = {"main", "ensemble", "inference_server", *(members.module_name(m) for m in members.names())}
    return import_graph.closure(roots, edges)


def test_the_notebook_carries_what_training_and_serving_import_and_nothing_else(tmp_path):
    needed = _needed_modules()
    assert {"main", "ensemble", "features", "lgbm_pipeline", "branchnet_model", "blend"} <= needed
    tooling = sorted(m for m in needed if m == "tools" or m.startswith("tools."))
    assert tooling == [], f"training or serving imports tooling: {tooling}"
    carried = {name.removesuffix(".py") for name in notebook_export.modules()}
    assert not needed - carried, f"needed by training/serving but not in the notebook: {sorted(needed - carried)}"
    assert not carried - needed, f"in the notebook but not imported by training/serving: {sorted(carried - needed)}"
    # the cells write exactly those files
    code = "\n".join(notebook_export.notebook_code(notebook_export.export_notebook(tmp_path / "nb.ipynb")))
    written = set(re.findall(r"\(Path\(SRC_DIR\) / '([^']+\.py)'\)\.write_text", code))
    assert written == set(notebook_export.modules())


def test_the_product_path_of_main_is_read_from_its_calls():
    """The walk follows names: kaggle_main reaches stage_serve (inference_server), not cmd_report (tools)."""
    known = set(import_graph.graph())
    assert "inference_server" in import_graph.path_imports(ROOT / "main.py", {"kaggle_main"}, known)
    assert "tools.report" not in import_graph.path_imports(ROOT / "main.py", {"kaggle_main"}, known)
    assert "tools.report" in import_graph.path_imports(ROOT / "main.py", {"cmd_report"}, known)
    with pytest.raises(KeyError, match="kaggle_mian"):
        import_graph.path_imports(ROOT / "main.py", {"kaggle_mian"}, known)


# --------------------------------------------------------------------------- the plan alone (no training)


def _fake_bundle(root: Path, member: str) -> Path:
    where = root / member
    where.mkdir(parents=True)
    (where / "model.bin").write_bytes(b"weights")
    bundle.write_metadata(where, bundle.bundle_metadata(member, ["f"], "hash"))
    return where


def _cfg(tmp_path: Path, **env: str):
    base = {"CMI_OUT_DIR": str(tmp_path / "out"), "CMI_KAGGLE_INPUT": str(tmp_path / "input")}
    return load_config(env={**base, **env})


def test_rerun_plan_serves_the_one_attached_dataset(tmp_path):
    _fake_bundle(tmp_path / "input" / "models" / "v1" / "bundles", "lgbm")
    plan = main.plan_kaggle_run(_cfg(tmp_path), rerun=True)
    assert plan.train == [] and plan.bundle_dir == tmp_path / "input" / "models" / "v1" / "bundles"


def test_rerun_plan_refuses_to_guess_between_two_attached_datasets(tmp_path):
    _fake_bundle(tmp_path / "input" / "a" / "bundles", "lgbm")
    _fake_bundle(tmp_path / "input" / "b" / "bundles", "lgbm")
    with pytest.raises(SystemExit, match="several attached datasets.*CMI_BUNDLE_DIR"):
        main.plan_kaggle_run(_cfg(tmp_path), rerun=True)
    plan = main.plan_kaggle_run(_cfg(tmp_path, CMI_BUNDLE_DIR=str(tmp_path / "input" / "b" / "bundles")), rerun=True)
    assert plan.bundle_dir == tmp_path / "input" / "b" / "bundles"


def test_rerun_plan_without_bundles_trains_only_the_fallback_at_debug_size(tmp_path):
    plan = main.plan_kaggle_run(_cfg(tmp_path), rerun=True)
    assert plan.fallback and plan.debug and plan.train == ["lgbm"]
    # a fallback member switched off is not trained: then nothing can be served, and the run says so at once
    with pytest.raises(SystemExit, match="CMI_RERUN_TRAIN names no member"):
        main.plan_kaggle_run(_cfg(tmp_path, LGBM_TRAIN="0"), rerun=True)
    with pytest.raises(SystemExit, match="CMI_RERUN_TRAIN"):
        main.plan_kaggle_run(_cfg(tmp_path, CMI_RERUN_TRAIN="lgbn"), rerun=True)


def test_rerun_plan_ignores_a_damaged_bundle_in_the_working_folder(tmp_path):
    where = _fake_bundle(tmp_path / "out" / "bundles", "lgbm")
    (where / "model.bin").write_bytes(b"w")  # truncated: its digest no longer matches
    plan = main.plan_kaggle_run(_cfg(tmp_path), rerun=True)
    assert plan.fallback  # not served: the damaged bundle does not count as loadable


def test_commit_plan_with_training_off_and_nothing_attached_stops_with_the_fix(tmp_path):
    off = {f"{m.upper()}_TRAIN": "0" for m in ("lgbm", "torch", "keras", "branchnet")}
    with pytest.raises(SystemExit, match="attach it to this notebook"):
        main.plan_kaggle_run(_cfg(tmp_path, **off), rerun=False)
    _fake_bundle(tmp_path / "input" / "ds" / "bundles", "lgbm")
    plan = main.plan_kaggle_run(_cfg(tmp_path, **off), rerun=False)
    assert plan.train == [] and plan.bundle_dir == tmp_path / "input" / "ds" / "bundles"
