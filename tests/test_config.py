"""Typed configs: shipped ones load, typos fail with the key and the file, overrides, round trip."""

import pytest

from msprior.config import Config, ConfigError, available_configs, load_config


def test_shipped_configs_load():
    names = available_configs()
    assert {"decoder_only", "recurrent", "encoder_decoder", "encoder_decoder_continuous"} <= set(names)
    d = load_config("decoder_only")
    assert (d.model.dim, d.model.num_layers, d.model.num_heads, d.model.head_dim) == (512, 8, 8, 32)
    assert (d.model.seq_len, d.model.dropout) == (256, 0.01)
    assert (d.optim.lr, d.optim.betas, d.optim.warmup_steps, d.optim.decay) == (1e-3, [0.9, 0.99], 10000, 0.9999985)
    assert load_config("recurrent").model.family == "gru"
    assert load_config("encoder_decoder").model.conditioning == "tokens"
    assert load_config("encoder_decoder_continuous").model.conditioning == "features"
    assert load_config("encoder_decoder").model.cond_ratio == 4


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "typo.yaml"
    p.write_text("model:\n  num_layer: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "typo.yaml" in msg and "model.num_layer" in msg and "num_layers" in msg and "\n" not in msg


def test_mistyped_value_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: optim.lr must be a number, got 'fast'"):
        load_config(p)
    p.write_text("model:\n  family: lstm\n")
    with pytest.raises(ConfigError, match="model.family must be one of"):
        load_config(p)
    p.write_text("oops:\n  x: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'oops'"):
        load_config(p)


def test_yaml_1_1_exponents_are_numbers_in_files_overrides_and_sweeps(tmp_path):
    """PyYAML reads `1e-4` (no dot) as a string; a config file, an override and a sweep's range all
    take it as the number it is (one rule: strict.number), and a non-number still fails."""
    from msprior.train.sweep_file import parse_space

    p = tmp_path / "mine.yaml"
    p.write_text("optim:\n  lr: 1e-4\n  betas: [9e-1, 0.99]\ntrain:\n  max_steps: 2e4\nmodel:\n  family: gru\n")
    cfg = load_config(p)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.train.max_steps) == (1e-4, [0.9, 0.99], 20000)
    assert load_config("decoder_only", ["optim.lr=3e-4"]).optim.lr == 3e-4
    assert parse_space({"tune.loguniform": ["1e-4", "3e-3"]}, "s").args == {"lower": 1e-4, "upper": 3e-3}
    p.write_text("train:\n  max_steps: 2e-3\n")
    with pytest.raises(ConfigError, match="train.max_steps must be an integer, got 0.002"):
        load_config(p)


def test_overrides():
    cfg = load_config("decoder_only", ["model.num_layers=4", "optim.betas=[0.8, 0.9]", "train.ema=0.999",
                                       "optim.lr=2e-3"])
    assert cfg.model.num_layers == 4 and cfg.optim.betas == [0.8, 0.9] and cfg.train.ema == 0.999
    assert cfg.optim.lr == 2e-3
    with pytest.raises(ConfigError, match="unknown key 'model.num_layer'.*num_layers"):
        load_config("decoder_only", ["model.num_layer=4"])
    with pytest.raises(ConfigError, match="model.num_layers must be an integer"):
        load_config("decoder_only", ["model.num_layers=four"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config("decoder_only", ["num_layers"])
    with pytest.raises(ConfigError, match="unknown config 'nope': use one of"):
        load_config("nope")


def test_round_trip_through_yaml():
    import yaml

    for name in available_configs():
        cfg = load_config(name, ["model.dim=128"])
        again = Config.from_dict(yaml.safe_load(cfg.to_yaml()))
        assert again == cfg
        assert again.flat()["model.dim"] == 128


def test_cli_config_errors_are_one_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "msprior", "config", "--override", "model.num_layer=3"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "num_layers" in r.stderr and "Traceback" not in r.stderr
