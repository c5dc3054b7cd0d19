"""The prior: streaming equals full-sequence, caches stay bounded, it learns, it scripts."""

import pytest
import torch

from msprior.config import load_config
from msprior.model import DatasetFacts, InputMajorLinear, alibi_slopes, build_prior, input_major_linears

Q, V = 4, 16
TINY = ["model.dim=32", "model.num_layers=2", "model.num_heads=4", "model.head_dim=8",
        "model.dropout=0.0", "model.cond_layers=1", "model.cond_ratio=4"]
FACTS = DatasetFacts(num_quantizers=Q, vocab_size=V, cond_ratio=4, cond_vocab=8, cond_features=5,
                     feature_mean=[0.5] * 5, feature_std=[2.0] * 5)


def tiny(name, seq_len=64, extra=()):
    torch.manual_seed(0)
    cfg = load_config(name, TINY + [f"model.seq_len={seq_len}", *extra])
    return build_prior(cfg.model, FACTS).eval(), cfg


def conditioning(cfg, B, T, r=4):
    """(cond at the conditioning rate for `context`, the same at the decoder rate for streaming)."""
    Tc = -(-T // r)
    if cfg.model.conditioning == "tokens":
        c = torch.randint(0, FACTS.cond_vocab, (B, Tc))
    elif cfg.model.conditioning == "features":
        c = torch.randn(B, Tc, FACTS.cond_features)
    else:
        return None, None
    return c, c.repeat_interleave(r, dim=1)[:, :T]


def stream(prior, x, cond_up, chunk):
    B, T, _ = x.shape
    prior.init_stream(B)
    hs = []
    for t in range(0, T, chunk):
        c = None if cond_up is None else cond_up[:, t : t + chunk]
        hs.append(prior.stream_context(x[:, t : t + chunk], c))
    return torch.cat(hs, dim=1)


CONFIGS = ["decoder_only", "recurrent", "encoder_decoder", "encoder_decoder_continuous"]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("seq_len", [128, 48])  # 48 < 128: the sliding window is exercised too
def test_streaming_equals_full_sequence(name, seq_len):
    prior, cfg = tiny(name, seq_len)
    B, T = 2, 128
    x = torch.randint(0, V, (B, T, Q))
    y = torch.randint(0, V, (B, T, Q))
    cond, cond_up = conditioning(cfg, B, T)
    with torch.no_grad():
        full = prior.predictor(prior.context(x, cond), prior.embedding(y))
        for chunk in (1, 7, 32):
            h = stream(prior, x, cond_up, chunk)
            streamed = prior.predictor(h, prior.embedding(y))
            torch.testing.assert_close(streamed, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_input_major_weights_stream_what_the_trained_layout_computes(name):
    """The fp32 export's layout (weights [in, out], faster for batch-1 products on a CPU) changes no
    output: streamed through it equals the trained model's full sequence; greedy frames are equal."""
    import copy

    prior, cfg = tiny(name, seq_len=48)
    fast = copy.deepcopy(prior)
    input_major_linears(fast)
    left = [n for n, m in fast.named_modules() if isinstance(m, torch.nn.Linear)]
    assert left == []
    assert cfg.model.family == "gru" or any(isinstance(m, InputMajorLinear) for m in fast.modules())
    B, T = 2, 100
    x, y = torch.randint(0, V, (B, T, Q)), torch.randint(0, V, (B, T, Q))
    cond, cond_up = conditioning(cfg, B, T)
    with torch.no_grad():
        full = prior.predictor(prior.context(x, cond), prior.embedding(y))
        h = stream(fast, x, cond_up, 1)
        torch.testing.assert_close(fast.predictor(h, fast.embedding(y)), full, atol=1e-4, rtol=0)
        frames = [p.predict(stream(p, x, cond_up, 7)[:, -1], 0.0)[0] for p in (prior, fast)]
    assert torch.equal(frames[0], frames[1])


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_sampling_through_caches_equals_recompute(name):
    prior, cfg = tiny(name, seq_len=32)
    B, prompt, steps = 2, 5, 40  # 45 frames > seq_len: the window slides while generating
    x = torch.randint(0, V, (B, prompt, Q))
    cond, cond_up = conditioning(cfg, B, prompt + steps)
    with torch.no_grad():
        # cached: feed the prompt, then each generated frame
        prior.init_stream(B)
        h = prior.stream_context(x, None if cond_up is None else cond_up[:, :prompt])
        cached = []
        for t in range(prompt, prompt + steps):
            frame, ppl = prior.predict(h[:, -1], 0.0)
            cached.append(frame)
            c = None if cond_up is None else cond_up[:, t : t + 1]
            h = prior.stream_context(frame.unsqueeze(1), c)
        # reference: recompute the whole prefix for every frame
        seq = x
        for t in range(prompt, prompt + steps):
            c = None if cond is None else cond[:, : -(-t // 4)]
            frame, ppl_ref = prior.sample(seq, c, temperature=0.0)
            seq = torch.cat([seq, frame.unsqueeze(1)], dim=1)
    assert torch.equal(torch.stack(cached, dim=1), seq[:, prompt:])
    assert torch.all(ppl >= 1.0)


@pytest.mark.parametrize("name", CONFIGS)
def test_stream_state_never_grows(name):
    prior, cfg = tiny(name, seq_len=16)
    B = 3
    prior.init_stream(B)
    initial = prior.stream_state_numel()
    sizes = set()
    with torch.no_grad():
        for step in range(100):  # 100 x 5 = 500 frames, 30x the window
            n = 5
            x = torch.randint(0, V, (B, n, Q))
            _, c = conditioning(cfg, B, n)
            prior.stream_context(x, c)
            sizes.add(prior.stream_state_numel())
            for name_, buf in prior.named_buffers():
                if name_.endswith("k_cache"):
                    assert buf.shape[2] <= 16
    assert sizes == {initial}
    assert int(prior.pos[0]) == 500


def test_temperature_sampling_and_listen_scoring():
    prior, _ = tiny("decoder_only")
    h = torch.randn(4, 32)
    torch.manual_seed(1)
    a, _ = prior.predict(h, 1.0)
    assert a.shape == (4, Q) and a.dtype == torch.long and a.min() >= 0 and a.max() < V
    given = torch.randint(0, V, (4, Q))
    scored, ppl = prior.predict(h, 0.0, given)
    assert torch.equal(scored, given)
    # the original MSPrior's perplexity: exp(entropy) of each quantizer's predictive distribution
    # (teacher-forced on the given tokens), averaged over quantizers
    logits = prior.predictor(h.unsqueeze(1), prior.embedding(given.unsqueeze(1)))[:, 0]
    logp = torch.log_softmax(logits, -1)
    expected = torch.exp(-(logp.exp() * logp).sum(-1)).mean(-1)
    torch.testing.assert_close(ppl, expected, atol=1e-4, rtol=1e-4)
    assert bool((ppl >= 1.0).all() and (ppl <= V).all())


def test_quantizer_losses_average_to_the_loss():
    prior, _ = tiny("decoder_only")
    batch = {"rave": torch.randint(0, V, (3, 20, Q))}
    per_q = prior.quantizer_losses(batch)
    assert per_q.shape == (Q,)
    torch.testing.assert_close(per_q.mean(), prior.loss(batch), atol=1e-5, rtol=1e-5)


def test_sampling_draws_the_tempered_distribution():
    """Inverse-CDF sampling: empirical frequencies match softmax(logp / T); zero-probability tokens
    are never drawn (also in TorchScript)."""
    from msprior.model.prior import sample_categorical

    torch.manual_seed(0)
    p = torch.softmax(torch.randn(8) * 2, -1)
    p[3] = 0.0
    logp = (p / p.sum()).log().expand(100_000, 8).contiguous()
    for temperature in (1.0, 0.5):
        tokens = sample_categorical(logp, temperature)
        assert tokens.shape == (100_000, 1) and tokens.dtype == torch.long
        freq = torch.bincount(tokens.view(-1), minlength=8).float() / tokens.numel()
        torch.testing.assert_close(freq, torch.softmax(logp[0] / temperature, -1), atol=5e-3, rtol=0)
        assert freq[3] == 0
    scripted = torch.jit.script(sample_categorical)
    assert int(scripted(logp[:1], 1.0)) != 3


def test_tiny_model_learns_periodic_sequence():
    """A periodic multi-quantizer sequence is learnt to near-zero loss in a few hundred CPU steps."""
    torch.manual_seed(0)
    cfg = load_config("decoder_only", ["model.dim=64", "model.num_layers=2", "model.num_heads=4",
                                       "model.head_dim=16", "model.seq_len=32", "model.dropout=0.0"])
    prior = build_prior(cfg.model, FACTS)
    period = torch.randint(0, V, (6, Q))  # a 6-frame motif, Q tokens per frame
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    for step in range(300):
        phase = torch.randint(0, 6, (16,))
        idx = (phase.unsqueeze(1) + torch.arange(33)) % 6
        loss = prior.loss({"rave": period[idx]})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_forward_backward(name):
    """Every shipped config, at its real size, builds and runs one forward/backward pass."""
    cfg = load_config(name, ["model.seq_len=16"])  # real width/depth, short window to stay fast
    facts = DatasetFacts(num_quantizers=8, vocab_size=64, cond_ratio=4, cond_vocab=16, cond_features=5)
    prior = build_prior(cfg.model, facts)
    B, T = 2, 16
    batch = {"rave": torch.randint(0, 64, (B, T + 1, 8))}
    if cfg.model.conditioning == "tokens":
        batch["tokens"] = torch.randint(0, 16, (B, T // 4))
    if cfg.model.conditioning == "features":
        batch["features"] = torch.randn(B, T // 4, 5)
    loss = prior.loss(batch)
    loss.backward()
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5  # ~uniform at init
    grads = [p.grad for p in prior.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_pretrained_embedding_is_frozen_and_projected():
    torch.manual_seed(0)
    codebooks = torch.randn(Q, V, 6)
    cfg = load_config("decoder_only", TINY + ["model.pretrained_embedding_dim=6"])
    prior = build_prior(cfg.model, FACTS, codebooks=codebooks)
    assert torch.equal(prior.embedding.table.weight.view(Q, V, 6), codebooks)
    prior.loss({"rave": torch.randint(0, V, (2, 9, Q))}).backward()
    assert prior.embedding.table.weight.grad is None
    assert prior.embedding.proj.weight.grad is not None
    with pytest.raises(ValueError, match="codebooks have shape"):
        build_prior(cfg.model, FACTS, codebooks=torch.randn(Q, V, 5))


def test_conditioning_mismatch_is_a_clear_error():
    cfg = load_config("encoder_decoder", TINY + ["model.cond_ratio=2"])
    with pytest.raises(ValueError, match="cond_ratio=2.*ratio 4"):
        build_prior(cfg.model, FACTS)
    with pytest.raises(ValueError, match="no conditioning tokens"):
        build_prior(load_config("encoder_decoder", TINY).model, DatasetFacts(Q, V))


def test_alibi_slopes():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s6 = alibi_slopes(6)
    assert s6.shape == (6,) and torch.all(s6 > 0) and torch.all(s6 <= 0.5)


@pytest.mark.parametrize("name", CONFIGS)
def test_scripted_stream_matches_eager(name):
    prior, cfg = tiny(name)
    scripted = torch.jit.script(prior)
    B, T = 2, 20
    x = torch.randint(0, V, (B, T, Q))
    _, cond_up = conditioning(cfg, B, T)
    with torch.no_grad():
        a = stream(prior, x, cond_up, 7)
        b = stream(scripted, x, cond_up, 7)
    torch.testing.assert_close(a, b)


def test_a_checkpoint_from_before_model_predictor_loads_as_it_was_trained(tmp_path):
    """Runs trained before `model.predictor` existed used the shared linear FiLM: their checkpoint
    config has no `predictor` key; loading names it, so the weights fit the model built from it."""
    from dataclasses import asdict

    from msprior.checkpoint import load_checkpoint, save_checkpoint
    from msprior.config import Config

    old, cfg = tiny("decoder_only", extra=["model.predictor=linear_film"])
    config = asdict(cfg)
    del config["model"]["predictor"]
    save_checkpoint(str(tmp_path), {"config": config, "model": old.state_dict()})
    state = load_checkpoint(str(tmp_path))
    loaded = build_prior(Config.from_dict(state["config"]).model, FACTS)
    loaded.load_state_dict(state["model"])  # strict: fails if the default predictor were built
    assert state["config"]["model"]["predictor"] == "linear_film"


def _skewed_windows(n=8, t=33, seed=0):
    """Windows [n, t, Q] of tokens drawn from peaked per-quantizer marginals (no context)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(Q, V, generator=g) * 2.5, dim=-1)
    cols = [torch.multinomial(probs[q], n * t, replacement=True, generator=g) for q in range(Q)]
    return torch.stack(cols, dim=-1).view(n, t, Q)


@pytest.mark.parametrize("predictor", ["film", "linear_film"])
def test_unigram_bias_starts_the_prior_at_the_unigram_floor(predictor):
    """train.unigram_bias: an untrained prior whose output biases start at the log unigram of the
    training tokens scores that unigram's cross-entropy (the floor), not ln V."""
    import math

    import numpy as np

    from msprior.train import quality

    rave = _skewed_windows()
    prior, _ = tiny("decoder_only", extra=[f"model.predictor={predictor}"])
    before = prior.quantizer_losses({"rave": rave})
    counts = quality.token_counts(rave.numpy(), V)
    prior.init_output_bias(torch.from_numpy(counts))
    after = prior.quantizer_losses({"rave": rave})
    floor = quality.unigram_ce(counts, quality.target_counts([{"rave": rave.numpy()}], V))
    assert np.all(floor < math.log(V) - 0.5)  # peaked marginals: the floor is far below ln V
    torch.testing.assert_close(before, torch.full((Q,), math.log(V)), atol=0.1, rtol=0)  # small random logits
    torch.testing.assert_close(after.double(), torch.from_numpy(floor), atol=0.05, rtol=0)
    torch.testing.assert_close(prior.predictor.out_b.sum(dim=1), torch.zeros(Q), atol=1e-4, rtol=0)  # centred
    with pytest.raises(ValueError, match="expected"):
        prior.init_output_bias(torch.ones(Q, V + 1))


def test_sampler_counts_are_the_training_chunks_tokens():
    """What a fresh training initialises the biases from: the tokens of the chunks its window sampler
    draws from (a chunk too short for a window is not counted), capped at max_frames."""
    import numpy as np

    from msprior.data.reader import Frames
    from msprior.data.windows import WindowSampler
    from msprior.train import quality

    rave = _skewed_windows(1, 100, seed=1)[0].numpy().astype(np.int16)  # chunks of 40, 10 (too short), 50
    frames = Frames(rave=rave, starts=np.array([0, 40, 50]), lengths=np.array([40, 10, 50]))
    sampler = WindowSampler(frames, seq_len=16)
    expected = quality.token_counts(np.concatenate([rave[:40], rave[50:]]), V)
    np.testing.assert_array_equal(quality.sampler_counts(sampler, V), expected)
    np.testing.assert_array_equal(quality.sampler_counts(sampler, V, max_frames=45),
                                  quality.token_counts(np.concatenate([rave[:40], rave[50:55]]), V))
