"""`main.py ablate`: variant parsing, the paired two-level bootstrap (seeds x subjects), run reuse, the outputs.

The quick tests train with a fake training stage that writes OOF files as a member would (the run
bookkeeping does not depend on what trains); the slow ones go through main.stage_train and the CLI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import cv
import data
import main
import members
from config import Config, ConfigError
from metric import GESTURES, N_CLASSES, score_indices
from tests.centroid_pipeline import ConfigWithCentroid
from tests.factory import demographics, labelled_rows
from tools import ablation
from tools.ablation import AblationError, AblationSpec, ModelPreds, RunsOOF, Variant

ROOT = Path(__file__).resolve().parents[1]
TEST_MEMBER, TEST_MEMBER_ENTRY = "centroid", "tests.centroid_pipeline:CentroidPipeline"


@pytest.fixture(autouse=True)
def _register_test_member(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(members.REGISTRY, TEST_MEMBER, TEST_MEMBER_ENTRY)


# --------------------------------------------------------------------------- variants


def test_variant_text_parses_settings_and_values_with_commas():
    v = ablation.parse_variant("nomirror:FEAT_MIRROR_LEFT_HANDED=0, LGBM_NUM_LEAVES=7")
    assert v == Variant("nomirror", {"FEAT_MIRROR_LEFT_HANDED": "0", "LGBM_NUM_LEAVES": "7"})
    v = ablation.parse_variant("small:KERAS_IMU_FILTERS=8,8,8,KERAS_RNN_UNITS=8,ENSEMBLE_WEIGHTS=lgbm:1,torch:3")
    assert v.overrides == {"KERAS_IMU_FILTERS": "8,8,8", "KERAS_RNN_UNITS": "8", "ENSEMBLE_WEIGHTS": "lgbm:1,torch:3"}
    assert ablation.parse_variant("same:") == Variant("same", {})  # the base's settings again: a determinism check


@pytest.mark.parametrize(
    "text, message",
    [
        ("FEAT_MIRROR_LEFT_HANDED=0", "expected NAME:KEY=VALUE"),
        (":LGBM_NUM_LEAVES=7", "variant name ''"),
        ("two words:LGBM_NUM_LEAVES=7", "variant name 'two words'"),
        ("base:LGBM_NUM_LEAVES=7", "'base' is the environment's"),
        ("v:LGBM_NUM_LEAVES", "'LGBM_NUM_LEAVES' is not KEY=VALUE"),
        ("v:=7", "no setting name"),
        ("v:LGBM_NUM_LEAVES=7,LGBM_NUM_LEAVES=9", "LGBM_NUM_LEAVES is set twice"),
    ],
)
def test_bad_variant_text_is_an_error_that_says_what_is_wrong(text, message):
    with pytest.raises(AblationError, match=message):
        ablation.parse_variant(text)


def test_variants_file_and_duplicate_names(tmp_path):
    f = tmp_path / "v.toml"
    f.write_text(
        '[variants.nomirror]\nFEAT_MIRROR_LEFT_HANDED = "0"\n\n'
        "[variants.small]\nLGBM_NUM_LEAVES = 7\nTORCH_AMP = false\nKERAS_IMU_FILTERS = [8, 8, 8]\n"
    )
    vs = ablation.collect_variants([f], ["extra:LGBM_LEARNING_RATE=0.1"])
    assert [v.name for v in vs] == ["base", "nomirror", "small", "extra"]
    assert vs[0].overrides == {}
    assert vs[2].overrides == {"LGBM_NUM_LEAVES": "7", "TORCH_AMP": "0", "KERAS_IMU_FILTERS": "8,8,8"}
    with pytest.raises(AblationError, match="'nomirror' is defined twice"):
        ablation.collect_variants([f], ["nomirror:LGBM_NUM_LEAVES=3"])
    with pytest.raises(AblationError, match="'a' is defined twice"):
        ablation.collect_variants([], ["a:LGBM_NUM_LEAVES=3", "a:LGBM_NUM_LEAVES=5"])
    bad = tmp_path / "bad.toml"
    bad.write_text('[nomirror]\nFEAT_MIRROR_LEFT_HANDED = "0"\n')
    with pytest.raises(AblationError, match=r"unknown top-level key\(s\) \['nomirror'\]"):
        ablation.read_variants_file(bad)
    bad.write_text("[variants.x\n")
    with pytest.raises(AblationError, match="not valid TOML"):
        ablation.read_variants_file(bad)
    with pytest.raises(AblationError, match="not found"):
        ablation.read_variants_file(tmp_path / "nope.toml")


def test_variant_settings_are_checked_by_the_config_before_training():
    env = {"CMI_N_THREADS": "1"}
    cfg = ablation.check_variant(Variant("v", {"FEAT_MIRROR_LEFT_HANDED": "0", "DL_EPOCHS": "3"}), env)
    assert cfg.features.mirror_left_handed is False and cfg.torch.epochs == 3
    unknown = "variant v: unknown environment variable LGBM_NUM_LEAVE; did you mean LGBM_NUM_LEAVES?"
    with pytest.raises(ConfigError, match=re.escape(unknown)):
        ablation.check_variant(Variant("v", {"LGBM_NUM_LEAVE": "7"}), env)
    # config.py ignores a name outside its prefixes; a variant must not
    with pytest.raises(ConfigError, match="variant v: NUM_LEAVES is not a setting"):
        ablation.check_variant(Variant("v", {"NUM_LEAVES": "7"}), env)
    with pytest.raises(ConfigError, match="variant v: .*LGBM_NUM_LEAVES='many' is not a valid int"):
        ablation.check_variant(Variant("v", {"LGBM_NUM_LEAVES": "many"}), env)
    with pytest.raises(ConfigError, match="CMI_FOLD_SEED cannot vary"):
        ablation.check_variant(Variant("v", {"CMI_FOLD_SEED": "3"}), env)
    with pytest.raises(ConfigError, match="CMI_SEED cannot vary.*--seeds"):
        ablation.check_variant(Variant("v", {"CMI_SEED": "3"}), env)
    # a member section of another config class
    ablation.check_variant(Variant("v", {"CENTROID_TEMPERATURE": "2"}), env, ConfigWithCentroid)
    with pytest.raises(ConfigError, match="CENTROID_TEMPERATURE is not a setting"):
        ablation.check_variant(Variant("v", {"CENTROID_TEMPERATURE": "2"}), env)


def test_seeds():
    assert ablation.parse_seeds("42, 43") == [42, 43]
    for text, message in (("42,x", "integers"), ("", "at least one"), ("1,1", "repeated")):
        with pytest.raises(AblationError, match=message):
            ablation.parse_seeds(text)


def test_cli_rejects_a_misspelt_setting_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "abl"
    with pytest.raises(SystemExit) as e:
        main.main(["ablate", "--data-dir", str(tmp_path / "none"), "--out", str(out), "--variant", "v:TORCH_EPOCH=3"])
    assert "ablate: variant v: unknown environment variable TORCH_EPOCH; did you mean TORCH_EPOCHS?" in str(e.value)
    with pytest.raises(SystemExit, match="expected NAME:KEY=VALUE"):
        main.main(["ablate", "--data-dir", str(tmp_path), "--out", str(out), "--variant", "TORCH_EPOCHS=3"])
    assert not out.exists()


# --------------------------------------------------------------------------- statistics


def _subjects_and_labels(n_subjects: int = 6, per: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return np.repeat([f"S{i}" for i in range(n_subjects)], per), rng.integers(0, N_CLASSES, n_subjects * per)


def _noisy(y: np.ndarray, wrong: float, seed: int) -> ModelPreds:
    """Predictions wrong on a share ``wrong`` of the rows, on both views."""
    rng = np.random.default_rng(seed)

    def one() -> np.ndarray:
        p = y.copy()
        flip = rng.random(len(y)) < wrong
        p[flip] = (y[flip] + rng.integers(1, N_CLASSES, flip.sum())) % N_CLASSES
        return p

    return ModelPreds(one(), one())


def test_a_variant_better_on_every_subject_has_an_interval_above_zero():
    subjects, y = _subjects_and_labels()
    base = [_noisy(y, 0.5, s) for s in (1, 2)]
    better = [ModelPreds(y.copy(), y.copy()), ModelPreds(y.copy(), y.copy())]  # perfect on every subject
    d = ablation.paired_difference(y, subjects, better, base, n_resamples=300, seed=0)
    assert (d.diff > 0.3).all() and (d.low > 0).all() and (d.high >= d.low).all()
    assert d.diff[2] == pytest.approx(0.5 * (d.diff[0] + d.diff[1]))  # test-like is the mean of the views
    worse = ablation.paired_difference(y, subjects, base, better, n_resamples=300, seed=0)
    assert (worse.high < 0).all() and np.allclose(worse.diff, -d.diff)


def test_an_identical_variant_differs_by_zero_with_an_interval_holding_zero():
    subjects, y = _subjects_and_labels()
    base = [_noisy(y, 0.4, s) for s in (1, 2)]
    d = ablation.paired_difference(y, subjects, list(base), base, n_resamples=200, seed=0)
    assert (d.diff == 0).all() and (d.low <= 0).all() and (d.high >= 0).all()
    with pytest.raises(AblationError, match="paired seeds"):
        ablation.paired_difference(y, subjects, base[:1], base)
    y1, s1 = y[:30], subjects[:30]  # one subject: nothing to resample
    one = ablation.paired_difference(y1, s1, [_noisy(y1, 0.1, 3)], [_noisy(y1, 0.4, 4)])
    assert np.isnan(one.low).all() and np.isnan(one.high).all() and np.isfinite(one.diff).all()


def test_the_bootstrap_resamples_subjects_not_sequences():
    """One subject carries the whole difference: the interval must be as wide as dropping it makes it."""
    subjects, y = _subjects_and_labels(n_subjects=8, per=25)
    base = [_noisy(y, 0.5, 1)]
    lucky = ModelPreds(base[0].full.copy(), base[0].imu.copy())
    rows = subjects == "S0"
    lucky.full[rows], lucky.imu[rows] = y[rows], y[rows]  # better on S0 only
    d = ablation.paired_difference(y, subjects, [lucky], base, n_resamples=400, seed=0)
    assert d.diff[0] > 0
    assert d.low[0] <= 1e-12  # resamples without S0 exist (about a third): no difference there


def _oofs(y, subjects, preds):
    return RunsOOF(y=y, subjects=subjects, preds=preds)


def test_the_metric_from_summed_confusion_counts_is_the_competition_metric():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 40, 300):
        y = rng.integers(0, N_CLASSES, n)
        pred = np.where(rng.random(n) < 0.5, y, rng.integers(0, N_CLASSES, n))
        group = rng.integers(0, 5, n)
        counts = ablation.group_counts(y, pred, group, 5)
        assert counts.shape == (5, ablation.N_COUNTS)
        assert ablation.score_counts(counts.sum(axis=0)) == pytest.approx(score_indices(y, pred), abs=1e-12)
        twice = np.concatenate([np.flatnonzero(group == 0)] * 2 + [np.flatnonzero(group == 3)])  # repeats count
        expected = score_indices(y[twice], pred[twice]) if len(twice) else None
        if expected is not None:
            assert ablation.score_counts(2 * counts[0] + counts[3]) == pytest.approx(expected, abs=1e-12)


def _one_seed_carries_it(n_subjects: int = 12) -> tuple[np.ndarray, np.ndarray, list[ModelPreds], list[ModelPreds]]:
    """A variant far better on seed 1 and worse on seeds 2 and 3: better on average, on every subject."""
    subjects, y = _subjects_and_labels(n_subjects=n_subjects)
    base = [_noisy(y, 0.5, s) for s in (1, 2, 3)]

    def worse(p: ModelPreds, seed: int) -> ModelPreds:
        return ModelPreds(_noisy(p.full, 0.15, seed).full, _noisy(p.imu, 0.15, seed + 100).imu)

    variant = [ModelPreds(y.copy(), y.copy()), worse(base[1], 7), worse(base[2], 8)]
    return y, subjects, variant, base


def test_seed_variance_widens_the_interval_so_one_lucky_seed_is_not_a_result():
    y, subjects, variant, base = _one_seed_carries_it()
    per_seed = np.array([ablation.view_scores(y, v) - ablation.view_scores(y, b) for v, b in zip(variant, base)])
    assert (per_seed[0] > 0.3).all() and (per_seed[1:] < 0).all()  # better on one seed, worse on the others
    d = ablation.paired_difference(y, subjects, variant, base, 2000, 0)
    assert (d.diff > 0.05).all() and np.allclose(d.diff, per_seed.mean(axis=0))
    # the seeds are resampled: resamples without seed 1 (about 8 in 27) are worse than the base
    assert (d.low < 0).all() and (d.high > 0).all()
    # the subject-only bootstrap (the old method) on the same rows and subject draws calls it a result
    subject_only = ablation.paired_difference(y, subjects, variant, base, 2000, 0, resample_seeds=False)
    assert np.array_equal(subject_only.diff, d.diff) and (subject_only.low > 0).all()
    assert (d.high - d.low > 3 * (subject_only.high - subject_only.low)).all()


def test_a_consistent_improvement_across_seeds_and_subjects_is_a_result(tmp_path):
    subjects, y = _subjects_and_labels()
    preds = {}
    for s in (1, 2, 3):
        preds[("base", s)] = {"m": _noisy(y, 0.5, s)}
        preds[("better", s)] = {"m": _noisy(y, 0.2, 10 + s)}
    spec = AblationSpec(
        tmp_path, tmp_path, [Variant("base"), Variant("better")], [1, 2, 3], ["m"], {}, n_resamples=2000
    )
    rows = [r for r in ablation.compare(_oofs(y, subjects, preds), spec) if r["variant"] == "better"]
    assert len(rows) == 3 and all(r["result"] is True and r["adj_low"] > 0 for r in rows)
    assert all(r["n_comparisons"] == 3 and r["adj_level"] == pytest.approx(1 - 0.05 / 3) for r in rows)


def test_the_correction_widens_the_intervals_with_the_number_of_comparisons(tmp_path):
    subjects, y = _subjects_and_labels()
    base = [_noisy(y, 0.5, s) for s in (1, 2, 3)]
    modest = [_noisy(y, 0.4, 10 + s) for s in (1, 2, 3)]
    draws = ablation.draw_resamples(3, 6, 4000, seed=0)
    one, many = (
        ablation.paired_difference(y, subjects, modest, base, level=0.95, n_comparisons=k, resamples=draws)
        for k in (1, 66)
    )
    assert np.array_equal(one.low, one.adj_low) and np.array_equal(one.low, many.low)  # k = 1: no correction
    assert (many.adj_low < one.adj_low).all() and (many.adj_high > one.adj_high).all()
    assert many.adj_level == pytest.approx(1 - 0.05 / 66)
    # through compare: the same variant beside five more (18 comparisons instead of 3) is no longer a result
    preds = {}
    for k, s in enumerate((1, 2, 3)):
        preds[("base", s)] = {"m": base[k]}
        preds[("modest", s)] = {"m": modest[k]}
        for c in range(5):
            preds[(f"same{c}", s)] = {"m": base[k]}
    verdicts = {}
    for extra in (0, 5):
        variants = [Variant("base"), Variant("modest"), *(Variant(f"same{c}") for c in range(extra))]
        spec = AblationSpec(tmp_path, tmp_path, variants, [1, 2, 3], ["m"], {}, n_resamples=4000)
        rows = ablation.compare(_oofs(y, subjects, preds), spec)
        r = next(r for r in rows if r["variant"] == "modest" and r["metric"] == "test_like")
        verdicts[r["n_comparisons"]] = (r["ci_low"], r["result"])
        assert all(x["result"] is False for x in rows if x["variant"].startswith("same"))
    assert verdicts[3][0] == verdicts[18][0] > 0  # the same draws: the uncorrected interval excludes 0 both times
    assert verdicts[3][1] is True and verdicts[18][1] is False


def test_compare_rows_the_method_and_the_outputs(tmp_path):
    subjects, y = _subjects_and_labels()
    base = [_noisy(y, 0.5, s) for s in (1, 2, 3)]
    preds = {}
    for k, s in enumerate((1, 2, 3)):
        preds[("base", s)] = {"m": base[k], "blend": base[k]}
        preds[("better", s)] = {"m": ModelPreds(y.copy(), y.copy(), 3.0), "blend": _noisy(y, 0.1, 10 + k)}
        preds[("shuffled", s)] = {"m": base[(k + 1) % 3], "blend": base[(k + 1) % 3]}
    spec = AblationSpec(
        out_dir=tmp_path,
        data_dir=tmp_path,
        variants=[Variant("base"), Variant("better", {"X": "1"}), Variant("shuffled", {"Y": "1"})],
        seeds=[1, 2, 3],
        members=["m"],
        base_env={},
        n_resamples=300,
    )
    wall = {(v, s): 10.0 + s for v in ("base", "better", "shuffled") for s in (1, 2, 3)}
    rows = ablation.compare(_oofs(y, subjects, preds), spec, wall)
    assert len(rows) == 3 * 2 * 3
    by = {(r["variant"], r["model"], r["metric"]): r for r in rows}
    b = by[("base", "m", "test_like")]
    assert b["diff_mean"] is None and b["result"] is None and b["std"] > 0 and b["wall_s"] == 12.0
    assert b["n_seeds"] == 3 and b["n_comparisons"] == 2 * 2 * 3 and b["n_resamples"] == 300
    good = by[("better", "m", "test_like")]
    assert good["mean"] == 1.0 and good["std"] == 0.0 and good["train_s"] == 3.0
    assert good["adj_low"] > 0 and good["result"] is True and good["adj_low"] <= good["ci_low"]
    assert good["diff_mean"] == pytest.approx(1.0 - b["mean"])
    noise = by[("shuffled", "m", "full")]  # the base's runs under other seeds: seed noise only
    assert noise["result"] is False and noise["adj_low"] < 0 < noise["adj_high"]
    text = ablation.format_table(rows)
    assert "two-level bootstrap" in text and "seeds and subjects resampled, 300 resamples" in text
    assert "Bonferroni over 12 comparison(s)" in text and "99.58% CI (Bonferroni)" in text and "95% CI" in text
    assert "beyond" not in text and ">spread" not in text
    body = text.splitlines()[1:]
    assert len([line for line in body if not line.startswith("CAUTION")]) == 2 + len(rows)
    assert "CAUTION: each end of the corrected interval rests on 0.6 resample(s)" in text  # 300 are too few
    paths = ablation.write_outputs(tmp_path, spec, ["m"], rows, [])
    csv = pl.read_csv(paths["csv"])
    assert csv.height == len(rows)
    assert {"n_seeds", "mean", "std", "diff_mean", "ci_low", "ci_high", "adj_low", "adj_high", "result"} <= set(
        csv.columns
    )
    assert {"beyond_seed_spread", "ci_excludes_zero"}.isdisjoint(csv.columns)
    assert set(csv["method"]) == {ablation.METHOD_TAG} and set(csv["n_comparisons"]) == {12}
    doc = json.loads(paths["json"].read_text())
    assert doc["rows"][0]["diff_mean"] is None  # JSON null, not NaN
    assert doc["bootstrap"]["units"] == ["seed", "subject"] and doc["bootstrap"]["correction"] == "bonferroni"
    assert doc["bootstrap"]["method"].startswith("two-level bootstrap") and doc["bootstrap"]["n_comparisons"] == 12
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_fewer_than_three_seeds_is_a_caution_and_never_a_result(tmp_path):
    subjects, y = _subjects_and_labels()
    preds = {}
    for s in (1, 2, 3):
        preds[("base", s)] = {"m": _noisy(y, 0.5, s)}
        preds[("perfect", s)] = {"m": ModelPreds(y.copy(), y.copy())}
    variants = [Variant("base"), Variant("perfect")]
    for seeds in ([1, 2], [1]):
        spec = AblationSpec(tmp_path, tmp_path, variants, seeds, ["m"], {}, n_resamples=2000)
        rows = [r for r in ablation.compare(_oofs(y, subjects, preds), spec) if r["variant"] == "perfect"]
        assert all(r["adj_low"] > 0.2 for r in rows), rows  # the interval is far from 0 ...
        assert all(r["result"] is False for r in rows)  # ... but with fewer than 3 seeds nothing is a result
        assert f"CAUTION: {len(seeds)} seed(s), fewer than 3" in ablation.format_table(rows)
        if len(seeds) == 1:
            assert all(r["std"] is None for r in rows)  # one seed: no spread
            ablation.plot(rows, tmp_path / "one.png")
    ablation.write_outputs(tmp_path, spec, ["m"], rows, [])
    assert "fewer than 3" in json.loads((tmp_path / "ablation.json").read_text())["bootstrap"]["cautions"][0]


def test_the_cli_defaults_to_three_seeds(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys):
    seen = []

    def fake_run(spec, train, stage=None, explicit_members=True):
        seen.append(spec)
        return ablation.AblationResult(rows=[], runs=[], paths={})

    monkeypatch.setattr(ablation, "run_ablation", fake_run)
    monkeypatch.setenv("CMI_SEED", "7")
    main.main(["ablate", "--data-dir", str(tmp_path), "--out", str(tmp_path / "abl"), "--members", TEST_MEMBER])
    assert seen[0].seeds == [7, 8, 9] and seen[0].n_resamples is None


# --------------------------------------------------------------------------- runs (a fake training stage)

QUICK_ENV = {"CMI_N_FOLDS": "2", "CMI_N_THREADS": "1", "STRICT": "1"}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("abl_data")
    raw = labelled_rows(n_subjects=4, classes=(0, 3, 9), reps=3, seed=5, min_len=24, max_len=30)
    raw.write_csv(d / "train.csv")
    demographics(sorted(raw["subject"].unique().to_list())).write_csv(d / "train_demographics.csv")
    return d


@pytest.fixture
def no_plot(monkeypatch: pytest.MonkeyPatch) -> None:
    # matplotlib costs about a second a figure here; the figure has its own test above
    monkeypatch.setattr(ablation, "plot", lambda rows, path, level=0.95: path.write_bytes(b"png"))


class FakeTrain:
    """Writes OOF files as stage_train's members do, on the run's folds.csv; CENTROID_TEMPERATURE < 1 is perfect."""

    def __init__(self, blend: bool = True) -> None:
        self.calls: list[Path] = []
        self.blend = blend
        self.fail_on: str | None = None

    def __call__(self, cfg: Config, names: list[str]) -> None:
        out = Path(cfg.run.out_dir)
        self.calls.append(out)
        (out / "attempted").touch()
        if self.fail_on and self.fail_on in str(out):
            self.fail_on = None
            raise RuntimeError("killed")
        labels = data.load_train(cfg.run.data_dir).labels
        seq = labels["sequence_id"].to_numpy().astype(str)
        folds = cv.load_or_make_folds(
            out / "folds.csv", seq, labels["subject"].to_numpy(), labels["gesture"].to_numpy(), 2, cfg.run.fold_seed
        )
        y = np.array([GESTURES.index(g) for g in labels["gesture"].to_list()])
        rng = np.random.default_rng(cfg.run.seed)
        wrong = 0.0 if cfg.centroid.temperature < 1 else 0.5
        onehot = np.eye(N_CLASSES)[y]
        fold_ids, fhash = cv.fold_array(folds, seq), cv.folds_hash(folds)
        for m in names:
            p = np.where(rng.random((len(y), 1)) < wrong, rng.random((len(y), N_CLASSES)), onehot)
            cv.write_member_oof(out / "oof", m, seq, y, fold_ids, p, p, fhash, {"train_seconds": 0.5})
            if self.blend:
                cv.write_member_oof(out / "ensemble" / "oof", "blend", seq, y, fold_ids, p, p, fhash)


def _spec(out: Path, data_dir: Path, variants: list[Variant], **kw) -> AblationSpec:
    return AblationSpec(
        out_dir=out,
        data_dir=data_dir,
        variants=[Variant("base"), *variants],
        seeds=kw.pop("seeds", [1, 2]),
        members=[TEST_MEMBER],
        base_env=QUICK_ENV,
        config_class=ConfigWithCentroid,
        n_resamples=100,
        **kw,
    )


def test_runs_share_the_folds_are_reused_and_redone_when_their_settings_change(small_data, tmp_path, no_plot):
    out = tmp_path / "abl"
    train = FakeTrain()
    variants = [
        Variant("sharp", {"CENTROID_TEMPERATURE": "0.5"}),
        Variant("nomirror", {"FEAT_MIRROR_LEFT_HANDED": "0"}),
    ]
    res = ablation.run_ablation(_spec(out, small_data, variants), train)
    assert len(train.calls) == 6 and not any(r["reused"] for r in res.runs)
    shared = (out / "folds.csv").read_bytes()
    for v in ("base", "sharp", "nomirror"):
        for s in (1, 2):
            d = out / "runs" / v / f"seed{s}"
            assert (d / "folds.csv").read_bytes() == shared
            done = json.loads((d / "done.json").read_text())
            assert done["seed"] == s and done["variant"] == v and done["members"] == [TEST_MEMBER]
            assert done["settings"]["CMI_N_FOLDS"] == "2" and "CMI_N_THREADS" not in done["settings"]
    assert json.loads((out / "runs/nomirror/seed1/done.json").read_text())["overrides"] == {
        "FEAT_MIRROR_LEFT_HANDED": "0"
    }
    by = {(r["variant"], r["model"], r["metric"]): r for r in res.rows}
    assert {r["model"] for r in res.rows} == {TEST_MEMBER, "blend"}
    sharp = by[("sharp", TEST_MEMBER, "test_like")]
    assert sharp["ci_low"] > 0 and sharp["result"] is False  # two seeds: no result, however clear
    assert by[("sharp", "blend", "full")]["ci_low"] > 0
    assert by[("nomirror", TEST_MEMBER, "full")]["diff_mean"] == 0.0  # the fake ignores mirroring
    assert res.paths["csv"].exists() and res.paths["png"].exists() and res.paths["json"].exists()

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/done.json")}
    again = ablation.run_ablation(_spec(out, small_data, variants), train)
    assert len(train.calls) == 6 and all(r["reused"] for r in again.runs)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/done.json")} == mtimes
    assert again.rows == res.rows

    changed = [Variant("sharp", {"CENTROID_TEMPERATURE": "0.25"}), variants[1]]
    ablation.run_ablation(_spec(out, small_data, changed), train)
    assert train.calls[6:] == [out / "runs/sharp/seed1", out / "runs/sharp/seed2"]
    ablation.run_ablation(_spec(out, small_data, [Variant("dflt", {})]), train)
    assert train.calls[8:] == [out / "runs/dflt/seed1", out / "runs/dflt/seed2"]
    # an override that sets the default value changes no setting: reused
    ablation.run_ablation(_spec(out, small_data, [Variant("dflt", {"CENTROID_TEMPERATURE": "1.0"})]), train)
    assert len(train.calls) == 10
    ablation.run_ablation(_spec(out, small_data, [], seeds=[1], force=True), train)
    assert train.calls[10:] == [out / "runs/base/seed1"]


def test_an_interrupted_run_resumes_in_place_and_a_bad_setting_trains_nothing(small_data, tmp_path, no_plot):
    out = tmp_path / "abl"
    train = FakeTrain(blend=False)
    train.fail_on = "runs/v/seed1"
    spec = _spec(out, small_data, [Variant("v", {"CENTROID_TEMPERATURE": "0.5"})], seeds=[1])
    with pytest.raises(RuntimeError, match="killed"):
        ablation.run_ablation(spec, train)
    assert not (out / "runs/v/seed1/done.json").exists() and (out / "runs/v/seed1/attempted").exists()
    (out / "runs/v/seed1/attempted").unlink()
    (out / "runs/v/seed1/partial").touch()  # what the member scaffold would resume from
    res = ablation.run_ablation(spec, train)
    assert (out / "runs/v/seed1/partial").exists()  # same settings: not wiped
    assert [r["reused"] for r in res.runs] == [True, False]
    assert {r["model"] for r in res.rows} == {TEST_MEMBER}  # no blend OOF (one member): members only
    n = len(train.calls)
    with pytest.raises(ConfigError, match="CENTROID_TEMPERATUR"):
        ablation.run_ablation(_spec(out, small_data, [Variant("w", {"CENTROID_TEMPERATUR": "2"})]), train)
    assert len(train.calls) == n and not (out / "runs/w").exists()


def test_a_run_that_lost_the_shared_folds_or_a_member_is_an_error(small_data, tmp_path):
    out = tmp_path / "abl"

    def no_oof(cfg: Config, names: list[str]) -> None:
        pass

    with pytest.raises(AblationError, match=r"no OOF for \['centroid'\]"):
        ablation.run_ablation(_spec(out, small_data, [], seeds=[1]), no_oof)

    def refolds(cfg: Config, names: list[str]) -> None:
        folds = pl.read_csv(Path(cfg.run.out_dir) / "folds.csv")
        folds.with_columns((1 - pl.col("fold")).alias("fold")).write_csv(Path(cfg.run.out_dir) / "folds.csv")

    with pytest.raises(AblationError, match="not the shared"):
        ablation.run_ablation(_spec(out, small_data, [], seeds=[1], force=True), refolds)
    with pytest.raises(AblationError, match="member lgbm_nope|unknown member"):
        ablation.check_members(["centroid", "lgbm_nope"], explicit=True)


# --------------------------------------------------------------------------- through stage_train and the CLI

TRAIN_ENV = {
    **QUICK_ENV,
    "CMI_N_FOLDS": "3",
    "ENSEMBLE_WEAR_DETECT": "0",
    "ENSEMBLE_SUBJECT_PP_ORDERS": "1",
    "ENSEMBLE_N_STARTS": "1",
    "ENSEMBLE_RANDOM_SEARCH_DRAWS": "10",
}


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    from tools import synth

    d = tmp_path_factory.mktemp("abl_synth")
    synth.write_dataset(d, n_subjects=3, seed=5, n_test_subjects=1)
    return d


@pytest.mark.slow
def test_ablate_through_stage_train_keeps_the_folds_of_a_feature_variant(synth_data, tmp_path):
    out = tmp_path / "abl"

    def train(cfg: Config, names: list[str]) -> None:
        main.stage_train(cfg, names, main.StageTimer(Path(cfg.run.out_dir) / "timings.json"))

    spec = AblationSpec(
        out_dir=out,
        data_dir=synth_data,
        variants=[Variant("base"), Variant("nomirror", {"FEAT_MIRROR_LEFT_HANDED": "0"})],
        seeds=[1],  # the seeds' bookkeeping is the quick tests' part
        members=[TEST_MEMBER],
        base_env=TRAIN_ENV,
        config_class=ConfigWithCentroid,
        n_resamples=100,
    )
    res = ablation.run_ablation(spec, train)
    shared = (out / "folds.csv").read_bytes()
    for d in out.glob("runs/*/seed*"):
        assert (d / "folds.csv").read_bytes() == shared
        assert json.loads((d / "config.json").read_text())["run"]["out_dir"] == str(d)
        assert (d / "timings.json").exists() and (d / "bundles" / TEST_MEMBER / "metadata.json").exists()
    assert len(list(out.glob("runs/*/seed*/done.json"))) == 2
    assert json.loads((out / "runs/nomirror/seed1/config.json").read_text())["features"]["mirror_left_handed"] is False
    assert {(r["variant"], r["model"]) for r in res.rows} >= {("base", TEST_MEMBER), ("nomirror", TEST_MEMBER)}
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/done.json")}
    again = ablation.run_ablation(spec, train)
    assert all(r["reused"] for r in again.runs) and again.rows == res.rows
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/done.json")} == mtimes


@pytest.mark.slow
def test_cli_ablate_with_lightgbm(synth_data, tmp_path):
    out = tmp_path / "abl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CMI_", "LGBM_", "DL_", "KERAS_", "USE_"))}
    env.update({**TRAIN_ENV, "LGBM_DEBUG_N_ESTIMATORS": "15", "LGBM_NUM_LEAVES": "7", "LGBM_MIN_CHILD_SAMPLES": "3"})
    args = ["main.py", "ablate", "--data-dir", str(synth_data), "--out", str(out), "--members", "lgbm", "--debug"]
    args += ["--seeds", "1", "--variant", "notail:FEAT_TAIL_FRACTION=1.0", "--n-resamples", "50"]
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "notail" in r.stdout and "95% CI" in r.stdout and "ablation.csv" in r.stdout
    assert "intervals: two-level bootstrap" in r.stdout and "CAUTION: 1 seed(s), fewer than 3" in r.stdout
    csv = pl.read_csv(out / "ablation.csv")
    assert set(csv["variant"]) == {"base", "notail"} and set(csv["model"]) <= {"lgbm", "blend"}
    assert (out / "runs/notail/seed1/done.json").exists() and (out / "ablation.png").exists()
    timings = json.loads((out / "timings.json").read_text())
    assert "ablate: notail seed 1" in timings and "ablate: statistics" in timings


def test_ablate_names_its_data_set_and_warns_on_the_reporting_set(tmp_path):
    """Defaults are tuned on generated data other than the set README/RESULTS report (`make run`'s)."""
    import json

    (tmp_path / "synth_info.json").write_text(json.dumps({"seed": 0, "n_subjects": 12}))
    assert ablation.data_provenance(tmp_path)["reporting_set"] is True
    (tmp_path / "synth_info.json").write_text(json.dumps({"seed": 100, "n_subjects": 24}))
    d = ablation.data_provenance(tmp_path)
    assert d["reporting_set"] is False and d["seed"] == 100
    assert ablation.data_provenance(tmp_path / "real")["generated"] is False
