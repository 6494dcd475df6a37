import json

import pytest

from config import Config, ConfigError, apply_overrides, config_from_dict, load_config


def test_defaults_match_spec():
    cfg = Config()
    assert (cfg.lgbm.weight, cfg.torch.weight, cfg.keras.weight) == (0.20, 0.45, 0.35)
    assert (cfg.torch.epochs, cfg.torch.batch_size, cfg.torch.lr, cfg.torch.weight_decay) == (30, 64, 1e-3, 1e-2)
    assert cfg.keras.label_smoothing == 0.1 and cfg.torch.label_smoothing == 0.05


def test_overrides_and_notebook_switches():
    cfg = load_config({"KERAS_MAX_EPOCHS": "7", "KERAS_LR": "3e-4", "USE_TORCH": "0", "LGBM_TRAIN": "false",
                       "ENSEMBLE_W_KERAS": "0.5", "CMI_SEED": "9", "KERAS_IMU_FILTERS": "8,16,32",
                       "KERAS_HOME": "/tmp/k", "PATH": "/bin"})
    assert cfg.keras.max_epochs == 7 and cfg.keras.lr == 3e-4
    assert cfg.torch.use is False and cfg.lgbm.train is False
    assert cfg.keras.weight == 0.5 and cfg.run.seed == 9
    assert cfg.keras.imu_filters == (8, 16, 32)


@pytest.mark.parametrize("env, name", [
    ({"KERAS_MAX_EPOCHZ": "3"}, "KERAS_MAX_EPOCHZ"),
    ({"DL_EPOCHS": "ten"}, "DL_EPOCHS"),
    ({"USE_KERAS": "maybe"}, "USE_KERAS"),
    ({"ENSEMBLE_W_LGBM": "nan"}, "ENSEMBLE_W_LGBM"),
])
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
    cfg = load_config({"TORCH_EPOCHS": "5", "DL_BATCH_SIZE": "16", "DL_TRAIN": "0", "TORCH_HOME": "/tmp/th",
                       "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})
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
