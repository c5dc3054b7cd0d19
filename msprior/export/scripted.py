"""The nn~ wrapper: a TorchScript module that streams a Prior in Max/MSP and PureData.

What nn~'s backend does with it (read off its C++ source):
  * `get_methods()` -> ["forward"], and `forward_params` = [in_ch, ratio, out_ch, ratio];
  * `forward(x [B, in_ch, n])` -> [B, Q + 1, n]: x holds one value per RAVE frame (nn~ takes the
    last sample of each `ratio` block); channels are the Q latent channels, then the conditioning
    channels (1 for tokens, F for features); the output is Q latent channels then perplexity;
  * `get_attributes()`, `<attr>_params` (type ids 0 bool, 1 int, 2 float, 3 str), `get_<attr>()`
    returning a LIST, `set_<attr>(value) -> int` (0 = accepted).

The patch contract is the original MSPrior's (acids-msprior 1.1.3, docs/NN_TILDE.md): attributes
`temperature` (1.0), `listen` (ON), `learn_context` (off), `reset` (off); the last outlet is the
original's perplexity, exp(entropy of the predictive distribution) averaged over quantizers.

Streaming state: the Prior's caches hold every frame of the stream; `h_last` is the context after
the latest one (`primed` says whether there is one). Listen feeds the buffer and outputs, for each
frame, the perplexity of the model's prediction of the NEXT frame (the original's listen outlet);
generate samples a frame from `h_last`, outputs it with the perplexity of the distribution it was
drawn from, and feeds it. A fresh (or reset) stream that generates starts from a seed frame of
zeros, as the original did; one that listens starts from the first frame it hears.

`listen`, `learn_context` and `reset` are booleans typed as strings (type id 3) on purpose: nn~'s
backend turns a Pd number into text ("0.000000") and its bool parser reads anything but "0" and
"false" as TRUE, so `set listen 0` from Pd would switch listening ON; a string attribute reaches
the setter untouched, and the setters here read "true"/"false", "1"/"0", "on"/"off" and Pd's
"1.000000"/"0.000000" alike.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from msprior.conditioning import TOKENS, ConditioningSpec
from msprior.model.prior import Prior
from msprior.latent_bins import dequantize, quantize

# nn~ attribute type ids
TYPE_BOOL, TYPE_INT, TYPE_FLOAT, TYPE_STR = 0, 1, 2, 3


def parse_bool(value: str) -> Optional[bool]:
    """'true'/'1'/'1.000000'/'on' -> True, 'false'/'0'/'0.000000'/'off' -> False, else None."""
    v = value.strip().lower()
    if v in ("true", "yes", "on"):
        return True
    if v in ("false", "no", "off"):
        return False
    if _is_decimal(v):
        return float(v) != 0.0
    return None


def _is_decimal(v: str) -> bool:
    """[+-]digits[.digits]: the numbers Max and Pd send (TorchScript has no try/except)."""
    if v.startswith("-") or v.startswith("+"):
        v = v[1:]
    digits = 0
    dots = 0
    for ch in v:
        if ch == ".":
            dots += 1
        elif ch in "0123456789":
            digits += 1
        else:
            return False
    return digits > 0 and dots <= 1


@torch.jit.interface
class StreamingPrior(nn.Module):
    """The prior's streaming methods. ScriptedPrior holds its prior through this interface so that
    TorchScript calls them (prim::CallMethod) instead of inlining them into every caller: each
    then has ONE profiled executor, which `warm_up` prepares before the first audio buffer."""

    def init_stream(self, batch_size: int) -> None:
        pass

    def stream_context(self, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        pass

    def predict(self, h: Tensor, temperature: float, given: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        pass


def _bool_str(b: bool) -> str:
    return "true" if b else "false"


def _register_nn_api(m: nn.Module, cond: ConditioningSpec) -> None:
    """What nn~ reads off the module (plain Python, run in `__init__` before scripting): the method
    list, `forward_params` [in_ch, ratio, out_ch, ratio], the inlet/outlet labels and the attributes
    with their type ids."""
    q, ratio = m.num_quantizers, m.ratio
    kind = "latent" if m.continuous else "token"
    m._methods = ["forward"]
    m.register_buffer("forward_params", torch.tensor([q + cond.channels, ratio, q + 1, ratio]))
    m.forward_input_labels = [f"(signal) rave {kind} {i + 1}" for i in range(q)] + list(cond.labels())
    m.forward_output_labels = [f"(signal) rave {kind} {i + 1}" for i in range(q)] + ["(signal) perplexity"]
    m._attributes = ["none", "temperature", "listen", "learn_context", "reset"]
    m.register_buffer("temperature_params", torch.tensor([TYPE_FLOAT]))
    m.register_buffer("listen_params", torch.tensor([TYPE_STR]))
    m.register_buffer("learn_context_params", torch.tensor([TYPE_STR]))
    m.register_buffer("reset_params", torch.tensor([TYPE_STR]))


class ScriptedPrior(nn.Module):
    prior: StreamingPrior

    def __init__(
        self,
        prior: Prior,
        ratio: int,
        sr: int,
        batch_size: int = 1,
        continuous: bool = False,
        resolution: int = 0,
        cond: ConditioningSpec = ConditioningSpec(),
        listen: bool = True,
        temperature: float = 1.0,
        latent_loc: Optional[List[float]] = None,
        latent_scale: Optional[List[float]] = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        prior = prior.eval()  # prepared for streaming by the caller (msprior.export.run.build_scripted)
        # scripted on its own: a module typed by an interface must be a ScriptModule already
        self.prior = torch.jit.script(prior)
        self.num_quantizers = prior.num_quantizers
        self.vocab_size = prior.vocab_size
        self.ratio = ratio
        self.sr = sr
        self.batch_size = batch_size
        self.continuous = continuous
        self.resolution = resolution if continuous else prior.vocab_size
        # continuous: the per-dimension affine the latent table was binned with ([Q], manifest)
        q0 = prior.num_quantizers
        self.register_buffer("latent_loc", torch.tensor(latent_loc if latent_loc is not None else [0.0] * q0))
        self.register_buffer("latent_scale", torch.tensor(latent_scale if latent_scale is not None else [1.0] * q0))
        self.cond_tokens = cond.kind == TOKENS
        self.cond_channels = cond.channels  # nn~ inlets after the Q latents: 0, 1 token or F features
        self.cond_vocab = max(cond.vocab_size, 1)
        _register_nn_api(self, cond)

        # -- attribute values and streaming state ---------------------------------------------
        self.temperature = float(temperature)
        self.listen = bool(listen)
        self.initial_listen = bool(listen)
        # the original fed it to a semantic VAE (its `--vae_path`, which msprior has not): kept so that
        # a patch's `set learn_context` is accepted; it changes nothing here
        self.learn_context = False
        self.pending_reset = False  # applied at the start of the next forward (audio thread)
        self.primed = False  # h_last holds the context after the latest frame
        self.register_buffer("h_last", torch.zeros(batch_size, 0))
        self.prior.init_stream(batch_size)

    # -- nn~ API --------------------------------------------------------------------------------

    @torch.jit.export
    def get_methods(self) -> List[str]:
        return self._methods

    @torch.jit.export
    def get_attributes(self) -> List[str]:
        return self._attributes

    @torch.jit.export
    def get_temperature(self) -> List[float]:
        return [self.temperature]

    @torch.jit.export
    def set_temperature(self, value: float) -> int:
        if not value >= 0.0:  # also refuses NaN
            return -1
        self.temperature = value
        return 0

    @torch.jit.export
    def get_listen(self) -> List[str]:
        return [_bool_str(self.listen)]

    @torch.jit.export
    def set_listen(self, value: str) -> int:
        b = parse_bool(value)
        if b is None:
            return -1
        self.listen = b
        return 0

    @torch.jit.export
    def get_learn_context(self) -> List[str]:
        return [_bool_str(self.learn_context)]

    @torch.jit.export
    def set_learn_context(self, value: str) -> int:
        b = parse_bool(value)
        if b is None:
            return -1
        self.learn_context = b
        return 0

    @torch.jit.export
    def get_reset(self) -> List[str]:
        return [_bool_str(self.pending_reset)]

    @torch.jit.export
    def set_reset(self, value: str) -> int:
        """'true' clears every cache before the next buffer (the audio thread applies it)."""
        b = parse_bool(value)
        if b is None:
            return -1
        self.pending_reset = b
        return 0

    @torch.jit.export
    def set_sample_rate(self, sample_rate: int) -> int:
        """nn~ calls this once on load, on the loading thread, before any audio. The model is defined
        per RAVE frame, so any rate is fine; the call warms TorchScript up (`warm_up`)."""
        if sample_rate <= 0:
            return -1
        self.warm_up()
        return 0

    @torch.jit.export
    def warm_up(self) -> None:
        """Run the streaming methods on zeros until TorchScript has profiled and optimised them (it
        does so on their first two calls, ~150-350 ms each at the default size: more than a 4096-
        sample buffer lasts), in both modes and at both batch sizes, then start a fresh stream.
        Attribute values are kept; the random generator advances."""
        listen, temperature = self.listen, self.temperature
        self.temperature = 1.0
        in_ch = int(self.forward_params[0])
        dev = self.h_last.device
        for _ in range(3):
            for mode in [False, True]:
                self.listen = mode
                self.forward(torch.zeros(1, in_ch, 2, device=dev))
                if self.batch_size > 1:
                    self.forward(torch.zeros(self.batch_size, in_ch, 2, device=dev))
            self.generate(torch.zeros(1, max(self.cond_channels, 1), 2, device=dev))
        self.listen, self.temperature = listen, temperature
        self.reset_stream()

    @torch.jit.export
    def reset_stream(self) -> None:
        """Back to the state of a freshly loaded model (empty caches, no frame yet)."""
        self.prior.init_stream(self.batch_size)
        self.h_last = torch.zeros(self.batch_size, 0, device=self.h_last.device)
        self.primed = False
        self.pending_reset = False

    # -- streaming ------------------------------------------------------------------------------

    def _cond(self, c: Tensor) -> Optional[Tensor]:
        """Conditioning channels [B, n, C] as the prior takes them (None when unconditioned)."""
        if self.cond_channels == 0:
            return None
        if self.cond_tokens:
            return c[:, :, 0].round().clamp(0, self.cond_vocab - 1).long()
        return c

    def _tokens(self, z: Tensor) -> Tensor:
        """Input latent channels [B, n, Q] -> int64 tokens."""
        if self.continuous:
            return quantize(z, self.resolution, self.latent_loc, self.latent_scale)
        return z.round().clamp(0, self.vocab_size - 1).long()

    def _feed(self, tokens: Tensor, cond: Tensor) -> Tensor:
        """Feed frames [B, n, Q] (with their conditioning [B, n, C]); the context after each [B, n, D]."""
        h = self.prior.stream_context(tokens, self._cond(cond))
        self.h_last = h[:, -1]
        self.primed = True
        return h

    def _listen(self, tokens: Tensor, cond: Tensor) -> Tensor:
        """Feed the buffer; for each frame, the perplexity [B, n] of the prediction of the next one
        (the original's listen outlet: the quantizers after the first are predicted from sampled ones)."""
        b, n = tokens.shape[0], tokens.shape[1]
        h = self._feed(tokens, cond)
        _, perplexity = self.prior.predict(h.reshape(b * n, -1), self.temperature, None)
        return perplexity.view(b, n)

    def _generate(self, cond: Tensor) -> Tuple[Tensor, Tensor]:
        """One new frame per input frame: tokens [B, n, Q] and their perplexity [B, n]. A frame's
        conditioning is the value that arrived with it."""
        b = cond.shape[0]
        if not self.primed:  # the seed frame of zeros (with zero conditioning), as the original
            self._feed(torch.zeros(b, 1, self.num_quantizers, dtype=torch.long, device=cond.device),
                       torch.zeros_like(cond[:, :1]))
        frames: List[Tensor] = []
        perplexities: List[Tensor] = []
        for t in range(cond.shape[1]):
            tokens, perplexity = self.prior.predict(self.h_last, self.temperature, None)
            self._feed(tokens.unsqueeze(1), cond[:, t : t + 1])
            frames.append(tokens)
            perplexities.append(perplexity)
        return torch.stack(frames, dim=1), torch.stack(perplexities, dim=1)

    def _latents(self, tokens: Tensor) -> Tensor:
        """Generated tokens [B, n, Q] -> what RAVE's decode takes [B, Q, n] (latents or indices)."""
        if self.continuous:
            z = dequantize(tokens, self.resolution, torch.rand(tokens.shape, device=tokens.device),
                           loc=self.latent_loc, scale=self.latent_scale)
        else:
            z = tokens.float()
        return z.transpose(1, 2)

    def _padded(self, x: Tensor) -> Tensor:
        """x [B, C, n] (B <= batch_size) -> [batch_size, n, C]: the caches are sized for batch_size."""
        b, n = x.shape[0], x.shape[2]
        if b > self.batch_size:
            raise ValueError("more parallel streams than the export's --batch_size")
        if self.pending_reset:
            self.reset_stream()
        xs = x.float()
        if b < self.batch_size:
            xs = torch.cat([xs, torch.zeros(self.batch_size - b, xs.shape[1], n, dtype=xs.dtype, device=xs.device)], 0)
        return xs.transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, Q + C, n] (B <= batch_size) -> [B, Q + 1, n]: latents, then perplexity."""
        b = x.shape[0]
        q = self.num_quantizers
        frames = self._padded(x)  # [batch, n, in_ch]
        cond = frames[:, :, q:]
        if self.listen:
            perplexity = self._listen(self._tokens(frames[:, :, :q]), cond)
            latents = frames[:, :, :q].transpose(1, 2)  # passed through unchanged
        else:
            tokens, perplexity = self._generate(cond)
            latents = self._latents(tokens)
        out = torch.cat([latents, perplexity.unsqueeze(1).to(latents.dtype)], dim=1)
        return out[:b]

    @torch.jit.export
    def generate(self, x: Tensor) -> Tensor:
        """Generate, whatever `listen` says (`msprior combine`'s `generate` method): x [B, max(C, 1), n]
        holds only the conditioning channels (one ignored channel for an unconditioned prior);
        returns what RAVE's decode takes [B, Q, n]. Same stream, attributes and reset as `forward`."""
        b = x.shape[0]
        frames = self._padded(x)
        tokens, _ = self._generate(frames[:, :, : self.cond_channels])
        return self._latents(tokens)[:b]
