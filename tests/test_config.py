"""Typed configs: presets load, unknown keys are refused with their dotted path, overrides apply."""

import pytest

from advbct.config import ConfigError, TrainConfig, apply_overrides, list_presets, load_config
from advbct.presets import quickstart_config, train_config
from conftest import run_advbct


def test_presets_load_and_validate():
    assert {"quickstart", "smoke", "paper-cifar100", "cpu-large"} <= set(list_presets())
    for name in list_presets():
        cfg = quickstart_config(name, None, None, None, None)
        assert cfg.old.data == cfg.new.data


def test_cpu_large_is_the_quickstart_with_a_longer_old_model_and_the_papers_loss():
    quick, large = (quickstart_config(name, None, None, None, None) for name in ("quickstart", "cpu-large"))
    for role in ("old", "new"):
        q, g = getattr(quick, role), getattr(large, role)
        assert g.model == q.model and g.data == q.data and g.seed == q.seed
        schedule = {"epochs", "milestones"}
        assert g.optim.model_dump(exclude=schedule) == q.optim.model_dump(exclude=schedule)
    assert large.new.data.allocation == "extended-data" and large.new.data.max_train_per_class is None
    assert large.new.model.whitened_stem and large.new.optim.label_smoothing == 0.2
    assert (large.old.optim.epochs, large.new.optim.epochs) == (16, 15)
    assert (quick.old.optim.epochs, quick.new.optim.epochs) == (8, 16)
    assert large.old.compat == quick.old.compat
    assert large.new.compat.method == "advbct" and large.new.compat.options == {}
    assert quick.new.compat.method == "advbct-tight" and quick.new.compat.options == {}


def test_dotted_overrides_parse_yaml_values():
    cfg = train_config("new", "smoke", None, ["optim.lr=0.02", "optim.milestones=[3, 4]", "amp=false"], None, "cpu")
    assert cfg.optim.lr == 0.02 and cfg.optim.milestones == [3, 4] and cfg.amp is False and cfg.device == "cpu"


def test_unknown_keys_are_refused_with_their_path(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr: Extra inputs are not permitted"):
        load_config(TrainConfig, overrides=["optim.lrr=0.1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  embeding_dim: 12\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml.*model\.embeding_dim"):
        load_config(TrainConfig, bad)


def test_bad_values_and_malformed_overrides():
    with pytest.raises(ConfigError, match=r"data\.old_fraction"):
        load_config(TrainConfig, overrides=["data.old_fraction=1.5"])
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="unknown preset"):
        quickstart_config("nope", None, None, None, None)


def test_method_options_are_checked_against_the_methods_schema_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"compat: method 'advbct' has no option 'typo'; its options: tau, ") as err:
        load_config(TrainConfig, overrides=["compat.options.typo=1"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"method 'advbct' option tau: Input should be a valid number, .*got 'x'"):
        load_config(TrainConfig, overrides=["compat.options.tau=x"])
    with pytest.raises(ConfigError, match=r"unknown compatibility method 'nope'"):
        load_config(TrainConfig, overrides=["compat.method=nope"])
    with pytest.raises(ConfigError, match=r"new\.compat: method 'advbct-tight' has no option 'typo'"):
        quickstart_config("smoke", None, ["new.compat.options.typo=1"], None, None)
    cfg = load_config(TrainConfig, overrides=["compat.method=hot-refresh", "compat.options.top_k_negatives=null"])
    assert cfg.compat.options == {"top_k_negatives": None}  # kept as given: config.json shows what was set


def test_a_bad_method_option_stops_the_cli_with_one_line_before_any_work(tmp_path):
    out = tmp_path / "new"
    result = run_advbct("train-new", "--method", "lce", "--out", str(out), "-o", "compat.options.align_weigth=2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: invalid config (preset quickstart): compat: method 'lce' has no option 'align_weigth'; "
        "its options: boundary_weight, align_weight"
    ]
    assert not out.exists()
