"""The nn~ wrapper: a TorchScript module that streams a Prior in Max/MSP and PureData.

What nn~'s backend does with it (read off its C++ source):
  * `get_methods()` -> ["forward"], and `forward_params` = [in_ch, ratio, out_ch, ratio];
  * `forward(x [B, in_ch, n])` -> [B, Q + 1, n]: x holds one value per RAVE frame (nn~ takes the
    last sample of each `ratio` block); channels are the Q latent channels, then the conditioning
    channels (1 for tokens, F for features); the output is Q latent channels then perplexity;
  * `get_attributes()`, `<attr>_params` (type ids 0 bool, 1 int, 2 float, 3 str), `get_<attr>()`
    returning a LIST, `set_<attr>(value) -> int` (0 = accepted).

Streaming state: the Prior's caches hold every frame of the stream but the most recent one, which
is kept in `last` (with its conditioning in `last_cond`): in listen mode the buffer is scored
against what came before it; in generate mode each step feeds `last` and samples the next frame.
A fresh stream starts from a seed frame of zeros, as the original MSPrior did.

`listen` and `reset` are booleans typed as strings (type id 3) on purpose: nn~ hands a string
attribute through untouched, while its own bool parser (`std::boolalpha`) reads Pd's "1.000000"
as false. The setters here understand "true"/"false", "1"/"0", "on"/"off" and Pd's "1.000000".
"""

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

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
        conditioning: str = "none",
        cond_channels: int = 0,
        cond_vocab: int = 0,
        listen: bool = False,
        temperature: float = 1.0,
        latent_loc: Optional[List[float]] = None,
        latent_scale: Optional[List[float]] = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        prior = prior.eval()
        if prior.film_rows.numel() == 0:  # int8 exports come prepared (from float weights)
            prior.prepare_stream()
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
        self.cond_tokens = conditioning == "tokens"
        self.cond_channels = cond_channels
        self.cond_vocab = max(cond_vocab, 1)

        # -- nn~ registry ---------------------------------------------------------------------
        q = self.num_quantizers
        in_ch = q + cond_channels
        kind = "latent" if continuous else "token"
        labels = [f"(signal) rave {kind} {i + 1}" for i in range(q)]
        if conditioning == "tokens":
            labels.append("(signal) conditioning token")
        elif conditioning == "features":
            labels += [f"(signal) conditioning feature {i + 1}" for i in range(cond_channels)]
        self._methods: List[str] = ["forward"]
        self.register_buffer("forward_params", torch.tensor([in_ch, ratio, q + 1, ratio]))
        self.forward_input_labels: List[str] = labels
        self.forward_output_labels: List[str] = [f"(signal) rave {kind} {i + 1}" for i in range(q)] + [
            "(signal) perplexity"
        ]
        self._attributes: List[str] = ["none", "temperature", "listen", "reset"]
        self.register_buffer("temperature_params", torch.tensor([TYPE_FLOAT]))
        self.register_buffer("listen_params", torch.tensor([TYPE_STR]))
        self.register_buffer("reset_params", torch.tensor([TYPE_STR]))

        # -- attribute values and streaming state ---------------------------------------------
        self.temperature = float(temperature)
        self.listen = bool(listen)
        self.pending_reset = False  # applied at the start of the next forward (audio thread)
        self.register_buffer("last", torch.zeros(batch_size, q, dtype=torch.long))
        self.register_buffer("last_cond", torch.zeros(batch_size, cond_channels))
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
        return ["true" if self.listen else "false"]

    @torch.jit.export
    def set_listen(self, value: str) -> int:
        b = parse_bool(value)
        if b is None:
            return -1
        self.listen = b
        return 0

    @torch.jit.export
    def get_reset(self) -> List[str]:
        return ["true" if self.pending_reset else "false"]

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
        for _ in range(3):
            for mode in [False, True]:
                self.listen = mode
                self.forward(torch.zeros(1, in_ch, 2, device=self.last.device))
                if self.batch_size > 1:
                    self.forward(torch.zeros(self.batch_size, in_ch, 2, device=self.last.device))
        self.listen, self.temperature = listen, temperature
        self.reset_stream()

    @torch.jit.export
    def reset_stream(self) -> None:
        """Back to the state of a freshly loaded model (empty caches, zero seed frame)."""
        self.prior.init_stream(self.batch_size)
        self.last = torch.zeros_like(self.last)
        self.last_cond = torch.zeros_like(self.last_cond)
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

    def _listen(self, tokens: Tensor, cond: Tensor) -> Tensor:
        """Feed the buffer; perplexity [B, n] of each frame given everything before it."""
        b, n = tokens.shape[0], tokens.shape[1]
        inputs = torch.cat([self.last.unsqueeze(1), tokens[:, :-1]], dim=1)
        cond_in = torch.cat([self.last_cond.unsqueeze(1), cond[:, :-1]], dim=1)
        h = self.prior.stream_context(inputs, self._cond(cond_in))
        _, perplexity = self.prior.predict(h.reshape(b * n, -1), 0.0, tokens.reshape(b * n, -1))
        self.last = tokens[:, -1]
        self.last_cond = cond[:, -1]
        return perplexity.view(b, n)

    def _generate(self, cond: Tensor) -> Tuple[Tensor, Tensor]:
        """One new frame per input frame: tokens [B, n, Q] and their perplexity [B, n]."""
        frames: List[Tensor] = []
        perplexities: List[Tensor] = []
        for t in range(cond.shape[1]):
            h = self.prior.stream_context(self.last.unsqueeze(1), self._cond(self.last_cond.unsqueeze(1)))
            tokens, perplexity = self.prior.predict(h[:, -1], self.temperature, None)
            self.last = tokens
            self.last_cond = cond[:, t]
            frames.append(tokens)
            perplexities.append(perplexity)
        return torch.stack(frames, dim=1), torch.stack(perplexities, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, in_ch, n] (B <= batch_size) -> [B, Q + 1, n]."""
        b, n = x.shape[0], x.shape[2]
        if b > self.batch_size:
            raise ValueError("more parallel streams than the export's --batch_size")
        if self.pending_reset:
            self.reset_stream()
        q = self.num_quantizers
        xs = x.float()
        if b < self.batch_size:  # the caches are sized for batch_size streams: pad, then crop
            xs = torch.cat([xs, torch.zeros(self.batch_size - b, xs.shape[1], n, dtype=xs.dtype, device=xs.device)], 0)
        frames = xs.transpose(1, 2)  # [batch, n, in_ch]
        cond = frames[:, :, q:]
        if self.listen:
            perplexity = self._listen(self._tokens(frames[:, :, :q]), cond)
            latents = xs[:, :q]  # passed through unchanged
        else:
            tokens, perplexity = self._generate(cond)
            if self.continuous:
                latents = dequantize(tokens, self.resolution, torch.rand(tokens.shape, device=x.device),
                                     loc=self.latent_loc, scale=self.latent_scale)
            else:
                latents = tokens.float()
            latents = latents.transpose(1, 2)
        out = torch.cat([latents, perplexity.unsqueeze(1).to(latents.dtype)], dim=1)
        return out[:b]
