"""The figures of README.md, docs/RESULTS.md and docs/SYNTH.md match the files that produced them."""

import json
from pathlib import Path

import pytest

from tools import results

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("doc", results.DOCS, ids=lambda p: p.name)
def test_every_quoted_figure_matches_its_source_file(doc):
    blocks = results.blocks(doc.read_text())
    assert blocks, f"{doc} has no generated block"
    stale = [name for name, body in blocks if results.render(name) != body]
    assert not stale, f"{doc.name}: blocks {stale} differ from their sources; run `python main.py results`"


def test_no_hand_copied_figure_on_the_results_pages():
    assert results.figures_outside_blocks((ROOT / "docs" / "RESULTS.md").read_text()) == []
    readme = (ROOT / "README.md").read_text()
    assert results.figures_outside_blocks(results.section(readme, "Results")) == []


def test_the_guard_catches_a_hand_copied_figure():
    text = "intro\n<!-- results:x -->\n| a | 0.812 |\n<!-- /results:x -->\nLightGBM scores 0.834 here.\n```\n0.5\n```\n"
    assert results.figures_outside_blocks(text) == ["LightGBM scores 0.834 here."]


def _fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "oof").mkdir(parents=True)
    (run / "ensemble" / "oof").mkdir(parents=True)
    summary = {"overall": {"full": 0.9, "imu_only": 0.7, "mean": 0.8}, "path": "/somewhere"}
    (run / "oof" / "lgbm_summary.json").write_text(json.dumps(summary))
    blend = {"overall": {"full": 0.91, "imu_only": 0.72, "mean": 0.815}, "shipped": {"full": "blend"}}
    (run / "ensemble" / "oof" / "blend_summary.json").write_text(json.dumps(blend))
    serve = {"holdout": {"score": 0.85, "binary_f1": 0.97, "macro_f1": 0.73}, "submission": "/x/submission.parquet"}
    serve["latency"] = {"calls": 10, "p50_ms": 40.0, "p95_ms": 55.5, "max_ms": 70.0}
    (run / "serve.json").write_text(json.dumps(serve))
    (run / "timings.json").write_text(json.dumps({"train lgbm": 12.34, "train + serve total": 600.0}))
    (run / "make_run_wall.json").write_text(json.dumps({"make_run_wall_s": 720, "exit_status": 0}))
    return run


def test_snapshot_and_render(tmp_path):
    dest = results.snapshot(_fake_run(tmp_path), "snap", dest=tmp_path / "docs" / "results")
    assert "submission" not in json.loads((dest / "serve.json").read_text())  # machine paths are no figure
    assert "path" not in json.loads((dest / "oof" / "lgbm_summary.json").read_text())
    oof = results.render("run:snap:oof", root=tmp_path)
    assert "| lgbm | 0.900 | 0.700 | 0.800 |" in oof and "**0.815**" in oof and "shipped full: blend" in oof
    assert "| all | 0.850 | 0.970 | 0.730 |" in results.render("run:snap:holdout", root=tmp_path)
    assert "p95 55.5 ms" in results.render("run:snap:latency", root=tmp_path)
    assert "12.0 min wall, install included (train + serve 10.0 min)" in results.render("run:snap:wall", root=tmp_path)
    with pytest.raises(results.ResultsError, match="no renderer"):
        results.render("run:snap:nothing", root=tmp_path)
    with pytest.raises(results.ResultsError, match="serve.json"):
        results.snapshot(tmp_path / "nowhere", "x", dest=tmp_path / "d")


def test_a_changed_source_makes_its_block_stale(tmp_path):
    results.snapshot(_fake_run(tmp_path), "snap", dest=tmp_path / "docs" / "results")
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- results:run:snap:holdout -->\nold\n<!-- /results:run:snap:holdout -->\n")
    text, changed = results.regenerate(doc, root=tmp_path)
    assert changed == ["run:snap:holdout"] and "0.850" in text
    doc.write_text(text)
    assert results.regenerate(doc, root=tmp_path)[1] == []  # current now


def test_holdout_interval_is_over_test_subjects():
    import polars as pl

    import main
    from metric import GESTURES

    rows = [(f"S{s}", g, g if s != "2" else GESTURES[9]) for s in "123" for g in GESTURES[:8]]
    joined = pl.DataFrame(rows, schema=["subject", "gesture", "gesture_pred"], orient="row")
    iv = main.holdout_interval(joined, n_resamples=200)
    assert iv["n_subjects"] == 3 and iv["low"] < iv["high"] <= 1.0  # one subject all wrong: wide
    perfect = main.holdout_interval(joined.with_columns(pl.col("gesture").alias("gesture_pred")), n_resamples=50)
    assert perfect["low"] == perfect["high"] == 1.0
