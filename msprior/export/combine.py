"""`msprior combine`: a prior export and a streaming RAVE export in one nn~ file.

The original MSPrior's `combine` (acids-msprior 1.1.3, msprior_scripts/combine.py) wrapped both
TorchScript files in one module: RAVE's `encode`, `decode`, `forward`, the prior as `prior`, and
the prior's attributes (`temperature`, `listen`, `learn_context`, `reset`), so that one `[nn~]`
object does everything. This module does the same and adds `generate`: control inlets in (the
prior's conditioning channels; one unused inlet for an unconditioned prior), audio out (the prior
generates, RAVE decodes, inside the model), so that a patch of two objects makes sound.

A RAVE that does not match the prior (sample rate, latent size, samples per frame, discrete or
continuous, codebook size) is refused in one line: the prior's export metadata records the RAVE
its latent table was encoded with.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from msprior.errors import UserError
from msprior.export.metadata import METADATA_FILE
from msprior.flags import flag

ATTRIBUTES = ("temperature", "listen", "learn_context", "reset")  # the prior's, as the original's combine
UNUSED_INLET = "(signal) unused: an unconditioned prior generates on its own"


class CombineError(UserError):
    """A prior or RAVE file that cannot be combined; one line naming the file."""


@dataclass
class CombineRequest:
    """What `msprior combine` is asked: a prior export + a streaming RAVE export -> one nn~ file."""

    prior: str = flag(help="The prior, as written by `msprior export` (.ts).")
    rave: str = flag(help="The RAVE model exported with --streaming (.ts): the one the prior's table was "
                          "encoded with (same sample rate, latent size, codebook).")
    out: Optional[str] = flag(None, "Output file (.ts). Default: NAME.ts from --name.")
    name: Optional[str] = flag(None, "The original's flag: writes NAME.ts (when --out is not given).")
    batch_size: Optional[int] = flag(None, "The original's flag; the prior's export fixes it (msprior export "
                                           "--batch_size): given, it must match.")


class CombinedModel(nn.Module):
    """nn~ methods encode/decode/forward (RAVE's), prior (the prior's forward), generate (prior ->
    RAVE decode); the prior's attributes, forwarded to it."""

    def __init__(self, prior: torch.jit.ScriptModule, rave: torch.jit.ScriptModule):
        super().__init__()
        self.prior_model = prior
        self.rave_model = rave
        self.num_quantizers = int(prior.num_quantizers)
        self._methods: List[str] = ["encode", "decode", "forward", "prior", "generate"]
        for method in ("encode", "decode", "forward"):
            self._register(method, getattr(rave, f"{method}_params"), getattr(rave, f"{method}_input_labels"),
                           getattr(rave, f"{method}_output_labels"))
        self._register("prior", prior.forward_params, prior.forward_input_labels, prior.forward_output_labels)
        cond_channels = int(prior.cond_channels)
        decode = [int(v) for v in rave.decode_params]
        self._register("generate", torch.tensor([max(cond_channels, 1), int(prior.ratio), decode[2], decode[3]]),
                       list(prior.forward_input_labels)[self.num_quantizers:] or [UNUSED_INLET],
                       rave.decode_output_labels)
        self._attributes: List[str] = ["none"] + list(ATTRIBUTES)
        for attr in ATTRIBUTES:
            self.register_buffer(f"{attr}_params", getattr(prior, f"{attr}_params").clone())

    def _register(self, method: str, params: Tensor, inputs: List[str], outputs: List[str]) -> None:
        self.register_buffer(f"{method}_params", torch.as_tensor(params).clone())
        setattr(self, f"{method}_input_labels", list(inputs))
        setattr(self, f"{method}_output_labels", list(outputs))

    @torch.jit.export
    def get_methods(self) -> List[str]:
        return self._methods

    @torch.jit.export
    def get_attributes(self) -> List[str]:
        return self._attributes

    @torch.jit.export
    def encode(self, x: Tensor) -> Tensor:
        return self.rave_model.encode(x)

    @torch.jit.export
    def decode(self, x: Tensor) -> Tensor:
        return self.rave_model.decode(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.rave_model.forward(x)

    @torch.jit.export
    def prior(self, x: Tensor) -> Tensor:
        return self.prior_model.forward(x)

    @torch.jit.export
    def generate(self, x: Tensor) -> Tensor:
        """Control channels [B, max(C, 1), n] -> audio [B, channels, n * ratio]."""
        return self.rave_model.decode(self.prior_model.generate(x))

    @torch.jit.export
    def set_sample_rate(self, sample_rate: int) -> int:
        """nn~ calls it once on load: the prior warms TorchScript up there (not in the audio thread)."""
        return self.prior_model.set_sample_rate(sample_rate)

    @torch.jit.export
    def get_temperature(self) -> List[float]:
        return self.prior_model.get_temperature()

    @torch.jit.export
    def set_temperature(self, value: float) -> int:
        return self.prior_model.set_temperature(value)

    @torch.jit.export
    def get_listen(self) -> List[str]:
        return self.prior_model.get_listen()

    @torch.jit.export
    def set_listen(self, value: str) -> int:
        return self.prior_model.set_listen(value)

    @torch.jit.export
    def get_learn_context(self) -> List[str]:
        return self.prior_model.get_learn_context()

    @torch.jit.export
    def set_learn_context(self, value: str) -> int:
        return self.prior_model.set_learn_context(value)

    @torch.jit.export
    def get_reset(self) -> List[str]:
        return self.prior_model.get_reset()

    @torch.jit.export
    def set_reset(self, value: str) -> int:
        return self.prior_model.set_reset(value)


# --- checks: one line naming the file ----------------------------------------------------------


def load_prior(path: str) -> Tuple[torch.jit.ScriptModule, Dict[str, Any]]:
    """(scripted prior, its export metadata); refuses anything `msprior export` did not write."""
    if not os.path.isfile(path):
        raise CombineError(f"--prior {path}: no such file; pass the .ts written by `msprior export`")
    files = {METADATA_FILE: ""}
    try:
        m = torch.jit.load(path, map_location="cpu", _extra_files=files)
    except Exception:
        raise CombineError(f"--prior {path}: not a TorchScript file; pass the .ts written by `msprior export`") from None
    if not files[METADATA_FILE]:
        raise CombineError(f"--prior {path}: no {METADATA_FILE} inside (not an msprior export; the original "
                           "MSPrior's priors cannot be combined here): export the run with `msprior export`")
    missing = [a for a in ("generate", "get_learn_context") if not hasattr(m, a)]
    if missing:
        raise CombineError(f"--prior {path}: exported by an older msprior (no {missing[0]}); "
                           "export the run again with `msprior export`")
    return m.eval(), json.loads(files[METADATA_FILE])


def rave_mismatch(meta: Dict[str, Any], facts: Dict[str, Any]) -> Optional[str]:
    """The first fact in which the RAVE differs from the one the prior was trained with, or None."""
    rave = meta.get("rave") or {}
    vocab = rave.get("vocab_size") if rave.get("vocab_size") is not None else meta.get("resolution")
    wanted = [("sample rate", meta.get("sr"), facts["sr"], "Hz"),
              ("samples per latent frame", meta.get("ratio"), facts["ratio"], ""),
              ("latent size", meta.get("num_quantizers"), facts["latent_size"], "dimensions"),
              ("kind", "continuous" if meta.get("continuous") else "discrete",
               "continuous" if facts["continuous"] else "discrete", "")]
    if not meta.get("continuous"):
        wanted.append(("token count (codebook size)", vocab, facts["codebook_size"], "tokens"))
    for what, prior_value, rave_value, unit in wanted:
        if prior_value is not None and prior_value != rave_value:
            return f"{what} {rave_value} {unit}".rstrip() + f", the prior's RAVE has {prior_value}"
    return None


def load_matching_rave(path: str, meta: Dict[str, Any], echo: Callable[[str], Any]) -> torch.jit.ScriptModule:
    from msprior import rave as rave_mod

    try:
        r = rave_mod.load_rave(path, allow_streaming=True)
    except rave_mod.RaveError as e:
        raise CombineError(f"--rave {e}") from None
    for method in ("encode", "decode", "forward"):
        if not hasattr(r.module, f"{method}_params"):
            raise CombineError(f"--rave {path}: no {method}_params (not an nn~ export of RAVE); export it with "
                               "`rave export --streaming`")
    facts = {"sr": r.sr, "ratio": r.ratio, "latent_size": r.latent_size, "continuous": not r.discrete,
             "codebook_size": r.codebook_size}
    mismatch = rave_mismatch(meta, facts)
    if mismatch:
        raise CombineError(f"--rave {path}: does not match the prior ({mismatch}); combine the prior with the "
                           f"streaming export of the RAVE model its table was encoded with ({meta.get('rave_file')})")
    if not rave_mod.is_streaming(r.module):
        echo(f"note: {path} is not a streaming export: nn~ will click between buffers (export RAVE with --streaming)")
    return r.module


# --- the command -------------------------------------------------------------------------------


def _out_path(req: CombineRequest) -> str:
    if req.out:
        return req.out
    if req.name:
        return req.name + ".ts"  # the original wrote NAME.ts
    raise CombineError("combine: give --out C.ts (or the original's --name NAME, which writes NAME.ts)")


def self_test(path: str) -> None:
    """What nn~ does on load: each method on zeros at batch 1, exact output length (on a reloaded copy,
    so that the streaming caches of the file written stay as they were)."""
    m = torch.jit.load(path, map_location="cpu")
    n = 8192
    with torch.inference_mode():
        for method in m.get_methods():
            in_ch, in_ratio, out_ch, out_ratio = [int(v) for v in getattr(m, f"{method}_params")]
            y = getattr(m, method)(torch.zeros(1, in_ch, n // in_ratio))
            if tuple(y.shape) != (1, out_ch, n // out_ratio):
                raise CombineError(f"self-test: {method} returned {tuple(y.shape)}, expected {(1, out_ch, n // out_ratio)}")


def combine(req: CombineRequest, echo: Callable[[str], Any] = print) -> str:
    """`msprior combine`: write one nn~ file holding the prior and RAVE; returns its path."""
    out = os.path.abspath(_out_path(req))
    prior, meta = load_prior(req.prior)
    if req.batch_size is not None and req.batch_size != int(prior.batch_size):
        raise CombineError(f"--batch_size {req.batch_size}: the prior was exported with --batch_size "
                           f"{int(prior.batch_size)}; export it again with --batch_size {req.batch_size}")
    rave = load_matching_rave(req.rave, meta, echo)
    scripted = torch.jit.script(CombinedModel(prior, rave).eval())
    meta = {**meta, "combined": {"rave_file": os.path.basename(req.rave), "prior_file": os.path.basename(req.prior),
                                 "methods": list(scripted.get_methods())}}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ts", dir=os.path.dirname(out))
    os.close(fd)
    try:
        torch.jit.save(scripted, tmp, _extra_files={METADATA_FILE: json.dumps(meta, indent=1)})
        self_test(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    echo(f"combined {req.prior} + {req.rave} -> {out} (methods {', '.join(scripted.get_methods())})")
    return out
