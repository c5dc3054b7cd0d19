"""Typed configuration: YAML files in `msprior/configs/` (package data) loaded into dataclasses.

Unknown keys and mistyped values fail at load with a message naming the key and the file.
`overrides` take dotted `section.key=value` strings (the value is parsed as YAML, so `4`, `1e-3`,
`true` and `[0.9, 0.99]` keep their types). A `Config` round-trips through `to_dict` / `to_yaml`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

from msprior import conditioning
from msprior.strict import ConfigError, build, choice, suggest


@dataclass
class ModelConfig:
    family: str = "transformer"  # "transformer" (ALiBi decoder) or "gru"
    dim: int = 512  # width of the residual stream
    num_layers: int = 8
    num_heads: int = 8  # attention heads (transformer only)
    head_dim: int = 32  # per-head width; heads x head_dim need not equal dim
    ff_mult: int = 4  # feed-forward hidden width = ff_mult x dim
    seq_len: int = 256  # frames of context: training window and streaming KV-cache length
    dropout: float = 0.01
    conditioning: str = "none"  # "none", "tokens" (discrete stream) or "features" (continuous)
    cond_ratio: int = 4  # decoder frames per conditioning frame (must match the latent table)
    cond_layers: int = 2  # transformer layers of the conditioning encoder
    pretrained_embedding_dim: int = 0  # >0: embedding = frozen RAVE codebooks of this dim, projected
    predictor: str = "film"  # "film": one nonlinear FiLM per quantizer; "linear_film": shared linear FiLM (older runs)

    def validate(self, where: str) -> None:
        choice(where, "model.family", self.family, ("transformer", "gru"))
        choice(where, "model.conditioning", self.conditioning, conditioning.KINDS)
        choice(where, "model.predictor", self.predictor, ("film", "linear_film"))
        for key in ("dim", "num_layers", "num_heads", "head_dim", "ff_mult", "seq_len", "cond_ratio"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}: model.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}: model.dropout must be in [0, 1), got {self.dropout}")
        if self.family == "gru" and self.conditioning != "none":
            raise ConfigError(
                f"{where}: model.conditioning={self.conditioning!r} needs model.family='transformer' "
                "(the GRU prior has no cross-attention)"
            )
        if self.conditioning != "none" and self.cond_layers < 1:
            raise ConfigError(f"{where}: model.cond_layers must be >= 1 with conditioning")


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 10_000  # linear warm-up from warmup_start x lr to lr
    warmup_start: float = 0.01
    decay: float = 0.9999985  # exponential decay per step after the warm-up
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # How the lr follows the number of workers W (the global batch is W x train.batch_size):
    # "sqrt" (default): lr x sqrt(W). AdamW divides each update by the gradient's RMS, so its step
    # does not grow with the batch the way SGD's does; W times the batch lowers the gradient noise
    # by sqrt(W), and raising the lr by sqrt(W) keeps the noise of an update where `lr` was tuned
    # (on one worker). "linear": lr x W (SGD's rule; too aggressive for Adam beyond a few workers).
    # "none": lr as written.
    lr_scaling: str = "sqrt"

    def validate(self, where: str) -> None:
        if self.lr <= 0:
            raise ConfigError(f"{where}: optim.lr must be > 0, got {self.lr}")
        choice(where, "optim.lr_scaling", self.lr_scaling, LR_SCALING)
        for key in ("weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}: optim.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 < self.warmup_start <= 1:
            raise ConfigError(f"{where}: optim.warmup_start must be in (0, 1], got {self.warmup_start}")
        if len(self.betas) != 2:
            raise ConfigError(f"{where}: optim.betas must be two floats, got {self.betas}")
        if not 0 < self.decay <= 1:
            raise ConfigError(f"{where}: optim.decay must be in (0, 1], got {self.decay}")


LR_SCALING = ("sqrt", "linear", "none")


def scaled_lr(optim: OptimConfig, num_workers: int) -> float:
    """The peak lr a run of `num_workers` workers uses (see OptimConfig.lr_scaling)."""
    w = max(1, int(num_workers))
    factor = {"sqrt": math.sqrt(w), "linear": float(w), "none": 1.0}[optim.lr_scaling]
    return optim.lr * factor


@dataclass
class TrainConfig:
    # windows per worker per step: the global batch is num_workers x batch_size, so adding
    # workers adds data per step (the lr follows optim.lr_scaling)
    batch_size: int = 64
    max_steps: int = 1_000_000
    val_every: int = 1000  # steps between validations
    # steps between checkpoints (0: val_every); a checkpoint step validates too, so every
    # checkpoint carries its own val_loss. Checkpoints upload in the background (one at a time).
    checkpoint_every: int = 0
    val_batches: int = 16  # batches per validation
    patience: int = 20  # validations without improvement before early stopping; 0 = never stop
    ema: float = 0.0  # EMA decay of the weights used for validation/export; 0 = off
    log_every: int = 50  # steps between metric logs
    seed: int = 0
    # a fresh training starts each quantizer's output bias at the log unigram of its training tokens
    # (Prior.init_output_bias: no weight, no inference cost; docs/QUALITY.md: every quantizer below
    # the original, 0.02 nats of the mean); false: zero biases (runs before it)
    unigram_bias: bool = True
    compile: str = "auto"  # torch.compile the training step: auto (on CUDA only), true, false
    # DDP gradients on the wire: bf16 halves the bytes per step (msprior.train.ddp); auto = bf16 on
    # CUDA (NCCL), none on CPU (gloo); bf16 works on gloo too (tests/test_ddp.py)
    grad_compression: str = "auto"


    def validate(self, where: str) -> None:
        for key in ("batch_size", "max_steps", "val_every", "val_batches", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}: train.{key} must be >= 1, got {getattr(self, key)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"{where}: train.checkpoint_every must be >= 0 (0: every val_every), got "
                              f"{self.checkpoint_every}")
        choice(where, "train.grad_compression", self.grad_compression, ("auto", "bf16", "none"))
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"{where}: train.ema must be in [0, 1), got {self.ema}")
        choice(where, "train.compile", self.compile, ("auto", "true", "false"))


@dataclass
class DataConfig:
    val_fraction: float = 0.05  # share of SOURCE FILES held out for validation (never chunks)
    seed: int = 0  # seed of the deterministic file split

    def validate(self, where: str) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"{where}: data.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class Config:
    name: str = "decoder_only"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self, where: str = "config") -> "Config":
        for section in (self.model, self.optim, self.train, self.data):
            section.validate(where)
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> Dict[str, Any]:
        """`{"model.dim": 512, ...}`: for MLflow params and sweep search spaces."""
        out: Dict[str, Any] = {"name": self.name}
        for section in ("model", "optim", "train", "data"):
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                out[f"{section}.{key}"] = value
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any], where: str = "config") -> "Config":
        return build(cls, data, where, prefix="").validate(where)


# --- loading -----------------------------------------------------------------------------------

# The shipped YAMLs are package data (msprior/configs/): a wheel, an editable install and a Ray job's
# working dir all find them next to this file, whatever the current directory is.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def config_dir() -> Path:
    if CONFIG_DIR.is_dir():
        return CONFIG_DIR
    raise ConfigError(f"{CONFIG_DIR}: the shipped configs are missing: reinstall msprior")


def available_configs() -> List[str]:
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def available_sweeps() -> List[str]:
    return sorted(p.stem for p in (config_dir() / "sweeps").glob("*.yaml"))


def _existing_file(p: Path) -> Optional[Path]:
    """A path the user typed: as given, else a repository-style `configs/...` path inside the
    package (so `--config configs/recurrent.yaml` still works outside a checkout)."""
    if p.is_file():
        return p
    if not p.is_absolute() and p.parts[:1] == ("configs",):
        shipped = config_dir().joinpath(*p.parts[1:])
        if shipped.is_file():
            return shipped
    return None


def _is_path(p: Path) -> bool:
    return p.suffix in (".yaml", ".yml") or p.is_file()


def _resolve(name_or_path: Union[str, Path], folder: Path, what: str, names: List[str]) -> Path:
    """A shipped name (`decoder_only`, `default`) -> its file in `folder`; a path -> that file."""
    p = Path(name_or_path)
    if _is_path(p):
        found = _existing_file(p)
        if found is None:
            raise ConfigError(f"{what} file not found: {p}")
        return found
    candidate = folder / f"{p.name if p.parts[:1] == (folder.name,) and len(p.parts) == 2 else name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(f"unknown {what} {str(name_or_path)!r}: use one of {', '.join(names)} "
                          "or a path to a .yaml file")
    return candidate


def resolve_config_path(name_or_path: Union[str, Path]) -> Path:
    """`decoder_only` -> the shipped file; a path (`my.yaml`, `configs/recurrent.yaml`) -> that file."""
    return _resolve(name_or_path, config_dir(), "config", available_configs())


def resolve_sweep_path(name_or_path: Union[str, Path]) -> str:
    """`default` (or `sweeps/default`) -> the shipped sweep file; a path -> that file."""
    return str(_resolve(name_or_path, config_dir() / "sweeps", "sweep", available_sweeps()))


def load_config(name_or_path: Union[str, Path], overrides: Sequence[str] = ()) -> Config:
    """Load a shipped config by name (`decoder_only`) or a YAML path, then apply overrides.

    `recurrent+mine.yaml` (the original's repeated --config) loads the first and sets every key the
    later ones write, in order; `decoder_only.gin` is the shipped `decoder_only`.
    """
    names = [n for n in str(name_or_path).split(LAYER)] if not Path(name_or_path).is_file() else [name_or_path]
    if len(names) > 1:
        layered = [o for n in names[1:] for o in _layer_overrides(n)]
        return load_config(names[0], layered + list(overrides))
    path = resolve_config_path(_gin_name(names[0]))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, optim, train, data)")
    data.setdefault("name", path.stem)
    cfg = build(Config, data, str(path), prefix="")
    cfg = apply_overrides(cfg, overrides, where=str(path))
    return cfg.validate(str(path))


LAYER = "+"  # msprior.flags.JOIN: how the command line joins a repeated --config


def _gin_name(name: Union[str, Path]) -> Union[str, Path]:
    """The original's `decoder_only.gin` is our shipped `decoder_only`; another .gin file is refused."""
    p = Path(name)
    if p.suffix != ".gin":
        return name
    if p.stem in available_configs() and not p.is_file():
        return p.stem
    raise ConfigError(f"--config {name}: gin files are not read here; write the keys as YAML "
                      f"(`msprior config --config {p.stem if p.stem in available_configs() else 'decoder_only'}` "
                      "prints one) and pass its path, or use --override section.key=value")


def _layer_overrides(name: str) -> List[str]:
    """The keys a later --config sets, as overrides (a shipped name or a YAML path)."""
    path = resolve_config_path(_gin_name(name))
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, optim, train, data)")
    return [f"{section}.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for section, keys in data.items() if section != "name" for key, value in (keys or {}).items()]


# the original's gin macros and bindings -> our keys (msprior/configs/*.yaml)
GIN_KEYS = {
    "MODEL_DIM": "model.dim", "NUM_LAYERS": "model.num_layers", "NUM_HEADS": "model.num_heads",
    "HEAD_DIM": "model.head_dim", "SEQ_LEN": "model.seq_len", "DROPOUT_RATE": "model.dropout",
    "torch.optim.AdamW.lr": "optim.lr", "torch.optim.AdamW.betas": "optim.betas",
    "utils.build_warmed_exponential_lr_scheduler.start_factor": "optim.warmup_start",
    "utils.build_warmed_exponential_lr_scheduler.peak_iteration": "optim.warmup_steps",
    "utils.build_warmed_exponential_lr_scheduler.decay_factor": "optim.decay",
}
GIN_FROM_DATA = {"NUM_TOKENS": "the vocabulary", "NUM_QUANTIZERS": "the number of quantizers"}


def from_gin(item: str) -> str:
    """An original gin binding (`NUM_LAYERS=4`, `torch.optim.AdamW.betas=(.9, .99)`) as our
    `section.key=value`; our own form passes through; one that has no equivalent is a one-line error."""
    key, _, raw = item.partition("=")
    key, raw = key.strip(), raw.strip()
    if key.count(".") == 1 and key.split(".")[0] in _sections():
        return item
    if key in GIN_FROM_DATA:
        raise ConfigError(f"--override {item!r}: {GIN_FROM_DATA[key]} is read from the latent table's manifest here; "
                          "drop this override")
    if key == "PRETRAINED_RAVE":
        raise ConfigError(f"--override {item!r}: use --pretrained_embedding PATH")
    ours = GIN_KEYS.get(key) or GIN_KEYS.get(key.replace("attention.", "").replace("msprior.", ""))
    if ours is None:
        raise ConfigError(f"--override {item!r}: no such setting here; use --override section.key=value with a key "
                          "of `msprior config` (e.g. model.num_layers=4)")
    if raw[:1] == "(" and raw[-1:] == ")":  # a gin tuple
        raw = "[" + raw[1:-1] + "]"
    return f"{ours}={raw}"


def _sections() -> List[str]:
    return ["model", "optim", "train", "data"]


def check_key(key: str, what: str) -> tuple:
    """(section, name) of a dotted `section.key`, or a ConfigError with a did-you-mean."""
    parts = key.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"{what}: expected section.key, e.g. model.num_layers")
    section, name = parts
    known = {f.name: f for f in dataclasses.fields(Config)}
    if section not in _sections():
        raise ConfigError(f"{what}: unknown section {section!r}{suggest(section, _sections())}")
    names = [f.name for f in dataclasses.fields(typing.get_type_hints(Config)[known[section].name])]
    if name not in names:
        raise ConfigError(f"{what}: unknown key {key.strip()!r}{suggest(name, names)}")
    return section, name


def apply_overrides(cfg: Config, overrides: Sequence[str], where: str = "config") -> Config:
    data = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--override {item!r}: expected section.key=value, e.g. model.num_layers=4")
        key, raw = from_gin(item).split("=", 1)
        section, name = check_key(key, f"--override {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        data[section][name] = value  # "2e-3" (a string to YAML 1.1): strict.check_value reads the number
    return build(Config, data, f"{where} (with --override)", prefix="").validate(where)
