import dataclasses
import json
import logging
import re
import sys
from pathlib import Path

import pytest

import config
from config import Config, ConfigError, apply_overrides, config_from_dict, load_config


def test_defaults_match_spec():
    cfg = Config()
    assert (cfg.lgbm.weight, cfg.torch.weight, cfg.keras.weight) == (0.20, 0.45, 0.35)
    assert (cfg.torch.epochs, cfg.torch.batch_size, cfg.torch.lr, cfg.torch.weight_decay) == (30, 64, 1e-3, 1e-2)
    assert cfg.keras.label_smoothing == 0.1 and cfg.torch.label_smoothing == 0.05


def test_overrides_and_notebook_switches():
    cfg = load_config(
        {
            "KERAS_EPOCHS": "7",
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
    assert cfg.keras.epochs == 7 and cfg.keras.lr == 3e-4
    assert cfg.torch.use is False and cfg.lgbm.train is False
    assert cfg.keras.weight == 0.5 and cfg.run.seed == 9
    assert cfg.keras.imu_filters == (8, 16, 32)


@pytest.mark.parametrize(
    "env, name",
    [
        ({"KERAS_MAX_EPOCHZ": "3"}, "KERAS_MAX_EPOCHZ"),
        ({"KERAS_EPOCHZ": "3"}, "KERAS_EPOCHZ; did you mean KERAS_EPOCHS"),
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


ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"<!-- results:settings:(?P<part>[a-z]+) -->\n(?P<body>.*?)<!-- /results:settings:(?P=part) -->", re.S
)


def _settings_blocks(text: str) -> dict[str, str]:
    return {m.group("part"): m.group("body") for m in BLOCK.finditer(text)}


def _table(body: str) -> dict[str, str]:
    """variable -> default shown, of a generated settings table."""
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", body, flags=re.M)
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)), "a variable is listed twice"
    return dict(rows)


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


def test_settings_tables_list_every_variable_with_its_default_and_each_sets_its_field():
    from config import canonical_variables

    table = _table(_settings_blocks((ROOT / "docs" / "SETTINGS.md").read_text())["all"])
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
        if name == "CMI_PROFILE":
            continue  # sets many fields at once: its own tests below
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
            "BRANCHNET_PRESET": "gpu",
            "BRANCHNET_NORM": "scaler",
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
    with caplog.at_level(logging.INFO, logger="config"):
        cfg = load_config(
            {
                "KERAS_BUNDLE_PATH": "/kaggle/input/x/keras",
                "TORCH_BUNDLE_PATH": "/kaggle/input/x/t",
                "LOAD_TORCH_FOLDS_IN_MEMORY": "0",
                "LOAD_KERAS_FOLDS_IN_MEMORY": "0",
                "FAIL_IF_TORCH_MISSING": "1",
                "KERAS_SKIP_IF_TRAINED": "0",
                "TORCH_EPOCHS": "5",
            }
        )
    assert cfg.keras.bundle_path == "/kaggle/input/x/keras" and cfg.torch.bundle_path == "/kaggle/input/x/t"
    assert cfg.torch.folds_in_memory is False and cfg.keras.folds_in_memory is False
    assert cfg.torch.fail_if_missing is True and cfg.keras.skip_if_trained is False and cfg.torch.epochs == 5
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


# --------------------------------------------------------------------------- generated settings docs


def test_the_committed_settings_tables_are_the_rendered_ones():
    """docs/SETTINGS.md and the README carry config.settings_markdown's output (`python main.py results`)."""
    for doc, parts in (("docs/SETTINGS.md", {"all", "deprecated"}), ("README.md", {"readme"})):
        found = _settings_blocks((ROOT / doc).read_text())
        assert set(found) == parts, (doc, set(found))
        stale = [part for part, body in found.items() if body != config.settings_markdown(part)]
        assert not stale, f"{doc}: settings blocks {stale} differ from config.py; run `python main.py results`"


def test_a_hand_edited_settings_table_is_stale_and_regenerated(tmp_path):
    from tools import results

    readme = (ROOT / "README.md").read_text()
    body = _settings_blocks(readme)["readme"]
    edited = readme.replace("| `TORCH_EPOCHS` | `30` |", "| `TORCH_EPOCHS` | `31` |")
    assert edited != readme and _settings_blocks(edited)["readme"] != config.settings_markdown("readme")
    doc = tmp_path / "README.md"
    doc.write_text(edited)
    text, changed = results.regenerate(doc)
    assert changed == ["settings:readme"] and _settings_blocks(text)["readme"] == body
    with pytest.raises(results.ResultsError, match="unknown part 'nope'"):
        results.render("settings:nope")


def test_every_field_has_a_doc_and_every_readme_variable_exists():
    cfg = Config()
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        docs = config.field_docs(type(section))
        undocumented = [g.name for g in dataclasses.fields(section) if not docs.get(g.name)]
        assert not undocumented, (f.name, undocumented)
    assert set(config.README_VARIABLES) <= set(config.canonical_variables(cfg))
    # a field only re-declared in a subclass keeps its base's doc; one documented there has its own
    assert config.field_docs(config.LGBMConfig)["weight"] == config.field_docs(config.MemberConfig)["weight"]
    assert "three original members" in config.field_docs(config.BranchNetConfig)["weight"]


def test_rendered_rows_show_defaults_as_written_and_preset_values():
    rows = _table(config.settings_markdown("all"))
    assert rows["CMI_DATA_DIR"] == '""' and rows["KERAS_IMU_FILTERS"] == "128,256,256" and rows["USE_LGBM"] == "1"
    text = config.settings_markdown("all")
    assert (
        "| `BRANCHNET_EPOCHS` | `0` | fixed epochs per model, no early stopping (0 = the preset's: cpu 10, gpu 80) |"
        in text
    )
    outside_code = re.sub(r"`[^`]*`", "", text)
    assert "&lt;bundle dir&gt;" in text and "<" not in outside_code  # a bare <...> would vanish as an HTML tag
    lines = [line for line in text.splitlines() if line.startswith("| `")]
    assert lines and all(len(re.split(r"(?<!\\)\|", line)) == 5 for line in lines)  # three cells, | escaped
    assert config._markdown("a | b <c> `<d>`") == "a \\| b &lt;c&gt; `<d>`"


# --------------------------------------------------------------------------- checks beside the fields


def test_every_rule_names_a_field_of_its_section():
    cfg = Config()
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        names = {g.name for g in dataclasses.fields(section)}
        rules = section.checks()
        assert all(field in names for field, _, _ in rules), (f.name, [r[0] for r in rules if r[0] not in names])
        assert all(holds for _, holds, _ in rules), (f.name, [r for r in rules if not r[1]])  # defaults pass


def test_broken_rules_name_each_variable_and_value_at_once():
    with pytest.raises(ConfigError) as e:
        load_config({"CMI_N_FOLDS": "1", "BRANCHNET_MIXUP_PROB": "1.5", "DL_EPOCHS": "0", "ENSEMBLE_W_LGBM": "-1"})
    message = str(e.value)
    for part in (
        "CMI_N_FOLDS=1: must be at least 2",
        "BRANCHNET_MIXUP_PROB=1.5: must be in [0, 1]",
        "TORCH_EPOCHS=0: must be >= 1",
        "ENSEMBLE_W_LGBM=-1.0: must be >= 0",
    ):
        assert part in message, (part, message)
    with pytest.raises(ConfigError, match="KERAS_IMU_KERNELS=7,5: must have as many values as KERAS_IMU_FILTERS"):
        load_config({"KERAS_IMU_KERNELS": "7,5"})
    with pytest.raises(ConfigError, match="BRANCHNET_PRESET='tpu': must be one of auto, cpu, gpu"):
        load_config({"BRANCHNET_PRESET": "tpu"})
    with pytest.raises(ConfigError, match="CMI_EXECUTOR='dask'"):
        config_from_dict({"run": {"executor": "dask"}})


def test_branchnet_norms_are_the_networks():
    import branchnet_model as bm
    import branchnet_pipeline as bp

    assert config.BranchNetConfig.NORMS == bm.NORMS
    assert bp.PRESETS is config.BranchNetConfig.PRESETS


# --------------------------------------------------------------------------- resolution


def test_resolved_fills_the_preset_and_keeps_explicit_values(caplog):
    raw = load_config({"BRANCHNET_SEEDS": "2"})
    assert (raw.branchnet.preset, raw.branchnet.epochs) == ("auto", 0)  # load_config resolves nothing
    with caplog.at_level(logging.INFO, logger="config"):
        cfg = raw.resolved()
    b = cfg.branchnet
    assert b.preset == "cpu" and "BRANCHNET_PRESET=auto: cpu" in caplog.text  # this machine has no CUDA
    cpu = config.BranchNetConfig.PRESETS["cpu"]
    assert (b.epochs, b.width, b.rnn_hidden, b.tof_channels, b.batch_size, b.ema_decay) == (
        cpu["epochs"],
        cpu["width"],
        cpu["rnn_hidden"],
        cpu["tof_channels"],
        cpu["batch_size"],
        cpu["ema_decay"],
    )
    assert b.seeds == 2  # explicit wins
    assert raw.branchnet.epochs == 0 and cfg.lgbm == raw.lgbm  # a copy; other sections as they were
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="config"):
        assert cfg.resolved() == cfg and "BRANCHNET_PRESET" not in caplog.text  # idempotent, logged once
    gpu = load_config({"BRANCHNET_PRESET": "gpu", "BRANCHNET_EPOCHS": "5"}).resolved().branchnet
    assert (gpu.preset, gpu.epochs, gpu.width) == ("gpu", 5, config.BranchNetConfig.PRESETS["gpu"]["width"])


def test_auto_preset_follows_the_device(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    b = Config().resolved().branchnet
    assert b.preset == "gpu" and b.epochs == config.BranchNetConfig.PRESETS["gpu"]["epochs"]
    assert config.auto_preset() == ("gpu", "torch sees CUDA: Tesla T4")
    assert load_config({"BRANCHNET_PRESET": "cpu"}).resolved().branchnet.preset == "cpu"  # explicit wins
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)
    assert config.auto_preset() == ("cpu", "torch is not installed")


def test_config_json_shows_the_effective_values_and_reads_back(tmp_path):
    cfg = load_config({}).resolved()
    cfg.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["branchnet"]["preset"] == "cpu" and saved["branchnet"]["epochs"] == 10
    assert config_from_dict(saved) == cfg


# --------------------------------------------------------------------------- former names


def test_former_names_set_their_replacement_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="config"):
        cfg = load_config({"KERAS_MAX_EPOCHS": "7", "TORCH_EARLY_EXIT_IF_BEST_EXISTS": "0"})
    assert cfg.keras.epochs == 7 and cfg.torch.skip_if_trained is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert any("KERAS_MAX_EPOCHS is the former name of KERAS_EPOCHS" in w for w in warnings)
    assert any("TORCH_EARLY_EXIT_IF_BEST_EXISTS is the former name of TORCH_SKIP_IF_TRAINED" in w for w in warnings)
    with pytest.raises(ConfigError, match="KERAS_MAX_EPOCHS and KERAS_EPOCHS are both set"):
        load_config({"KERAS_MAX_EPOCHS": "7", "KERAS_EPOCHS": "8"})
    with pytest.raises(ConfigError, match="LGBM_EARLY_EXIT_IF_BEST_EXISTS and LGBM_SKIP_IF_TRAINED are both set"):
        load_config({"LGBM_EARLY_EXIT_IF_BEST_EXISTS": "0", "LGBM_SKIP_IF_TRAINED": "1"})
    assert load_config({"KERAS_SKIP_IF_TRAINED": "0"}).keras.skip_if_trained is False  # the new name, no alias


def test_torch_num_workers_is_accepted_ignored_and_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="config"):
        cfg = load_config({"TORCH_NUM_WORKERS": "4", "DL_NUM_WORKERS": "2"})
    assert cfg == Config() and not hasattr(cfg.torch, "num_workers")
    assert "TORCH_NUM_WORKERS=4 is no longer a setting" in caplog.text and "DL_NUM_WORKERS=2" in caplog.text


def test_config_json_of_the_field_names_before_the_renames_still_reads():
    data = Config().to_dict()
    data["keras"]["max_epochs"] = data["keras"].pop("epochs") + 1
    data["torch"]["num_workers"] = 0
    cfg = config_from_dict(data)
    assert cfg.keras.epochs == Config().keras.epochs + 1 and not hasattr(cfg.torch, "num_workers")


# --------------------------------------------------------------------------- profiles (CMI_PROFILE)


def test_quick_profile_sets_its_values_and_explicit_variables_win():
    from config import PROFILES

    quick = load_config({"CMI_PROFILE": "quick"})
    assert quick.run.profile == "quick"
    for section, values in PROFILES["quick"].items():
        for key, value in values.items():
            assert getattr(getattr(quick, section), key) == value, (section, key)
    assert quick.lgbm.stopping == "fixed" and quick.keras.imu_filters != Config().keras.imu_filters
    # an explicit variable wins over the profile, whatever the order of the environment
    mixed = load_config({"TORCH_EPOCHS": "3", "CMI_PROFILE": "quick", "CMI_N_JOBS": "1"})
    assert mixed.torch.epochs == 3 and mixed.run.n_jobs == 1
    assert mixed.torch.rnn_hidden == PROFILES["quick"]["torch"]["rnn_hidden"]


def test_full_profile_is_the_defaults_and_unknown_profiles_are_named():
    assert load_config({"CMI_PROFILE": "full"}).to_dict() == load_config({}).to_dict()
    with pytest.raises(ConfigError, match="CMI_PROFILE='fast'.*full, quick"):
        load_config({"CMI_PROFILE": "fast"})


def test_every_profile_names_real_fields_and_passes_the_checks():
    from config import PROFILES, apply_profile, validate

    for name in PROFILES:
        validate(apply_profile(Config(), name))
    broken = {"quick": {"torch": {"epoch": 3}}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("config.PROFILES", broken)
        with pytest.raises(ConfigError, match="torch has no field 'epoch'"):
            apply_profile(Config(), "quick")


def test_the_profile_is_saved_with_the_effective_values(tmp_path):
    cfg = load_config({"CMI_PROFILE": "quick"})
    cfg.save(tmp_path / "config.json")
    back = config_from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert back.run.profile == "quick" and back.to_dict() == cfg.to_dict()
