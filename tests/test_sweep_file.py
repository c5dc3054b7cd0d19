"""The sweep file in Ray Tune's vocabulary (msprior/train/sweep_file.py): parsed and checked without Ray."""

from __future__ import annotations

import pytest
import yaml

from msprior.config import load_config, resolve_sweep_path
from msprior.train.request import TrainError
from msprior.train.sweep_file import Sampler, check_space, load_sweep, parse_space


def write(tmp_path, sweep) -> str:
    p = tmp_path / "sweep.yaml"
    p.write_text(sweep if isinstance(sweep, str) else yaml.safe_dump(sweep))
    return str(p)


def test_the_shipped_sweep_is_written_in_tunes_vocabulary():
    text = open(resolve_sweep_path("default")).read()
    assert "param_space:" in text and "{tune.choice: [256, 512]}" in text and "search:" not in text
    space = load_sweep(resolve_sweep_path("default"))["param_space"]
    assert space["model.dim"] == Sampler("choice", {"categories": [256, 512]})
    assert space["optim.lr"] == Sampler("loguniform", {"lower": 1e-4, "upper": 3e-3})
    check_space("default", load_config("decoder_only"), space)  # every value is a valid config


def test_tune_samplers_as_lists_or_keyword_mappings(tmp_path):
    path = write(tmp_path, """
param_space:
  optim.lr: {tune.loguniform: [1e-4, 3e-3]}      # YAML 1.1 reads 1e-4 as a string: a number here
  model.dropout: {tune.quniform: {lower: 0.0, upper: 0.2, q: 0.05}}
  model.num_layers: {tune.randint: [2, 5]}
  model.family: {tune.grid_search: [transformer, gru]}
  train.ema: 0.999
""")
    space = load_sweep(path)["param_space"]
    assert space["optim.lr"].args == {"lower": 1e-4, "upper": 3e-3}
    assert space["model.dropout"] == Sampler("quniform", {"lower": 0.0, "upper": 0.2, "q": 0.05})
    assert space["model.num_layers"].values() == [2, 4]  # randint's upper bound is exclusive
    assert space["model.family"].values() == ["transformer", "gru"]
    assert space["train.ema"] == 0.999


def test_the_older_spelling_still_reads(tmp_path):
    path = write(tmp_path, {"search": {"model.dim": {"choice": [64, 128]}, "optim.lr": {"uniform": [0.001, 0.01]},
                                       "model.num_layers": [2, 3]}})
    space = load_sweep(path)["param_space"]
    assert space == {"model.dim": Sampler("choice", {"categories": [64, 128]}),
                     "optim.lr": Sampler("uniform", {"lower": 0.001, "upper": 0.01}),
                     "model.num_layers": Sampler("choice", {"categories": [2, 3]})}


@pytest.mark.parametrize("space,match", [
    ({"model.dim": {"tune.pick": [1, 2]}}, r"unknown search space 'tune.pick'; use one of tune.choice"),
    ({"model.dim": {"tune.quniform": [1, 2]}}, r"tune.quniform needs q"),
    ({"model.dim": {"tune.uniform": {"low": 1, "high": 2}}}, r"tune.uniform takes a list or a mapping of \(lower, upper\)"),
    ({"model.dim": {"tune.randint": [1, 2, 3]}}, r"tune.randint takes \(lower, upper\), got 3 values"),
    ({"dim": {"tune.choice": [1, 2]}}, r"param_space key 'dim' must be section.key"),
])
def test_a_bad_search_space_is_one_line(tmp_path, space, match):
    with pytest.raises(TrainError, match=match) as e:
        load_sweep(write(tmp_path, {"param_space": space}))
    assert "\n" not in str(e.value)


def test_values_are_checked_against_the_config(tmp_path):
    cfg = load_config("decoder_only")
    with pytest.raises(TrainError, match=r"param_space.model.dropout=1.5.*model.dropout must be in \[0, 1\)"):
        check_space("s.yaml", cfg, {"model.dropout": parse_space({"tune.uniform": [0.0, 1.5]}, "x")})
    with pytest.raises(TrainError, match=r"model.dimm.*did you mean 'dim'"):
        check_space("s.yaml", cfg, {"model.dimm": parse_space({"tune.choice": [1]}, "x")})
    with pytest.raises(TrainError, match="loads and splits the table once"):
        check_space("s.yaml", cfg, {"data.seed": parse_space({"tune.choice": [0, 1]}, "x")})


def test_both_names_at_once_are_refused(tmp_path):
    with pytest.raises(TrainError, match="both search and param_space"):
        load_sweep(write(tmp_path, {"search": {}, "param_space": {"model.dim": [1]}}))


def test_the_space_becomes_tunes_own_objects():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    from msprior.train.sweep_file import param_space

    space = param_space({"a.x": Sampler("choice", {"categories": [1, 2]}), "a.y": Sampler("loguniform", {"lower": 1e-4, "upper": 1e-2}),
                         "a.z": Sampler("randint", {"lower": 1, "upper": 4}), "a.c": 3})
    assert isinstance(space["a.x"], Categorical) and space["a.x"].categories == [1, 2]
    assert isinstance(space["a.y"], Float) and (space["a.y"].lower, space["a.y"].upper) == (1e-4, 1e-2)
    assert isinstance(space["a.z"], Integer) and space["a.c"] == 3
    assert type(space["a.y"]) is type(tune.loguniform(1e-4, 1e-2))
