"""The sweep file (`msprior tune --sweep`), written in Ray Tune's own vocabulary.

    base: decoder_only                  # config name or path
    overrides: []                       # section.key=value applied to every trial
    param_space:                        # Tuner(param_space=...): section.key -> a Tune search space
      model.family: {tune.choice: [transformer, gru]}
      model.dim: {tune.choice: [256, 512]}
      optim.lr: {tune.loguniform: [1.0e-4, 3.0e-3]}
      model.dropout: {tune.quniform: {lower: 0.0, upper: 0.2, q: 0.05}}
      train.ema: 0.999                  # a constant
    scheduler: {grace_period: 2, reduction_factor: 2}   # ASHAScheduler's arguments, in validations
    num_samples: 8                      # TuneConfig(num_samples=...)
    resources: {num_workers: 1, cpus_per_worker: 0.5, gpus_per_trial: 0}   # worker_resources: "msprior_train=1"
    train: {max_steps: 20000, val_every: 1000, batch_size: 64}   # batch_size: per worker

A search space is `{tune.<function>: arguments}` with any of `ray.tune`'s samplers (`SAMPLERS`):
the arguments as a list (positional, as in `tune.loguniform(1e-4, 3e-3)`) or a mapping of their
keyword names (`{lower: 0.0, upper: 0.2, q: 0.05}`). The spelling before this one still reads:
`search:` for `param_space:`, `{choice: [...]}` for `{tune.choice: [...]}`, a bare list for a choice.
Every key and every value a sampler can take is checked against the config before Ray starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import yaml

from msprior.strict import number
from msprior.train.request import TrainError

# ray.tune's samplers and their arguments, in order (a list is positional, a mapping by name)
SAMPLERS: Dict[str, tuple] = {
    "choice": ("categories",), "grid_search": ("values",),
    "uniform": ("lower", "upper"), "quniform": ("lower", "upper", "q"),
    "loguniform": ("lower", "upper", "base"), "qloguniform": ("lower", "upper", "q", "base"),
    "randint": ("lower", "upper"), "qrandint": ("lower", "upper", "q"),
    "lograndint": ("lower", "upper", "base"), "qlograndint": ("lower", "upper", "q", "base"),
    "randn": ("mean", "sd"), "qrandn": ("mean", "sd", "q"),
}
OPTIONAL = {"base"}  # every other argument must be given
SWEEP_KEYS = {"base", "overrides", "param_space", "search", "scheduler", "num_samples", "resources", "train"}
# per trial; worker_resources: each Train worker's custom resources (a node pool's slot, `msprior train --worker_resources`)
RESOURCE_KEYS = {"num_workers", "cpus_per_worker", "gpus_per_trial", "worker_resources"}
LOADED_ONCE = ("model.conditioning", "model.cond_ratio")  # with data.*: what the shared table depends on


@dataclass(frozen=True)
class Sampler:
    """One search space: `ray.tune.<kind>(**args)`."""

    kind: str
    args: Dict[str, Any]

    def values(self) -> List[Any]:
        """The values worth checking against the config: every category, or a range's ends."""
        if self.kind in ("choice", "grid_search"):
            return list(next(iter(self.args.values())))
        if "mean" in self.args:
            return [self.args["mean"]]
        upper = self.args["upper"] - (1 if self.kind in ("randint", "lograndint") else 0)  # exclusive there
        return [self.args["lower"], upper]

    def __str__(self) -> str:  # as written in the sweep file's vocabulary (MLflow params, messages)
        return f"tune.{self.kind}({', '.join(f'{k}={v!r}' for k, v in self.args.items())})"

    def to_tune(self):
        from ray import tune

        return getattr(tune, self.kind)(**self.args)


def parse_space(spec: Any, where: str) -> Any:
    """A `param_space` value -> a Sampler, or the constant it is."""
    if isinstance(spec, list):
        return Sampler("choice", {"categories": spec})
    if not isinstance(spec, dict):
        return spec
    if len(spec) != 1:
        raise TrainError(f"{where} must be one search space like {{tune.choice: [a, b]}}, got {spec}")
    (name, args), = spec.items()
    kind = str(name).removeprefix("tune.")
    if kind not in SAMPLERS:
        raise TrainError(f"{where}: unknown search space {name!r}; use one of "
                         f"{', '.join('tune.' + k for k in SAMPLERS)}")
    names = SAMPLERS[kind]
    if kind in ("choice", "grid_search") and isinstance(args, list):
        args = [args]  # the categories are one argument
    if isinstance(args, list):
        if len(args) > len(names):
            raise TrainError(f"{where}: tune.{kind} takes ({', '.join(names)}), got {len(args)} values")
        args = dict(zip(names, args))
    if not isinstance(args, dict) or set(args) - set(names):
        raise TrainError(f"{where}: tune.{kind} takes a list or a mapping of ({', '.join(names)}), got {args}")
    missing = [n for n in names if n not in args and n not in OPTIONAL]
    if missing:
        raise TrainError(f"{where}: tune.{kind} needs {', '.join(missing)}")
    return Sampler(kind, {k: v if kind in ("choice", "grid_search") else number(v) for k, v in args.items()})


def load_sweep(path: str) -> Dict[str, Any]:
    """A sweep file, checked: known keys, search spaces parsed (`param_space` -> Sampler or constant)."""
    p = Path(path)
    if not p.exists():
        raise TrainError(f"--sweep {path}: file not found")
    try:
        sweep = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise TrainError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(sweep, dict):
        raise TrainError(f"{path}: expected a mapping (base, param_space, num_samples, ...)")
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise TrainError(f"{path}: unknown key(s) {sorted(unknown)} (known: {', '.join(sorted(SWEEP_KEYS))})")
    bad = set(sweep.get("resources") or {}) - RESOURCE_KEYS
    if bad:
        raise TrainError(f"{path}: unknown resources key(s) {sorted(bad)} (known: {', '.join(sorted(RESOURCE_KEYS))})")
    if "search" in sweep and "param_space" in sweep:
        raise TrainError(f"{path}: both search and param_space: keep param_space (search is its older name)")
    space = sweep.pop("search", None) or sweep.get("param_space") or {}
    if not isinstance(space, dict):
        raise TrainError(f"{path}: param_space must map section.key to a search space")
    for key in space:
        if "." not in str(key):
            raise TrainError(f"{path}: param_space key {key!r} must be section.key, e.g. model.dim")
    sweep["param_space"] = {k: parse_space(v, f"{path}: param_space.{k}") for k, v in space.items()}
    return sweep


def check_space(path: str, base_cfg, space: Dict[str, Any]) -> None:
    """Every key exists (did-you-mean) and every value it can take passes config validation."""
    from msprior.config import ConfigError, apply_overrides, check_key

    for key, spec in space.items():
        try:
            section, _ = check_key(key, f"{path}: param_space.{key}")
        except ConfigError as e:
            raise TrainError(str(e)) from None
        if section == "data" or key in LOADED_ONCE:
            raise TrainError(f"{path}: param_space.{key}: the sweep loads and splits the table once for all "
                             "trials; set it in overrides instead")
        for value in spec.values() if isinstance(spec, Sampler) else [spec]:
            try:
                apply_overrides(base_cfg, [f"{key}={json.dumps(value)}"], where=f"{path}: param_space.{key}={value!r}")
            except ConfigError as e:
                raise TrainError(str(e).splitlines()[0]) from None


def param_space(space: Dict[str, Any]) -> Dict[str, Any]:
    """The Tuner's `param_space`: Tune's search spaces and constants (needs Ray)."""
    return {k: v.to_tune() if isinstance(v, Sampler) else v for k, v in space.items()}
