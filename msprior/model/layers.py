"""The context network of the prior: ALiBi attention with KV caches, the transformer and GRU stacks.

Shapes: B batch, T frames, D model width, H heads, Dh head width. Two ways through the same weights:
full sequence (training) and streaming (nn~), equal frame for frame because every mask is built from
absolute frame positions (docs in msprior/model/prior.py). TorchScript-scriptable: plain ops only.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from msprior.config import ModelConfig


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
