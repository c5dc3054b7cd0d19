"""MSPrior: an autoregressive prior over RAVE latent token frames (context network: layers.py;
embedding and predictors: predictor.py).

Shapes: B batch, T decoder frames (one RAVE latent frame each), Q quantizers (tokens per frame),
V vocabulary per quantizer, D model width, H heads, Dh head width, r decoder frames per
conditioning frame, Tc = ceil(T / r) conditioning frames.

    tokens [B,T,Q] -> MultivariateEmbedding (sum over Q) -> [B,T,D]
                   -> TransformerStack (ALiBi, optional cross-attention) | GRUStack -> h [B,T,D]
    h, next frame  -> FilmPredictor (default; SkipPredictor: msprior 0.1's `linear_film`): logits of
                      quantizer q given h and the tokens of quantizers < q

Two ways through the same weights:
  * full sequence (training): `context(x, cond)`; self-attention is causal within a sliding window of
    `seq_len` frames, so a window of exactly seq_len frames is plain causal attention;
  * streaming (export / realtime): `stream_context(x, cond)`; each attention keeps a KV cache of its
    window (seq_len decoder frames, ceil(seq_len / r) conditioning frames), the GRU keeps its state.
Every attention mask is built from ABSOLUTE frame positions, so both paths compute the same thing
and the streaming cost per frame never grows. Caches are non-persistent buffers: not in state_dict.

The module is TorchScript-scriptable (the nn~ export scripts it), so it sticks to plain ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from msprior.conditioning import ConditioningSpec
from msprior.config import ModelConfig
from msprior.model.layers import GRUStack, TransformerStack
from msprior.model.predictor import FilmPredictor, MultivariateEmbedding, SkipPredictor


@dataclass
class DatasetFacts:
    """What the model needs to know about the latent table (read from its manifest.json)."""

    num_quantizers: int  # Q
    vocab_size: int  # V: codebook size (discrete RAVE) or resolution (continuous RAVE)
    cond_ratio: int = 0  # r; 0 when the table has no conditioning
    cond_vocab: int = 0  # conditioning token classes (k-means clusters)
    cond_features: int = 0  # F: conditioning feature size
    feature_mean: List[float] = field(default_factory=list)
    feature_std: List[float] = field(default_factory=list)

    @classmethod
    def from_manifest(cls, manifest: Dict) -> "DatasetFacts":
        rave = manifest["rave"]
        cond = ConditioningSpec.from_manifest(manifest)  # plain numbers from the one reader of the section
        return cls(num_quantizers=int(rave["num_quantizers"]), vocab_size=int(rave["vocab_size"]), **cond.dims())


# --- conditioning ------------------------------------------------------------------------------


class TokenInput(nn.Module):
    """Discrete conditioning: token ids [B, Tc] -> [B, Tc, D]."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)

    def forward(self, c: Tensor) -> Tensor:
        return self.embed(c.long())


class FeatureInput(nn.Module):
    """Continuous conditioning: features [B, Tc, F], normalised with the table's statistics, then
    a linear map to D."""

    def __init__(self, size: int, dim: int, mean: List[float], std: List[float]):
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32) if len(mean) == size else torch.zeros(size)
        std_t = torch.tensor(std, dtype=torch.float32) if len(std) == size else torch.ones(size)
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t.clamp_min(1e-5))
        self.proj = nn.Linear(size, dim)

    def forward(self, c: Tensor) -> Tensor:
        return self.proj((c.float() - self.mean) / self.std)


# --- the prior ---------------------------------------------------------------------------------


def sample_categorical(logp: Tensor, temperature: float) -> Tensor:
    """One token per row of log-probabilities logp [B, V] at `temperature` -> [B, 1] int64.

    Inverse-CDF sampling (the distribution of torch.multinomial, a few times cheaper for one draw
    on one CPU thread): the first token whose cumulative probability exceeds a uniform draw.
    """
    cdf = torch.softmax(logp / temperature, dim=-1).cumsum(dim=-1)
    u = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[1] - 1)



class Prior(nn.Module):
    def __init__(self, cfg: ModelConfig, facts: DatasetFacts, codebooks: Optional[Tensor] = None):
        super().__init__()
        self.num_quantizers = facts.num_quantizers
        self.vocab_size = facts.vocab_size
        self.family = cfg.family
        self.seq_len = cfg.seq_len
        self.conditioned = cfg.conditioning != "none"
        self.cond_ratio = max(cfg.cond_ratio, 1)
        self.cond_window = -(-cfg.seq_len // self.cond_ratio)  # conditioning frames per window

        self.embedding = MultivariateEmbedding(
            facts.num_quantizers, facts.vocab_size, cfg.dim, cfg.pretrained_embedding_dim, codebooks
        )
        self.drop = nn.Dropout(cfg.dropout)

        self.cond_input = None
        self.cond_encoder = None
        if cfg.conditioning == "tokens":
            if facts.cond_vocab < 1:
                raise ValueError("config conditioning='tokens' but the latent table has no conditioning tokens")
            self.cond_input = TokenInput(facts.cond_vocab, cfg.dim)
        elif cfg.conditioning == "features":
            if facts.cond_features < 1:
                raise ValueError("config conditioning='features' but the latent table has no conditioning features")
            self.cond_input = FeatureInput(facts.cond_features, cfg.dim, facts.feature_mean, facts.feature_std)
        if self.conditioned:
            if facts.cond_ratio and facts.cond_ratio != cfg.cond_ratio:
                raise ValueError(
                    f"model.cond_ratio={cfg.cond_ratio} but the latent table was made with condition ratio "
                    f"{facts.cond_ratio}: set --override model.cond_ratio={facts.cond_ratio}"
                )
            self.cond_encoder = TransformerStack(cfg, cfg.cond_layers, self.cond_window, 0)
            self.cond_norm: nn.Module = nn.LayerNorm(cfg.dim)
        else:
            self.cond_norm = nn.Identity()

        if cfg.family == "gru":
            self.decoder: nn.Module = GRUStack(cfg)
        else:
            self.decoder = TransformerStack(cfg, cfg.num_layers, cfg.seq_len, self.cond_window if self.conditioned else 0)
        self.norm = nn.LayerNorm(cfg.dim)
        predictor = FilmPredictor if cfg.predictor == "film" else SkipPredictor
        self.predictor = predictor(cfg.dim, facts.num_quantizers, facts.vocab_size, cfg.dropout)

        # streaming positions: decoder frames and conditioning frames seen so far
        self.register_buffer("pos", torch.zeros(1, dtype=torch.long), persistent=False)
        self.register_buffer("cond_pos", torch.zeros(1, dtype=torch.long), persistent=False)
        # prepare_stream: the embedding table's rows at model width [Q*V, D] (projected when pretrained)
        self.register_buffer("emb_rows", torch.zeros(0, cfg.dim), persistent=False)
        self.apply(self._init_weights)

    @torch.jit.unused
    def init_output_bias(self, counts: Tensor) -> None:
        """Start each quantizer's output bias at the log unigram of the training tokens.

        counts [Q, V]: token counts of (a sample of) the training tokens, add-one smoothed (the
        estimator of the unigram floor, msprior.train.quality.unigram_ce), centred per quantizer
        (softmax ignores a shift; centred, weight decay shrinks it least). The untrained prior then
        scores the unigram floor instead of ln V and training spends its steps on the context. Why
        it matters: Adam moves a bias ~lr per step, ~0.13 nats over the quality bench's 1,512 steps
        of slow warm-up, while a peaked marginal is several nats from uniform; without this the
        output weights learn the marginal first. Free at inference (the bias is there anyway).
        Used by `train.unigram_bias` (fresh trainings; a resumed one loads its weights).
        """
        if tuple(counts.shape) != (self.num_quantizers, self.vocab_size):
            raise ValueError(f"token counts have shape {tuple(counts.shape)}, expected "
                             f"{(self.num_quantizers, self.vocab_size)}")
        c = counts.detach().to(torch.float64).cpu() + 1.0
        logp = (c / c.sum(dim=1, keepdim=True)).log()
        bias = self.predictor.out_b
        with torch.no_grad():
            bias.copy_((logp - logp.mean(dim=1, keepdim=True)).to(bias.dtype))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) and m.weight.requires_grad:
            nn.init.normal_(m.weight, std=0.02)

    # -- full sequence (training) -------------------------------------------------------------

    def _encode_cond(self, cond: Optional[Tensor], cond_pos: Tensor, stream: bool) -> Optional[Tensor]:
        if cond is None or self.cond_input is None or self.cond_encoder is None:
            return None
        c = self.drop(self.cond_input(cond))
        empty = torch.zeros(0, dtype=torch.long, device=c.device)
        return self.cond_norm(self.cond_encoder(c, cond_pos, None, empty, empty, stream))

    def context(self, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """x [B, T, Q] tokens; cond [B, Tc] tokens or [B, Tc, F] features at the conditioning rate,
        frame j covering decoder frames j*r .. j*r + r - 1. Returns h [B, T, D]."""
        return self._context(self.embedding(x).sum(dim=2), cond)

    def _context(self, x_emb: Tensor, cond: Optional[Tensor]) -> Tensor:
        """h [B, T, D] from the frames' summed embeddings x_emb [B, T, D]."""
        if self.conditioned and cond is None:
            raise ValueError("this prior is conditioned: pass the conditioning stream")
        pos = torch.arange(x_emb.shape[1], device=x_emb.device)
        mem_pos = torch.arange(cond.shape[1], device=x_emb.device) if cond is not None else pos[:0]
        mem = self._encode_cond(cond, mem_pos, False)
        h = self.drop(x_emb)
        h = self.decoder(h, pos, mem, mem_pos, torch.div(pos, self.cond_ratio, rounding_mode="floor"), False)
        return self.norm(h)

    def _cond(self, batch: Dict[str, Tensor]) -> Optional[Tensor]:
        if not self.conditioned:
            return None
        if "tokens" in batch:
            return batch["tokens"]
        if "features" in batch:
            return batch["features"]
        raise ValueError("this prior is conditioned: the batch needs a 'tokens' or 'features' column")

    def _qfirst_logits(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """Teacher-forced logits [Q, B, T, V] of frames 1..T given frames 0..T-1 of batch['rave'],
        and their targets [Q, B, T]. One embedding lookup serves inputs and targets (they overlap)."""
        rave = batch["rave"].long().permute(2, 0, 1)  # [Q, B, T + 1]
        emb = self.embedding.qfirst(rave)  # [Q, B, T + 1, D]
        h = self._context(emb[:, :, :-1].sum(dim=0), self._cond(batch))
        return self.predictor.qfirst(h, emb[:, :, 1:]), rave[:, :, 1:]

    def logits(self, batch: Dict[str, Tensor]) -> Tensor:
        """Teacher-forced logits [B, T, Q, V] of frames 1..T given frames 0..T-1 of batch['rave']."""
        return self._qfirst_logits(batch)[0].permute(1, 2, 0, 3)

    def loss(self, batch: Dict[str, Tensor]) -> Tensor:
        """Mean cross-entropy (nats) over every predicted token of the batch."""
        logits, target = self._qfirst_logits(batch)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))

    @torch.jit.unused
    def quantizer_losses(self, batch: Dict[str, Tensor]) -> Tensor:
        """Mean cross-entropy (nats per token) of each quantizer [Q] over the batch: the quality
        measure of a prior (training's validation, `msprior evaluate`, bench/quality.py). Their
        mean equals `loss(batch)`: every quantizer predicts the same number of tokens."""
        logits, target = self._qfirst_logits(batch)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none")
        return ce.view(target.shape[0], -1).mean(dim=1)

    # -- sampling ------------------------------------------------------------------------------

    @torch.jit.export
    def predict(self, h: Tensor, temperature: float, given: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """One frame from the last context vector h [B, D].

        Samples quantizer after quantizer (temperature 0 = argmax), or reads `given` tokens
        [B, Q] (listen mode). Returns (tokens [B, Q] int64, perplexity [B]): the original MSPrior's
        perplexity, exp(entropy of quantizer q's predictive distribution) averaged over q: how many
        tokens the model hesitates between (1 = certain, V = knows nothing), whatever was emitted.
        """
        h_norm = self.predictor.norm(h)
        previous = torch.zeros_like(h)  # summed embeddings of the tokens chosen for quantizers < q
        tokens: List[Tensor] = []  # [B, 1] each
        spread: List[Tensor] = []  # exp(entropy) of each quantizer's distribution [B, 1]
        for q in range(self.num_quantizers):
            logits = self.predictor.step_logits(h_norm, previous, q)
            logp = torch.log_softmax(logits.float(), dim=-1)
            if given is not None:
                tok = given[:, q : q + 1].long()
            elif temperature <= 0.0:
                tok = logp.argmax(dim=-1, keepdim=True)
            else:
                tok = sample_categorical(logp, temperature)
            spread.append(torch.exp(-(logp.exp() * logp).sum(dim=1, keepdim=True)))
            if q + 1 < self.num_quantizers:
                previous = previous + self._emb_rows(tok.view(-1) + q * self.vocab_size).to(previous.dtype)
            tokens.append(tok)
        return torch.cat(tokens, dim=1), torch.cat(spread, dim=1).mean(dim=1)

    def _emb_rows(self, index: Tensor) -> Tensor:
        """Embeddings [B, D] of flat table rows `index` [B] (row = q * V + token)."""
        if self.emb_rows.numel() > 0:
            return self.emb_rows.index_select(0, index)
        return self.embedding.rows(index)

    @torch.jit.unused
    def prepare_stream(self) -> None:
        """Precompute the embedding table at model width (export / realtime): a sampling step then
        gathers a row instead of projecting a pretrained RAVE codebook entry. Call again after the
        weights change; `drop_stream_tables` forgets it (training)."""
        with torch.no_grad():
            self.emb_rows = self.embedding.rows(torch.arange(self.num_quantizers * self.vocab_size, device=self.pos.device))

    @torch.jit.unused
    def drop_stream_tables(self) -> None:
        self.emb_rows = self.emb_rows[:0]

    @torch.jit.ignore
    def sample(self, context: Tensor, cond: Optional[Tensor] = None, temperature: float = 1.0) -> Tuple[Tensor, Tensor]:
        """Next frame after `context` [B, T, Q], recomputing the whole prefix (the reference that
        the cached streaming path must match)."""
        h = self.context(context, cond)  # the sliding-window mask bounds what the transformer sees
        return self.predict(h[:, -1], temperature)

    # -- streaming (export / realtime) ---------------------------------------------------------

    @torch.jit.export
    def init_stream(self, batch_size: int) -> None:
        """Allocate the caches for `batch_size` parallel streams, empty."""
        self.decoder.init_stream(batch_size)
        if self.cond_encoder is not None:
            self.cond_encoder.init_stream(batch_size)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.pos.device)
        self.cond_pos = torch.zeros(1, dtype=torch.long, device=self.pos.device)

    @torch.jit.export
    def stream_context(self, x: Tensor, cond: Optional[Tensor] = None) -> Tensor:
        """x [B, n, Q]: the next n frames of the stream; cond [B, n] or [B, n, F]: conditioning at the
        DECODER rate (one value per frame, as nn~ delivers it); the values at frames t with
        t % r == 0 are the conditioning frames. Returns h [B, n, D] and advances the caches."""
        n = x.shape[1]
        pos0 = int(self.pos[0])
        pos = torch.arange(n, device=x.device) + pos0
        mem: Optional[Tensor] = None
        mem_pos = pos[:0]
        if self.conditioned:
            if cond is None:
                raise ValueError("this prior is conditioned: pass the conditioning stream")
            first = (-pos0) % self.cond_ratio  # index of the first frame in this buffer with t % r == 0
            idx = torch.arange(first, max(first, n), self.cond_ratio, device=x.device)
            cpos0 = int(self.cond_pos[0])
            mem_pos = torch.arange(idx.numel(), device=x.device) + cpos0
            if idx.numel() > 0:
                mem = self._encode_cond(cond.index_select(1, idx), mem_pos, True)
            else:  # no new conditioning frame: attend to the cache alone
                mem = torch.zeros(x.shape[0], 0, self.norm.normalized_shape[0], dtype=self.norm.weight.dtype, device=x.device)
            self.cond_pos = self.cond_pos + idx.numel()
        h = self.embedding(x).sum(dim=2)
        h = self.decoder(h, pos, mem, mem_pos, torch.div(pos, self.cond_ratio, rounding_mode="floor"), True)
        self.pos = self.pos + n
        return self.norm(h)

    @torch.jit.ignore
    def stream_state_numel(self) -> int:
        """Elements held in streaming state (caches): constant once a stream is initialised."""
        return sum(b.numel() for name, b in self.named_buffers() if name.endswith(("k_cache", "v_cache", "pos_cache", "state")))


def build_prior(cfg: ModelConfig, facts: DatasetFacts, codebooks: Optional[Tensor] = None) -> Prior:
    """The one constructor used by training, tuning and export."""
    return Prior(cfg, facts, codebooks)
