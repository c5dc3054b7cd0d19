"""The token embedding and the per-quantizer predictors (full precision and int8 for export).

Shapes: B batch, T frames, Q quantizers, V vocabulary per quantizer, D model width. A predictor turns
the context h [B,T,D] and the embeddings of the frame's quantizers < q into the logits of quantizer q;
`step_logits` is the same computation one quantizer at a time (sampling, nn~).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor



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
