"""Every shipped preset resolves for every protocol and dataset; merge order and error messages."""

import pytest

from alignednorm.config import PROTOCOLS, build, resolve_config
from alignednorm.data.catalog import list_datasets
from alignednorm.errors import ConfigError
from alignednorm.methods import list_methods


@pytest.mark.parametrize("method", list_methods())
def test_every_preset_resolves(method):
    for protocol in PROTOCOLS:
        for dataset in list_datasets("paper"):
            _, train_cfg, _ = build(method, resolve_config(method, protocol, dataset))
            assert train_cfg.epochs >= 1


def test_published_per_dataset_values_are_applied():
    cfg = resolve_config("alignednorm", "base2new", "dtd")
    assert (cfg.method.proj_align_weight, cfg.method.token_align_weight) == (0.2, 0.15)  # Table 8
    assert (cfg.method.prc_beta, cfg.method.reg_weight) == (0.9, 7.0)  # MMRL++'s table
    assert resolve_config("alignednorm", "base2new", "sun397").train.epochs == 13
    imagenet = resolve_config("mmrlpp", "fewshot", "imagenet").train
    assert (imagenet.batch_size, imagenet.lr, imagenet.epochs) == (32, 1e-3, 5)
    assert resolve_config("mmrlpp", "fewshot", "eurosat").train.lr == 2e-3
    assert resolve_config("mmrlpp", "crossdataset", "imagenet").train.warmup_epochs == 0


def test_user_yaml_and_set_win(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("train:\n  epochs: 3\nmethod:\n  reg_weight: 0.5\n")
    cfg = resolve_config("mmrlpp", "base2new", "dtd", user, ["method.reg_weight=0.25"])
    assert cfg.train.epochs == 3 and cfg.method.reg_weight == 0.25


def test_config_errors_name_the_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--set train.epohcs=2.*did you mean 'train.epochs'"):
        resolve_config("mmrlpp", "base2new", "dtd", overrides=["train.epohcs=2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  proj_align_weight: 0.1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        resolve_config("mmrlpp", "base2new", "dtd", bad)
    with pytest.raises(ConfigError, match="reg_weight = -2.0 is out of range"):
        resolve_config("alignednorm", overrides=["method.reg_weight=-2"])
    with pytest.raises(ConfigError, match="expected key=value"):
        resolve_config("mmrlpp", overrides=["train.epochs"])


@pytest.mark.parametrize("method", list_methods())
def test_every_preset_resolves_on_the_mini_suite(method):
    import alignednorm.mini  # noqa: F401  (registers the mini datasets)

    for protocol in PROTOCOLS:
        for dataset in list_datasets("mini"):
            _, train_cfg, data_cfg = build(method, resolve_config(method, protocol, dataset))
            assert train_cfg.epochs >= 1 and data_cfg.hflip is False


def test_suite_file_then_method_suite_section():
    import alignednorm.mini  # noqa: F401

    # configs/suites/mini.yaml sizes training for every method, per protocol ...
    few = resolve_config("mmrlpp", "fewshot", "mini_counts")
    assert (few.train.batch_size, few.train.epochs, few.train.lr) == (16, 20, 2e-3)  # lr from mmrlpp's fewshot
    assert resolve_config("zeroshot", "crossdataset", "mini_objects").train.batch_size == 32
    # ... and per dataset within a protocol (mini_objects, the large ImageNet-like set, for base2new only).
    objects = resolve_config("alignednorm", "base2new", "mini_objects").train
    assert (objects.batch_size, objects.epochs) == (16, 10)
    assert resolve_config("alignednorm", "base2new", "mini_counts").train.batch_size == 4
    assert resolve_config("mmrlpp", "fewshot", "mini_objects").train.batch_size == 16
    assert resolve_config("mmrlpp", "base2new", "mini_objects", overrides=["train.batch_size=4"]).train.batch_size == 4
    # ... and the method's own suites.mini section comes after it; the user still wins.
    assert resolve_config("alignednorm", "base2new", "mini_counts").method.logit_scale is None
    assert resolve_config("alignednorm", "base2new", "mini_counts", overrides=["train.epochs=2"]).train.epochs == 2
    # Paper datasets are untouched by the mini suite.
    assert resolve_config("mmrlpp", "base2new", "dtd").data.hflip is True


def test_suite_file_holds_only_train_and_data(tmp_path, monkeypatch):
    import alignednorm.mini  # noqa: F401
    from alignednorm import config

    bad = tmp_path / "mini.yaml"
    bad.write_text("method: {reg_weight: 2.0}\n")
    monkeypatch.setattr(config, "suite_preset_path", lambda suite: bad)
    with pytest.raises(ConfigError, match=r"mini.yaml: unexpected top-level keys \['method'\]"):
        resolve_config("mmrlpp", "base2new", "mini_counts")


def test_reloaded_run_config_is_merged_over_the_schema_and_strict(tmp_path):
    from alignednorm.config import load_run_config

    path = tmp_path / "config.yaml"
    path.write_text("method: {prc_beta: 0.5}\ntrain: {epochs: 3}\n")
    cfg = load_run_config("mmrlpp", path)
    assert cfg.method.prc_beta == 0.5 and cfg.train.epochs == 3 and cfg.method.reg_weight == 1.0  # defaults fill in
    path.write_text("method: {prc_betta: 0.5}\n")  # a renamed field must not come back as its default
    with pytest.raises(ConfigError, match=r"config.yaml: unknown config key 'method.prc_betta'"):
        load_run_config("mmrlpp", path)
