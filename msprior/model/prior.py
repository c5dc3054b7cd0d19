"""MSPrior: an autoregressive prior over RAVE latent token frames, in one file.

Shapes: B batch, T decoder frames (one RAVE latent frame each), Q quantizers (tokens per frame),
V vocabulary per quantizer, D model width, H heads, Dh head width, r decoder frames per
conditioning frame, Tc = ceil(T / r) conditioning frames.

    tokens [B,T,Q] -> MultivariateEmbedding (sum over Q) -> [B,T,D]
                   -> TransformerStack (ALiBi, optional cross-attention) | GRUStack -> h [B,T,D]
    h, next frame  -> SkipPredictor: logits of quantizer q given h and the tokens of quantizers < q

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

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from msprior.config import ModelConfig


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
        cond = manifest.get("conditioning") or {}
        feats = cond.get("features") or {}
        toks = cond.get("tokens") or {}
        return cls(
            num_quantizers=int(rave["num_quantizers"]),
            vocab_size=int(rave["vocab_size"]),
            cond_ratio=int(cond.get("ratio") or 0),
            cond_vocab=int(toks.get("vocab_size") or 0),
            cond_features=int(feats.get("size") or 0),
            feature_mean=[float(v) for v in feats.get("mean") or []],
            feature_std=[float(v) for v in feats.get("std") or []],
        )


# --- attention ---------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi per-head slopes (Press et al. 2022): a geometric sequence, 2^-8 at the last head."""

    def power_of_two(n: int) -> List[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:  # the paper's recipe: the closest power of two, then every other slope of twice that
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_mask(q_pos: Tensor, k_pos: Tensor, window: int, slopes: Tensor) -> Tensor:
    """Additive attention bias [H, n_q, n_k] from absolute positions.

    A key is visible to a query when it is not in the future, lies within the last `window`
    positions (the query's own included) and has a non-negative position (negative positions mark
    cache slots not yet filled). Visible keys get the ALiBi penalty -slope x distance.
    """
    distance = (q_pos.unsqueeze(1) - k_pos.unsqueeze(0)).to(slopes.dtype)  # [n_q, n_k], frames
    visible = (distance >= 0) & (distance < window) & (k_pos.unsqueeze(0) >= 0)
    bias = -slopes.view(-1, 1, 1) * distance.unsqueeze(0)
    return bias.masked_fill(~visible.unsqueeze(0), float("-inf"))


class Attention(nn.Module):
    """Multi-head attention with ALiBi and a streaming KV cache of the last `window` keys."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, window: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.window = window
        self.dropout = dropout
        self.q = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.kv = nn.Linear(dim, 2 * num_heads * head_dim, bias=False)
        self.out = nn.Linear(num_heads * head_dim, dim, bias=False)
        self.register_buffer("slopes", alibi_slopes(num_heads), persistent=False)
        # streaming state: keys/values of the last `window` positions [B, H, window, Dh]
        self.register_buffer("k_cache", torch.zeros(0), persistent=False)
        self.register_buffer("v_cache", torch.zeros(0), persistent=False)
        # absolute positions of the cached keys; -1 marks a slot not yet filled (masked)
        self.register_buffer("pos_cache", torch.zeros(0, dtype=torch.long), persistent=False)

    def init_stream(self, batch_size: int) -> None:
        # dtype/device from a buffer, not q.weight: an int8-quantised Linear has no weight tensor
        shape = (batch_size, self.num_heads, self.window, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.slopes.dtype, device=self.slopes.device)
        self.v_cache = torch.zeros(shape, dtype=self.slopes.dtype, device=self.slopes.device)
        self.pos_cache = torch.full((self.window,), -1, dtype=torch.long, device=self.slopes.device)

    def _heads(self, x: Tensor) -> Tensor:  # [B, n, H*Dh] -> [B, H, n, Dh]
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, q_pos: Tensor, mem: Tensor, k_pos: Tensor, stream: bool) -> Tensor:
        """x [B, n, D] queries at positions q_pos [n]; mem [B, m, D] new keys at k_pos [m].

        In streaming mode the queries also see the cached keys, and the cache keeps the last
        `window` keys.
        """
        q = self._heads(self.q(x))
        k, v = self._kv(mem)
        if stream:
            # The cache is a ring: position p lives in slot p % window. Masks use absolute
            # positions, so the order of the slots does not matter to attention.
            m = min(k.shape[2], self.window)
            slots = torch.remainder(k_pos[k_pos.numel() - m :], self.window)
            if k.shape[2] == 1 and x.shape[1] == 1:  # one frame (realtime generation): write it, attend the ring
                self.k_cache.index_copy_(2, slots, k)
                self.v_cache.index_copy_(2, slots, v)
                self.pos_cache.index_copy_(0, slots, k_pos)
                k, v, k_pos = self.k_cache, self.v_cache, self.pos_cache
            else:  # several: earlier queries may still need the keys that new ones overwrite
                k_all = torch.cat([self.k_cache, k], dim=2)
                v_all = torch.cat([self.v_cache, v], dim=2)
                pos_all = torch.cat([self.pos_cache, k_pos])
                if m > 0:
                    self.k_cache.index_copy_(2, slots, k[:, :, k.shape[2] - m :])
                    self.v_cache.index_copy_(2, slots, v[:, :, v.shape[2] - m :])
                    self.pos_cache.index_copy_(0, slots, k_pos[k_pos.numel() - m :])
                k, v, k_pos = k_all, v_all, pos_all
        bias = alibi_mask(q_pos, k_pos, self.window, self.slopes).to(q.dtype)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.unsqueeze(0), dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def _kv(self, mem: Tensor) -> Tuple[Tensor, Tensor]:
        kv = self.kv(mem).view(mem.shape[0], mem.shape[1], 2, self.num_heads, self.head_dim)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(dim, mult * dim)
        self.down = nn.Linear(mult * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(F.gelu(self.up(x))))


class TransformerLayer(nn.Module):
    """Pre-norm block: causal self-attention, optional cross-attention, feed-forward."""

    def __init__(self, cfg: ModelConfig, window: int, cross_window: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(cfg.dim)
        self.self_attn = Attention(cfg.dim, cfg.num_heads, cfg.head_dim, window, cfg.dropout)
        self.norm_cross = None
        self.cross_attn = None
        if cross_window > 0:
            self.norm_cross = nn.LayerNorm(cfg.dim)
            self.cross_attn = Attention(cfg.dim, cfg.num_heads, cfg.head_dim, cross_window, cfg.dropout)
        self.norm_ff = nn.LayerNorm(cfg.dim)
        self.ff = FeedForward(cfg.dim, cfg.ff_mult, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def init_stream(self, batch_size: int) -> None:
        self.self_attn.init_stream(batch_size)
        if self.cross_attn is not None:
            self.cross_attn.init_stream(batch_size)

    def forward(
        self, x: Tensor, pos: Tensor, mem: Optional[Tensor], mem_pos: Tensor, q_mem_pos: Tensor, stream: bool
    ) -> Tensor:
        h = self.norm_self(x)
        x = x + self.drop(self.self_attn(h, pos, h, pos, stream))
        if self.cross_attn is not None and self.norm_cross is not None and mem is not None:
            x = x + self.drop(self.cross_attn(self.norm_cross(x), q_mem_pos, mem, mem_pos, stream))
        return x + self.ff(self.norm_ff(x))


class TransformerStack(nn.Module):
    """The decoder (with cross-attention when conditioned) or the conditioning encoder."""

    def __init__(self, cfg: ModelConfig, num_layers: int, window: int, cross_window: int):
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(cfg, window, cross_window) for _ in range(num_layers)])

    def init_stream(self, batch_size: int) -> None:
        for layer in self.layers:
            layer.init_stream(batch_size)

    def forward(
        self, x: Tensor, pos: Tensor, mem: Optional[Tensor], mem_pos: Tensor, q_mem_pos: Tensor, stream: bool
    ) -> Tensor:
        for layer in self.layers:
            x = layer(x, pos, mem, mem_pos, q_mem_pos, stream)
        return x


class GRUStack(nn.Module):
    """Stacked GRU; in streaming mode it carries its hidden state [num_layers, B, D] across calls."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_layers = cfg.num_layers
        self.dim = cfg.dim
        self.gru = nn.GRU(cfg.dim, cfg.dim, cfg.num_layers, batch_first=True, dropout=cfg.dropout)
        self.register_buffer("state", torch.zeros(0), persistent=False)

    def init_stream(self, batch_size: int) -> None:
        w = self.gru.weight_hh_l0
        self.state = torch.zeros(self.num_layers, batch_size, self.dim, dtype=w.dtype, device=w.device)

    def forward(
        self, x: Tensor, pos: Tensor, mem: Optional[Tensor], mem_pos: Tensor, q_mem_pos: Tensor, stream: bool
    ) -> Tensor:
        if stream:
            y, self.state = self.gru(x, self.state)
        else:
            y, _ = self.gru(x)
        return y


# --- embeddings and the skip predictor ---------------------------------------------------------


class MultivariateEmbedding(nn.Module):
    """One table of Q x V entries: token v of quantizer q is row q * V + v.

    With RAVE codebooks (`codebooks` [Q, V, d]) the table holds them frozen and a learned linear
    map projects d -> D; else the table is learned at width D. `forward` returns the per-quantizer
    embeddings [..., Q, D]; a frame's embedding is their sum over Q.
    """

    def __init__(self, num_quantizers: int, vocab_size: int, dim: int, pretrained_dim: int = 0,
                 codebooks: Optional[Tensor] = None):
        super().__init__()
        width = pretrained_dim if pretrained_dim > 0 else dim
        self.table = nn.Embedding(num_quantizers * vocab_size, width)
        self.proj: nn.Module = nn.Linear(width, dim) if pretrained_dim > 0 else nn.Identity()
        if pretrained_dim > 0:
            if codebooks is not None:
                expected = (num_quantizers, vocab_size, pretrained_dim)
                if tuple(codebooks.shape) != expected:
                    raise ValueError(f"RAVE codebooks have shape {tuple(codebooks.shape)}, expected {expected}")
                with torch.no_grad():
                    self.table.weight.copy_(codebooks.reshape(-1, pretrained_dim))
            self.table.weight.requires_grad_(False)  # frozen: RAVE's own codebooks
        self.register_buffer("offsets", torch.arange(num_quantizers) * vocab_size, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(self.table(tokens + self.offsets))


class SkipPredictor(nn.Module):
    """Predicts a whole frame in one step: quantizer q's logits come from the context h
    modulated (FiLM) by the summed embeddings of quantizers < q of the same frame (teacher-forced
    in training, sampled one after the other at inference)."""

    def __init__(self, dim: int, num_quantizers: int, vocab_size: int, dropout: float):
        super().__init__()
        self.num_quantizers = num_quantizers
        self.norm = nn.LayerNorm(dim)
        self.which = nn.Parameter(torch.randn(num_quantizers, dim) * 0.02)  # "predicting quantizer q"
        self.film = nn.Linear(dim, 2 * dim)
        self.hidden = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.out_w = nn.Parameter(torch.randn(num_quantizers, dim, vocab_size) * 0.02)
        self.out_b = nn.Parameter(torch.zeros(num_quantizers, vocab_size))

    def forward(self, h: Tensor, target_emb: Tensor) -> Tensor:
        """h [B, T, D], target_emb [B, T, Q, D] (per-quantizer embeddings) -> logits [B, T, Q, V]."""
        previous = target_emb.cumsum(dim=2) - target_emb  # sum over quantizers < q
        gamma, beta = self.film(previous + self.which).chunk(2, dim=-1)
        z = self.norm(h).unsqueeze(2) * (1 + gamma) + beta
        z = self.drop(F.gelu(self.hidden(z)))
        return torch.einsum("btqd,qdv->btqv", z, self.out_w) + self.out_b

    def step_logits(self, h_norm: Tensor, previous: Tensor, q: int) -> Tensor:
        """Logits [B, V] of quantizer q for one frame: h_norm [B, D], previous [B, D]."""
        gamma, beta = self.film(previous + self.which[q]).chunk(2, dim=-1)
        z = F.gelu(self.hidden(h_norm * (1 + gamma) + beta))
        return z @ self.out_w[q] + self.out_b[q]


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


class Prior(nn.Module):
    def __init__(self, cfg: ModelConfig, facts: DatasetFacts, codebooks: Optional[Tensor] = None):
        super().__init__()
        self.num_quantizers = facts.num_quantizers
        self.vocab_size = facts.vocab_size
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
        self.predictor = SkipPredictor(cfg.dim, facts.num_quantizers, facts.vocab_size, cfg.dropout)

        # streaming positions: decoder frames and conditioning frames seen so far
        self.register_buffer("pos", torch.zeros(1, dtype=torch.long), persistent=False)
        self.register_buffer("cond_pos", torch.zeros(1, dtype=torch.long), persistent=False)
        self.apply(self._init_weights)

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
        if self.conditioned and cond is None:
            raise ValueError("this prior is conditioned: pass the conditioning stream")
        pos = torch.arange(x.shape[1], device=x.device)
        mem_pos = torch.arange(cond.shape[1], device=x.device) if cond is not None else pos[:0]
        mem = self._encode_cond(cond, mem_pos, False)
        h = self.drop(self.embedding(x).sum(dim=2))
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

    def logits(self, batch: Dict[str, Tensor]) -> Tensor:
        """Teacher-forced logits [B, T, Q, V] of frames 1..T given frames 0..T-1 of batch['rave']."""
        rave = batch["rave"].long()
        x, y = rave[:, :-1], rave[:, 1:]
        h = self.context(x, self._cond(batch))
        return self.predictor(h, self.embedding(y))

    def loss(self, batch: Dict[str, Tensor]) -> Tensor:
        """Mean cross-entropy (nats) over every predicted token of the batch."""
        logits = self.logits(batch)
        target = batch["rave"][:, 1:].long()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))

    # -- sampling ------------------------------------------------------------------------------

    @torch.jit.export
    def predict(self, h: Tensor, temperature: float, given: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """One frame from the last context vector h [B, D].

        Samples quantizer after quantizer (temperature 0 = argmax), or scores `given` tokens
        [B, Q] (listen mode). Returns (tokens [B, Q] int64, perplexity [B]): the exponential of the
        mean negative log-likelihood of the frame's tokens.
        """
        h_norm = self.predictor.norm(h)
        previous = torch.zeros_like(h)
        nll = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
        tokens: List[Tensor] = []
        for q in range(self.num_quantizers):
            logp = torch.log_softmax(self.predictor.step_logits(h_norm, previous, q).float(), dim=-1)
            if given is not None:
                tok = given[:, q].long()
            elif temperature <= 0.0:
                tok = logp.argmax(dim=-1)
            else:
                tok = torch.multinomial(torch.softmax(logp / temperature, dim=-1), 1).squeeze(1)
            nll = nll - logp.gather(1, tok.unsqueeze(1)).squeeze(1).to(nll.dtype)
            previous = previous + self.embedding.proj(self.embedding.table(tok + q * self.vocab_size))
            tokens.append(tok)
        return torch.stack(tokens, dim=1), torch.exp(nll / self.num_quantizers)

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
