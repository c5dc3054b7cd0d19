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
from typing import Dict, List, NamedTuple, Optional, Tuple

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


class Keys(NamedTuple):
    """What every attention of a stack shares for one call: built once per call, not per layer."""

    bias: Tensor  # [H, n_q, n_k] additive ALiBi bias, -inf where a key is not visible
    slots: Tensor  # streaming: ring slots the newest keys are written to (empty in training)
    one: bool  # streaming: one new query and one new key (write the key first, then attend the ring)


def ring_positions(cache_pos: Tensor, k_pos: Tensor, one: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Streaming: (absolute positions of the keys the new queries attend, ring slots of the new
    keys, the updated ring of positions).

    The cache is a ring: position p lives in slot p % window. With one new key it is written first
    and the queries attend the ring; with several, the earlier queries may still need the keys that
    the newer ones overwrite, so they attend the old ring followed by the new keys. (The positions
    are updated out of place: TorchScript's optimiser mis-ordered an in-place update here.)
    """
    window = cache_pos.numel()
    m = min(k_pos.numel(), window)
    newest = k_pos[k_pos.numel() - m :]
    slots = torch.remainder(newest, window)
    updated = cache_pos.index_copy(0, slots, newest)
    if one:
        return updated, slots, updated
    return torch.cat([cache_pos, k_pos]), slots, updated


class Attention(nn.Module):
    """Multi-head attention; in streaming mode a KV cache of the last `window` keys. The mask
    (ALiBi bias, visibility) and the ring slots come from the stack (`Keys`)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.q = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.kv = nn.Linear(dim, 2 * num_heads * head_dim, bias=False)
        self.out = nn.Linear(num_heads * head_dim, dim, bias=False)
        # streaming state: keys/values of the last `window` positions [B, H, window, Dh]
        self.register_buffer("k_cache", torch.zeros(0), persistent=False)
        self.register_buffer("v_cache", torch.zeros(0), persistent=False)

    def init_stream(self, batch_size: int, window: int, like: Tensor) -> None:
        # dtype/device from a float buffer, not q.weight: an int8-quantised Linear has no weight tensor
        shape = (batch_size, self.num_heads, window, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=like.dtype, device=like.device)
        # a clone, not a second identical torch.zeros: TorchScript's CSE would make both one tensor
        self.v_cache = self.k_cache.clone()

    def _heads(self, x: Tensor) -> Tensor:  # [B, n, H*Dh] -> [B, H, n, Dh]
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, mem: Tensor, bias: Tensor, slots: Tensor, one: bool, stream: bool) -> Tensor:
        """x [B, n, D] queries; mem [B, m, D] the new keys; bias [H, n, k] over the keys attended
        (streaming: the ring then the new keys, or the ring after writing the one new key);
        slots: ring slots of the newest keys (see ring_positions)."""
        q = self._heads(self.q(x))
        k_new, v_new = self._kv(mem)
        k, v = k_new, v_new
        if stream and one:  # write the new key first, then attend the ring
            self.k_cache.index_copy_(2, slots, k_new)
            self.v_cache.index_copy_(2, slots, v_new)
            k, v = self.k_cache, self.v_cache
        elif stream:  # attend the old ring followed by the new keys, then write the newest
            k = torch.cat([self.k_cache, k_new], dim=2)
            v = torch.cat([self.v_cache, v_new], dim=2)
        # SDPA with an additive bias (fused memory-efficient kernel on CUDA). FlexAttention with the
        # same ALiBi score_mod and a causal block mask was measured no faster here under
        # torch.compile (short windows, 32-wide heads: attention is ~0.1% of the FLOPs).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).unsqueeze(0),
                                           dropout_p=self.dropout if self.training else 0.0)
        m = slots.numel()
        if stream and not one and m > 0:
            self.k_cache.index_copy_(2, slots, k_new[:, :, k_new.shape[2] - m :])
            self.v_cache.index_copy_(2, slots, v_new[:, :, v_new.shape[2] - m :])
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

    def __init__(self, cfg: ModelConfig, cross: bool):
        super().__init__()
        self.norm_self = nn.LayerNorm(cfg.dim)
        self.self_attn = Attention(cfg.dim, cfg.num_heads, cfg.head_dim, cfg.dropout)
        self.norm_cross = None
        self.cross_attn = None
        if cross:
            self.norm_cross = nn.LayerNorm(cfg.dim)
            self.cross_attn = Attention(cfg.dim, cfg.num_heads, cfg.head_dim, cfg.dropout)
        self.norm_ff = nn.LayerNorm(cfg.dim)
        self.ff = FeedForward(cfg.dim, cfg.ff_mult, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def init_stream(self, batch_size: int, window: int, cross_window: int, like: Tensor) -> None:
        self.self_attn.init_stream(batch_size, window, like)
        if self.cross_attn is not None:
            self.cross_attn.init_stream(batch_size, cross_window, like)

    def forward(self, x: Tensor, mem: Optional[Tensor], self_keys: Keys, cross_keys: Keys, stream: bool) -> Tensor:
        h = self.norm_self(x)
        x = x + self.drop(self.self_attn(h, h, self_keys.bias, self_keys.slots, self_keys.one, stream))
        if self.cross_attn is not None and self.norm_cross is not None and mem is not None:
            x = x + self.drop(self.cross_attn(self.norm_cross(x), mem, cross_keys.bias, cross_keys.slots, cross_keys.one, stream))
        return x + self.ff(self.norm_ff(x))


class TransformerStack(nn.Module):
    """The decoder (with cross-attention when conditioned) or the conditioning encoder.

    Self-attention is causal within a sliding window of `window` positions, cross-attention within
    `cross_window` conditioning frames. Every layer sees the same keys' positions, so the stack
    keeps them (one ring of positions per attention kind) and builds each mask once per call.
    """

    def __init__(self, cfg: ModelConfig, num_layers: int, window: int, cross_window: int):
        super().__init__()
        self.window = window
        self.cross_window = cross_window
        self.layers = nn.ModuleList([TransformerLayer(cfg, cross_window > 0) for _ in range(num_layers)])
        self.register_buffer("slopes", alibi_slopes(cfg.num_heads), persistent=False)
        # streaming: absolute positions of the cached keys; -1 marks a slot not yet filled (masked)
        self.register_buffer("self_pos_cache", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("cross_pos_cache", torch.zeros(0, dtype=torch.long), persistent=False)

    def init_stream(self, batch_size: int) -> None:
        for layer in self.layers:
            layer.init_stream(batch_size, self.window, self.cross_window, self.slopes)
        self.self_pos_cache = torch.full((self.window,), -1, dtype=torch.long, device=self.slopes.device)
        self.cross_pos_cache = torch.full((self.cross_window,), -1, dtype=torch.long, device=self.slopes.device)

    def forward(
        self, x: Tensor, pos: Tensor, mem: Optional[Tensor], mem_pos: Tensor, q_mem_pos: Tensor, stream: bool
    ) -> Tensor:
        """x [B, n, D] at positions pos [n]; mem [B, m, D] new conditioning frames at mem_pos [m],
        seen from decoder frame t as conditioning frame q_mem_pos[t]."""
        one = x.shape[1] == 1
        k_pos, slots = pos, pos[:0]
        if stream:
            k_pos, slots, self.self_pos_cache = ring_positions(self.self_pos_cache, pos, one)
        self_keys = Keys(alibi_mask(pos, k_pos, self.window, self.slopes), slots, one)
        cross_keys = self_keys
        if mem is not None and self.cross_window > 0:
            one_mem = one and mem.shape[1] == 1
            m_pos, m_slots = mem_pos, mem_pos[:0]
            if stream:
                m_pos, m_slots, self.cross_pos_cache = ring_positions(self.cross_pos_cache, mem_pos, one_mem)
            cross_keys = Keys(alibi_mask(q_mem_pos, m_pos, self.cross_window, self.slopes), m_slots, one_mem)
        for layer in self.layers:
            x = layer(x, mem, self_keys, cross_keys, stream)
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

    def qfirst(self, tokens: Tensor) -> Tensor:
        """tokens [Q, ...] (quantizer-major) -> embeddings [Q, ..., D]."""
        offsets = self.offsets.view([-1] + [1] * (tokens.dim() - 1))
        return self.proj(self.table(tokens + offsets))

    def rows(self, index: Tensor) -> Tensor:
        """Embeddings of flat table rows (row = q * V + token)."""
        return self.proj(self.table(index))


class SkipPredictor(nn.Module):
    """The predictor of msprior <= 0.1 (`model.predictor: linear_film`, kept so older runs still
    load and export): quantizer q's logits come from the context h modulated by ONE linear FiLM
    of the summed embeddings of quantizers < q, shared by every quantizer. It learns less than
    FilmPredictor on every quantizer but the first (bench/quality.py)."""

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
        return self.qfirst(h, target_emb.permute(2, 0, 1, 3)).permute(1, 2, 0, 3)

    def _modulated(self, h: Tensor, target_emb: Tensor) -> Tensor:
        """The hidden features z [Q, B, T, D] fed to each quantizer's output projection."""
        previous = target_emb.cumsum(dim=0) - target_emb  # sum over quantizers < q
        gamma, beta = self.film(previous + self.which.unsqueeze(1).unsqueeze(1)).chunk(2, dim=-1)
        z = self.norm(h).unsqueeze(0) * (1 + gamma) + beta
        return self.drop(F.gelu(self.hidden(z)))

    def qfirst(self, h: Tensor, target_emb: Tensor) -> Tensor:
        """h [B, T, D], target_emb [Q, B, T, D] -> logits [Q, B, T, V]: quantizer-major, so the Q
        output projections are one batched matmul with no transposed copy of its large output."""
        z = self._modulated(h, target_emb)
        q, b, t, d = z.shape
        return torch.baddbmm(self.out_b.unsqueeze(1), z.reshape(q, b * t, d), self.out_w).view(q, b, t, -1)

    def step_logits(self, h_norm: Tensor, previous: Tensor, q: int) -> Tensor:
        """Logits [B, V] of quantizer q for one frame: h_norm [B, D], previous [B, D] the summed
        embeddings of the tokens already chosen for quantizers < q."""
        gamma, beta = self.film(previous + self.which[q]).chunk(2, dim=-1)
        z = F.gelu(self.hidden(torch.addcmul(beta, h_norm, 1 + gamma)))
        return torch.addmm(self.out_b[q], z, self.out_w[q])


class FilmPredictor(nn.Module):
    """Predicts a whole frame in one step, quantizer after quantizer (RVQ: quantizer q refines
    what quantizers < q left). Quantizer q sees the context h and the tokens of quantizers < q of
    the same frame (teacher-forced in training, sampled one after the other at inference):

        p_q          = sum of the embeddings of the frame's quantizers < q      (none for q = 0)
        gamma, beta  = W2_q GELU(W1_q (LN(drop(p_q)) + LN(h)) + b1_q) + b2_q     one MLP per q
        logits_q     = U_q GELU(LN(h) * (1 + gamma) + beta) + c_q

    The original MSPrior's MultivariatePredictor (one nonlinear FiLM per quantizer) with three
    changes: the MLP sees the context too (the token of a deep quantizer depends on how the context
    and the frame's coarser tokens combine, not on each alone), its input is layer-normalised (a
    sum of q embeddings grows with q), and FiLM is the identity at initialisation (W2 = 0). Weights are stored quantizer-major and input-major ([Q, in, out]): training runs
    the Q projections as one batched matmul, a streamed frame reads each as x @ W (the fast
    batch-1 layout, see InputMajorLinear). Per streamed frame: Q-1 FiLM MLPs (3 D^2 multiply-adds
    each) and Q output projections (D V each).
    """

    def __init__(self, dim: int, num_quantizers: int, vocab_size: int, dropout: float):
        super().__init__()
        self.num_quantizers = num_quantizers
        self.dim = dim
        n = max(num_quantizers - 1, 1)  # FiLM MLPs of quantizers 1..Q-1
        self.norm = nn.LayerNorm(dim)
        self.prev_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.film_in = nn.Parameter(torch.randn(n, dim, dim) * 0.02)
        self.film_in_b = nn.Parameter(torch.zeros(n, dim))
        self.film_out = nn.Parameter(torch.zeros(n, dim, 2 * dim))  # FiLM = identity at init
        self.film_out_b = nn.Parameter(torch.zeros(n, 2 * dim))
        self.out_w = nn.Parameter(torch.randn(num_quantizers, dim, vocab_size) * 0.02)
        self.out_b = nn.Parameter(torch.zeros(num_quantizers, vocab_size))

    def forward(self, h: Tensor, target_emb: Tensor) -> Tensor:
        """h [B, T, D], target_emb [B, T, Q, D] (per-quantizer embeddings) -> logits [B, T, Q, V]."""
        return self.qfirst(h, target_emb.permute(2, 0, 1, 3)).permute(1, 2, 0, 3)

    def _film(self, previous: Tensor, h_norm: Tensor) -> Tensor:
        """previous [Q-1, N, D] (sums of embeddings of quantizers < q, q = 1..Q-1), h_norm [1, N, D]
        -> [Q-1, N, 2D]."""
        x = self.prev_norm(self.drop(previous)) + h_norm
        u = F.gelu(torch.baddbmm(self.film_in_b.unsqueeze(1), x, self.film_in))
        return torch.baddbmm(self.film_out_b.unsqueeze(1), u, self.film_out)

    def _modulated(self, h: Tensor, target_emb: Tensor) -> Tensor:
        """The features GELU(z) [Q, B*T, D] fed to each quantizer's output projection."""
        q, b, t, d = target_emb.shape
        h_norm = self.norm(h).reshape(1, b * t, d)
        if q == 1:
            return F.gelu(h_norm)
        previous = (target_emb.cumsum(dim=0) - target_emb)[1:].reshape(q - 1, b * t, d)
        gamma, beta = self._film(previous, h_norm).chunk(2, dim=-1)
        z = torch.cat([h_norm, torch.addcmul(beta, h_norm, 1 + gamma)], dim=0)
        return F.gelu(z)

    def qfirst(self, h: Tensor, target_emb: Tensor) -> Tensor:
        """h [B, T, D], target_emb [Q, B, T, D] -> logits [Q, B, T, V] (quantizer-major)."""
        q, b, t, _ = target_emb.shape
        z = self._modulated(h, target_emb)
        return torch.baddbmm(self.out_b.unsqueeze(1), z, self.out_w).view(q, b, t, -1)

    def step_logits(self, h_norm: Tensor, previous: Tensor, q: int) -> Tensor:
        """Logits [B, V] of quantizer q for one frame: h_norm [B, D] = norm(h), previous [B, D]
        the summed embeddings of the tokens already chosen for quantizers < q."""
        z = h_norm
        if q > 0:
            u = F.gelu(torch.addmm(self.film_in_b[q - 1], self.prev_norm(previous) + h_norm, self.film_in[q - 1]))
            gamma, beta = torch.addmm(self.film_out_b[q - 1], u, self.film_out[q - 1]).chunk(2, dim=-1)
            z = torch.addcmul(beta, h_norm, 1 + gamma)
        return torch.addmm(self.out_b[q], F.gelu(z), self.out_w[q])


def _linear_from(weight_t: Tensor, bias: Tensor) -> nn.Linear:
    """nn.Linear computing x @ weight_t + bias (weight_t [in, out], input-major)."""
    lin = nn.Linear(weight_t.shape[0], weight_t.shape[1])
    with torch.no_grad():
        lin.weight.copy_(weight_t.T)
        lin.bias.copy_(bias)
    return lin


class Int8FilmPredictor(nn.Module):
    """FilmPredictor with its per-quantizer matrices split into nn.Linear heads, so dynamic int8
    (export --quantize int8) covers them: at 16 x 512 they are most of the weights read per frame.
    Same weights and math."""

    def __init__(self, predictor: FilmPredictor):
        super().__init__()
        self.num_quantizers = predictor.num_quantizers
        self.dim = predictor.dim
        self.norm = predictor.norm
        self.prev_norm = predictor.prev_norm
        self.drop = predictor.drop
        p = predictor
        self.films = nn.ModuleList([
            nn.Sequential(_linear_from(p.film_in[i], p.film_in_b[i]), nn.GELU(), _linear_from(p.film_out[i], p.film_out_b[i]))
            for i in range(p.film_in.shape[0])
        ])
        self.heads = nn.ModuleList([_linear_from(p.out_w[i], p.out_b[i]) for i in range(self.num_quantizers)])

    @torch.jit.unused
    def forward(self, h, target_emb):  # unannotated: TorchScript types an unused stub as Tensors
        return self.qfirst(h, target_emb.permute(2, 0, 1, 3)).permute(1, 2, 0, 3)

    @torch.jit.unused
    def qfirst(self, h, target_emb):
        """Teacher-forced logits [Q, B, T, V] (validation cross-entropy of the int8 model; eager only)."""
        q, b, t, d = target_emb.shape
        h_norm = self.norm(h).reshape(b * t, d)
        previous = (target_emb.cumsum(dim=0) - target_emb).reshape(q, b * t, d)
        out = [self.step_logits(h_norm, previous[i], i) for i in range(q)]
        return torch.stack(out, dim=0).view(q, b, t, -1)

    def step_logits(self, h_norm: Tensor, previous: Tensor, q: int) -> Tensor:
        z = h_norm
        if q > 0:
            p = self.prev_norm(previous) + h_norm
            for i, film in enumerate(self.films):  # TorchScript cannot index a ModuleList by a variable
                if i == q - 1:
                    gamma, beta = film(p).chunk(2, dim=-1)
                    z = torch.addcmul(beta, h_norm, 1 + gamma)
        z = F.gelu(z)
        out = z
        for i, head in enumerate(self.heads):
            if i == q:
                out = head(z)
        return out


class Int8SkipPredictor(nn.Module):
    """SkipPredictor with its output projection [Q, D, V] split into Q Linear heads, so that dynamic
    int8 (export --quantize int8) covers it too: at 16 x 512 x 1024 it is the largest weight read
    per frame. Same weights and math; `film` stays float (streaming reads its precomputed rows)."""

    def __init__(self, predictor: SkipPredictor):
        super().__init__()
        self.num_quantizers = predictor.num_quantizers
        self.norm = predictor.norm
        self.which = predictor.which
        self.film = predictor.film
        self.hidden = predictor.hidden
        self.drop = predictor.drop
        heads = []
        for q in range(self.num_quantizers):
            head = nn.Linear(predictor.out_w.shape[1], predictor.out_w.shape[2])
            with torch.no_grad():
                head.weight.copy_(predictor.out_w[q].T)
                head.bias.copy_(predictor.out_b[q])
            heads.append(head)
        self.heads = nn.ModuleList(heads)

    @torch.jit.unused
    def forward(self, h, target_emb):  # unannotated: TorchScript types an unused stub as Tensors
        return self.qfirst(h, target_emb.permute(2, 0, 1, 3)).permute(1, 2, 0, 3)

    def qfirst(self, h: Tensor, target_emb: Tensor) -> Tensor:
        """Teacher-forced logits [Q, B, T, V] (validation cross-entropy of the int8 model; eager only)."""
        z = SkipPredictor._modulated(self, h, target_emb)  # type: ignore[arg-type]
        return torch.stack([head(z[i]) for i, head in enumerate(self.heads)], dim=0)

    def step_logits(self, h_norm: Tensor, previous: Tensor, q: int) -> Tensor:
        gamma, beta = self.film(previous + self.which[q]).chunk(2, dim=-1)
        z = F.gelu(self.hidden(torch.addcmul(beta, h_norm, 1 + gamma)))
        out = z
        for i, head in enumerate(self.heads):  # TorchScript cannot index a ModuleList by a variable
            if i == q:
                out = head(z)
        return out


def int8_predictor(predictor: nn.Module) -> nn.Module:
    """The predictor with per-quantizer nn.Linear heads, ready for dynamic int8 (same math)."""
    if isinstance(predictor, FilmPredictor):
        return Int8FilmPredictor(predictor)
    if isinstance(predictor, SkipPredictor):
        return Int8SkipPredictor(predictor)
    return predictor  # already split


class InputMajorLinear(nn.Module):
    """nn.Linear with its weight stored input-major, [in, out], for batch-1 streaming on a CPU.

    A generated frame is a chain of matrix-vector products that read every weight once, so their
    speed is the speed of reading weights. On one core `x @ W` with W [in, out] contiguous reads at
    ~26 GB/s, where F.linear's `x @ W.T` (PyTorch's [out, in] layout) reads at ~16 GB/s
    (bench/realtime.py). Same math; made from a trained nn.Linear at export (fp32 only: int8
    keeps nn.Linear, which dynamic quantisation replaces).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.has_bias = linear.bias is not None
        bias = linear.bias.detach() if linear.bias is not None else torch.zeros(0)
        self.bias = nn.Parameter(bias.clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(x, self.weight_t)  # leading dims fold into one [rows, in] x [in, out] product
        return y + self.bias if self.has_bias else y


def input_major_linears(module: nn.Module, keep: Tuple[str, ...] = ()) -> None:
    """Replace, in place, every nn.Linear of `module` (but those named in `keep`) with an
    InputMajorLinear."""
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if isinstance(sub, nn.Linear) and full not in keep:
                setattr(child, attr, InputMajorLinear(sub))


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
