import json

import pytest

from config import Config, ConfigError, apply_overrides, config_from_dict, load_config


def test_defaults_match_spec():
    cfg = Config()
    assert (cfg.lgbm.weight, cfg.torch.weight, cfg.keras.weight) == (0.20, 0.45, 0.35)
    assert (cfg.torch.epochs, cfg.torch.batch_size, cfg.torch.lr, cfg.torch.weight_decay) == (30, 64, 1e-3, 1e-2)
    assert cfg.keras.label_smoothing == 0.1 and cfg.torch.label_smoothing == 0.05


def test_overrides_and_notebook_switches():
    cfg = load_config(
        {
            "KERAS_MAX_EPOCHS": "7",
            "KERAS_LR": "3e-4",
            "USE_TORCH": "0",
            "LGBM_TRAIN": "false",
            "ENSEMBLE_W_KERAS": "0.5",
            "CMI_SEED": "9",
            "KERAS_IMU_FILTERS": "8,16,32",
            "KERAS_HOME": "/tmp/k",
            "PATH": "/bin",
        }
    )
    assert cfg.keras.max_epochs == 7 and cfg.keras.lr == 3e-4
    assert cfg.torch.use is False and cfg.lgbm.train is False
    assert cfg.keras.weight == 0.5 and cfg.run.seed == 9
    assert cfg.keras.imu_filters == (8, 16, 32)


@pytest.mark.parametrize(
    "env, name",
    [
        ({"KERAS_MAX_EPOCHZ": "3"}, "KERAS_MAX_EPOCHZ"),
        ({"DL_EPOCHS": "ten"}, "DL_EPOCHS"),
        ({"USE_KERAS": "maybe"}, "USE_KERAS"),
        ({"ENSEMBLE_W_LGBM": "nan"}, "ENSEMBLE_W_LGBM"),
    ],
)
def test_unknown_or_malformed_values_name_the_variable(env, name):
    with pytest.raises(ConfigError, match=name):
        apply_overrides(Config(), env)


def test_values_that_parse_but_make_no_sense():
    with pytest.raises(ConfigError, match="CMI_N_FOLDS"):
        load_config({"CMI_N_FOLDS": "1"})
    with pytest.raises(ConfigError, match="KERAS_DROPOUT"):
        load_config({"KERAS_DROPOUT": "1.5"})


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config({"DL_EPOCHS": "3"}, out_dir=str(tmp_path))
    cfg.save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    again = config_from_dict(data)
    assert again == cfg
    data["torch"]["epochz"] = 1
    with pytest.raises(ConfigError, match="torch.epochz"):
        config_from_dict(data)


def test_torch_section_is_named_after_the_member_and_dl_names_are_aliases():
    cfg = load_config(
        {
            "TORCH_EPOCHS": "5",
            "DL_BATCH_SIZE": "16",
            "DL_TRAIN": "0",
            "TORCH_HOME": "/tmp/th",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        }
    )
    assert (cfg.torch.epochs, cfg.torch.batch_size, cfg.torch.train) == (5, 16, False)
    with pytest.raises(ConfigError, match="TORCH_EPOCHZ"):
        load_config({"TORCH_EPOCHZ": "5"})
    with pytest.raises(ConfigError, match="ENSEMBLE_W_XGB"):
        load_config({"ENSEMBLE_W_XGB": "0.5"})


def test_config_json_of_the_earlier_layout_still_reads(tmp_path):
    data = Config().to_dict()
    for section in ("lgbm", "torch", "keras"):
        data[section].pop("weight")
    data["ensemble"].update(w_lgbm=0.1, w_torch=0.6, w_keras=0.3)
    cfg = config_from_dict(data)
    assert (cfg.lgbm.weight, cfg.torch.weight, cfg.keras.weight) == (0.1, 0.6, 0.3)


def _readme_settings() -> dict[str, str]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Settings") : text.index("## Output folder")]
    return dict(re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", section, flags=re.M))


def _changed_value(value):
    if isinstance(value, bool):
        return "0" if value else "1"
    if isinstance(value, int):
        return str(value + 3)
    if isinstance(value, float):
        return str(round(value * 1.5 + 0.01 if value >= 1 else value * 0.5 + 0.01, 4))
    if isinstance(value, tuple):
        return ",".join(str(v + 1) for v in value)
    return "/tmp/changed"


def test_readme_settings_table_lists_every_variable_with_its_default_and_each_sets_its_field():
    import dataclasses

    from config import canonical_variables

    table = _readme_settings()
    canonical = canonical_variables(Config())
    assert set(table) == set(canonical), (set(canonical) - set(table), set(table) - set(canonical))
    base = Config()
    for name, (section, field) in canonical.items():
        default = getattr(getattr(base, section), field)
        shown = (
            {True: "1", False: "0"}.get(default, None)
            if isinstance(default, bool)
            else (
                ",".join(map(str, default)) if isinstance(default, tuple) else ('""' if default == "" else str(default))
            )
        )
        assert table[name] == shown, (name, table[name], shown)
        raw = _changed_value(default)
        if name == "CMI_N_FOLDS":
            raw = "7"
        if name.startswith("FEAT_PAD_PERCENTILE"):
            raw = "90"
        raw = {
            "FEAT_ROT_FALLBACK": "identity",
            "LGBM_STOPPING": "fixed",
            "KERAS_LR_MIN_RATIO": "0.2",
            "CMI_EXECUTOR": "ray",
        }.get(name, raw)
        cfg = apply_overrides(Config(), {name: raw})
        changed = [
            (s, f.name)
            for s in dataclasses.asdict(cfg)
            for f in dataclasses.fields(getattr(cfg, s))
            if getattr(getattr(cfg, s), f.name) != getattr(getattr(base, s), f.name)
        ]
        assert changed == [(section, field)], (name, changed)


def test_notebook_switches_of_the_original_notebooks(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="config"):
        cfg = load_config(
            {
                "KERAS_BUNDLE_PATH": "/kaggle/input/x/keras",
                "TORCH_BUNDLE_PATH": "/kaggle/input/x/t",
                "LOAD_TORCH_FOLDS_IN_MEMORY": "0",
                "LOAD_KERAS_FOLDS_IN_MEMORY": "0",
                "FAIL_IF_TORCH_MISSING": "1",
                "KERAS_EARLY_EXIT_IF_BEST_EXISTS": "0",
                "TORCH_EPOCHS": "5",
            }
        )
    assert cfg.keras.bundle_path == "/kaggle/input/x/keras" and cfg.torch.bundle_path == "/kaggle/input/x/t"
    assert cfg.torch.folds_in_memory is False and cfg.keras.folds_in_memory is False
    assert cfg.torch.fail_if_missing is True and cfg.keras.skip_if_trained is False and cfg.torch.epochs == 5
    assert "KERAS_EARLY_EXIT_IF_BEST_EXISTS=0 is mapped to keras.skip_if_trained" in caplog.text
    assert "LOAD_TORCH_FOLDS_IN_MEMORY=0 is mapped" in caplog.text


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TORCH_TRAINN": "1"}, "TORCH_TRAINN; did you mean TORCH_TRAIN"),
        ({"USE_TORCHH": "1"}, "USE_TORCHH; did you mean USE_TORCH"),
        ({"LOAD_KERAS_FOLDS_IN_MEMROY": "0"}, "did you mean LOAD_KERAS_FOLDS_IN_MEMORY"),
        ({"FAIL_IF_KERAS_MISING": "1"}, "did you mean FAIL_IF_KERAS_MISSING"),
        ({"XGB_TRAIN": "1"}, "unknown environment variable XGB_TRAIN"),
        ({"TORCH_USE": "0"}, "this setting's variable is USE_TORCH"),
        ({"ENSEMBLE_WEIGHTS": "lgbm:0.4,xgb:0.6"}, "unknown member 'xgb'"),
        ({"ENSEMBLE_WEIGHTS": "lgbm=0.4"}, "not member:weight"),
        ({"ENSEMBLE_WEIGHTS": "lgbm:1", "ENSEMBLE_W_TORCH": "0.3"}, "set one or the other"),
    ],
)
def test_mistyped_switches_raise_naming_the_closest_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env)


def test_ensemble_weights_renormalised_and_unnamed_members_get_zero():
    cfg = load_config({"ENSEMBLE_WEIGHTS": "lgbm:0.4, torch:1.2"})
    assert (cfg.lgbm.weight, cfg.torch.weight, cfg.keras.weight) == pytest.approx((0.25, 0.75, 0.0))
