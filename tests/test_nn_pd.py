"""Our exports inside the real client: nn~ (built from its public source against libtorch 2.5.1, the
version nn~ 1.6 ships) in real PureData (Debian's puredata-core), headless.

The example patches under examples/ are run as they ship; tests/pd/harness.py appends recorders,
timed `set` messages and a noise source, and reads nn~'s own info outlet (methods, attributes,
dims). Checks: tokens in range and changing, listen on = the prior repeats what the encoder
hears, listen off = it generates, `set temperature 0` = greedy (so `set reset 1` replays the same
frames, and without a reset they differ), the perplexity outlet finite and positive, the decoded
audio not silent. If nn~ cannot be built or Pd is missing the test FAILS (CI installs both:
.ci/run); it never skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "pd"))
import harness  # noqa: E402
import pd_models  # noqa: E402

ROOT = os.path.dirname(HERE)
EXAMPLES = os.path.join(ROOT, "examples")
RAVE = os.path.join(HERE, "fixtures", "rave", "v2_discrete_streaming.ts")
BUILD = os.path.join(HERE, "pd", "build_nn_tilde.sh")
SR = harness.SR
BUF = 1024  # nn~ after `bufsize 0` (harness): one model call per RAVE frame (the largest ratio)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def nn_external():
    """The directory of nn~.pd_linux; a missing tool or a failed build FAILS the test."""
    if shutil.which("pd") is None:
        pytest.fail("PureData is not installed (apt-get install puredata-core puredata-dev; see .ci/run)")
    env = dict(os.environ, PYTHON=sys.executable)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", BUILD], capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        pytest.fail(f"building nn~ failed (bash {BUILD}):\n{proc.stderr[-4000:]}")
    out = proc.stdout.strip().splitlines()[-1]
    print(f"nn~ build: {time.monotonic() - t0:.1f} s -> {out}")
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    # one thread here too: a module fixture runs before the function-scoped `one_torch_thread`, and two
    # OpenMP threads spinning against each other on a loaded 2-core machine made this 20x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pd_models.make_exports(str(tmp_path_factory.mktemp("pd_models")), RAVE)
    finally:
        torch.set_num_threads(before)


def model_contract(path: str) -> dict:
    """What the .ts declares (read with torch here; nn~ reads the same fields): forward's params and
    each attribute's nn~ type id (0 bool, 1 int, 2 float, 3 str)."""
    m = torch.jit.load(path, map_location="cpu")
    attrs = [a for a in m.get_attributes() if a != "none"]
    return {"forward": [int(v) for v in m.forward_params],
            "types": {a: int(getattr(m, f"{a}_params")[0]) for a in attrs}}


def workdir(tmp_path, example: str, models: dict) -> str:
    """The example patch next to its models, under the names the patch uses."""
    shutil.copy(os.path.join(EXAMPLES, example), tmp_path / example)
    for name, src in models.items():
        shutil.copy(src, tmp_path / name)
    return str(tmp_path)


# -- reading the recordings -------------------------------------------------------------------------


def frames(x: np.ndarray, ratio: int) -> np.ndarray:
    """Per-frame values of a sample-and-hold signal (nn~ repeats each frame `ratio` times)."""
    return x[ratio // 2::ratio]


def ms(t: float) -> int:
    return int(t * SR / 1000)


def token_matrix(run: harness.PdRun, prefix: str, q: int, ratio: int) -> np.ndarray:
    """[frames, q] tokens recorded as tables prefix0..prefix{q-1}."""
    return np.stack([frames(run.tables[f"{prefix}{i}"], ratio) for i in range(q)], axis=1)


def window(m: np.ndarray, t0: float, t1: float, ratio: int) -> np.ndarray:
    """Rows of a per-frame matrix between two times in ms (the first buffer after t0 skipped: a
    `set` lands at the next model call, and nn~ answers one buffer later)."""
    return m[(ms(t0) + 2 * BUF) // ratio: ms(t1) // ratio]


def best_lag(a: np.ndarray, b: np.ndarray, max_lag: int) -> tuple:
    """(lag, fraction of rows equal) maximising how many rows of b[lag:] equal a[:-lag]."""
    best = (0, 0.0)
    for lag in range(max_lag + 1):
        n = min(len(a), len(b) - lag)
        eq = float(np.mean(np.all(a[:n] == b[lag:lag + n], axis=1))) if n > 0 else 0.0
        best = max(best, (lag, eq), key=lambda t: t[1])
    return best


def contains(seq: np.ndarray, sub: np.ndarray) -> bool:
    """Whether the rows of `sub` appear contiguously in `seq`."""
    return any(np.array_equal(seq[i:i + len(sub)], sub) for i in range(len(seq) - len(sub) + 1))


# -- prior -> RAVE decode ----------------------------------------------------------------------------

# (time ms, message to the prior) and the phases they start; every phase lasts until the next one
SCHEDULE = [
    (0, ["set listen 1"], "listen"),                       # Pd floats: nn~ passes "1.000000"
    (2500, ["set listen 0"], "generate"),
    (5000, ["set temperature 0", "set reset 1"], "greedy"),  # greedy from a fresh stream
    (7000, [], "greedy_on"),                                # greedy, no reset: the stream goes on
    (9000, ["set reset 1"], "greedy_again"),                # must replay "greedy"
    (11000, ["set temperature 1", "set reset 1"], "sampled"),  # sampling from a fresh stream
    (13000, ["set listen true"], "listen_sym"),             # the original's bool spelling
    (15000, ["set listen false"], "generate_sym"),
]
END_MS = 17000


def phase(m: np.ndarray, name: str, ratio: int) -> np.ndarray:
    i = [p for _, _, p in SCHEDULE].index(name)
    t1 = SCHEDULE[i + 1][0] if i + 1 < len(SCHEDULE) else END_MS
    return window(m, SCHEDULE[i][0], t1, ratio)


def run_prior_rave(tmp_path, external: str, prior_ts: str) -> tuple:
    work = workdir(tmp_path, "prior_rave.pd", {"rave.ts": RAVE, "prior.ts": prior_ts})
    patch = harness.Instrumented(open(os.path.join(work, "prior_rave.pd")).read())
    nn = {o.model + " " + o.method: o.index for o in harness.nn_objects(patch.text)}
    enc, prior, dec = nn["rave.ts encode"], nn["prior.ts forward"], nn["rave.ts decode"]
    contract = model_contract(prior_ts)
    in_ch, ratio, out_ch, _ = contract["forward"]
    q = out_ch - 1
    n = ms(END_MS)
    patch.connect(patch.obj("noise~"), 0, enc, 0)  # [adc~] is silent under -noaudio
    for i in range(q):
        patch.record(f"enc{i}", enc, i, n)
        patch.record(f"tok{i}", prior, i, n)
    patch.record("perplexity", prior, q, n)
    patch.record("audio", dec, 0, n)
    for tag, index, outlets in (("prior", prior, out_ch), ("enc", enc, q)):
        patch.connect(patch.loadbang(), 0, index, 0)  # bang: nn~ prints its info
        patch.connect(index, outlets, patch.obj(f"print {tag}"), 0)
    for t, messages, _ in SCHEDULE:
        for m in messages:
            patch.at(t, prior, m)
    run = harness.run_pd(patch, work, external, END_MS + 200)
    return run, contract, ratio, q


@pytest.mark.parametrize("variant", ["prior", "prior_int8"])
def test_prior_with_rave_decode(nn_external, exports, tmp_path, variant):
    run, contract, ratio, q = run_prior_rave(tmp_path, nn_external, exports[variant])
    print(f"{variant}: {END_MS / 1000:.0f} s of audio in {run.seconds:.1f} s of Pd")
    assert run.returncode == 0, run.stderr[-3000:]
    assert not run.errors(), run.errors()
    info = run.info("prior")
    assert info.get("loaded") == ["1"], run.stderr[-3000:]
    attrs = info["attributes"]
    assert {"temperature", "listen", "reset"} <= set(attrs), attrs
    assert set(attrs) == set(contract["types"]), (attrs, contract["types"])  # nn~ sees what the file declares
    assert [int(float(v)) for v in info["dim"]] == [contract["forward"][0], contract["forward"][2]]

    vocab = pd_models.rave_facts(RAVE)["vocab"]
    enc, tok = token_matrix(run, "enc", q, ratio), token_matrix(run, "tok", q, ratio)
    body = tok[3 * BUF // ratio:]  # nn~'s first buffers are zeros (latency)
    assert np.all(body == np.round(body)) and body.min() >= 0 and body.max() < vocab

    # listen on: the prior's latent outlets repeat the encoder's tokens (one nn~ buffer later)
    for listening, generating in (("listen", "generate"), ("listen_sym", "generate_sym")):
        lag, eq = best_lag(phase(enc, listening, ratio), phase(tok, listening, ratio), 3 * BUF // ratio)
        assert eq > 0.95, f"{listening}: the prior does not follow the encoder (best lag {lag}: {eq:.2f})"
        e, g = phase(enc, generating, ratio), phase(tok, generating, ratio)
        same = float(np.mean(np.all(e[:len(g) - lag] == g[lag:], axis=1)))
        assert same < 0.5, f"{generating}: `set listen` off did not take effect ({same:.2f} of frames = input)"
        assert len(np.unique(g, axis=0)) > len(g) // 2, f"{generating}: tokens do not change over time"

    # temperature 0 is greedy: `set reset 1` replays the same frames, no reset goes on elsewhere
    first = phase(tok, "greedy", ratio)[4:16]
    assert contains(phase(tok, "greedy_again", ratio), first), "`set reset 1` (greedy) did not replay"
    assert not contains(phase(tok, "greedy_on", ratio), first), "greedy frames repeat without a reset"
    assert not contains(phase(tok, "sampled", ratio), first), "`set temperature 1` did not take effect"

    perplexity = frames(run.tables["perplexity"], ratio)[3 * BUF // ratio:]
    assert np.all(np.isfinite(perplexity)) and np.all(perplexity > 0), perplexity[perplexity <= 0][:10]
    audio = run.tables["audio"][ms(SCHEDULE[1][0]):]
    assert np.all(np.isfinite(audio)) and float(np.sqrt(np.mean(audio ** 2))) > 1e-3


# -- seq2seq prior (RAVE tokens + a conditioning token) -----------------------------------------------


def test_seq2seq_prior(nn_external, exports, tmp_path):
    work = workdir(tmp_path, "seq2seq_prior.pd", {"rave.ts": RAVE, "seq2seq.ts": exports["seq2seq"]})
    patch = harness.Instrumented(open(os.path.join(work, "seq2seq_prior.pd")).read())
    nn = {o.model + " " + o.method: o.index for o in harness.nn_objects(patch.text)}
    enc, prior, dec = nn["rave.ts encode"], nn["seq2seq.ts forward"], nn["rave.ts decode"]
    contract = model_contract(exports["seq2seq"])
    in_ch, ratio, out_ch, _ = contract["forward"]
    q = out_ch - 1
    assert in_ch == q + 1, "a token-conditioned prior takes Q latent inlets + 1 conditioning inlet"
    cls = [i for i, r in enumerate(harness.top_level_objects(harness.records(patch.text)))
           if r.startswith("#X floatatom") and "conditioning" in r][0]
    end = 8000
    patch.connect(patch.obj("noise~"), 0, enc, 0)
    for i in range(q):
        patch.record(f"enc{i}", enc, i, ms(end))
        patch.record(f"tok{i}", prior, i, ms(end))
    patch.record("perplexity", prior, q, ms(end))
    patch.record("audio", dec, 0, ms(end))
    patch.connect(patch.loadbang(), 0, prior, 0)
    patch.connect(prior, out_ch, patch.obj("print prior"), 0)
    for t, target, m in [(0, cls, "1"), (0, prior, "set listen 1"), (3000, prior, "set listen 0"),
                         (5500, cls, "5")]:
        patch.at(t, target, m)
    run = harness.run_pd(patch, work, nn_external, end + 200)
    print(f"seq2seq: {end / 1000:.0f} s of audio in {run.seconds:.1f} s of Pd")
    assert run.returncode == 0 and not run.errors(), (run.errors(), run.stderr[-3000:])
    info = run.info("prior")
    assert {"temperature", "listen", "reset"} <= set(info["attributes"]), info
    assert [int(float(v)) for v in info["dim"]] == [in_ch, out_ch]

    vocab = pd_models.rave_facts(RAVE)["vocab"]
    enc_m, tok = token_matrix(run, "enc", q, ratio), token_matrix(run, "tok", q, ratio)
    lag, eq = best_lag(window(enc_m, 0, 3000, ratio), window(tok, 0, 3000, ratio), 3)
    assert eq > 0.95, f"listen on: the prior does not follow the encoder ({eq:.2f})"
    gen = window(tok, 3000, end, ratio)
    assert gen.min() >= 0 and gen.max() < vocab and np.all(gen == np.round(gen))
    assert len(np.unique(gen, axis=0)) > len(gen) // 2, "generated tokens do not change over time"
    perplexity = frames(run.tables["perplexity"], ratio)[3:]
    assert np.all(np.isfinite(perplexity)) and np.all(perplexity > 0)
    audio = run.tables["audio"][ms(3000):]
    assert np.all(np.isfinite(audio)) and float(np.sqrt(np.mean(audio ** 2))) > 1e-3


# -- msprior combine: one file, `[nn~ combined.ts generate]` makes sound ---------------------------------


def test_combine_generate(nn_external, exports, tmp_path):
    combined = str(tmp_path / "combined.ts")
    msprior = os.path.join(os.path.dirname(sys.executable), "msprior")
    proc = subprocess.run([msprior, "combine", "--prior", exports["prior"], "--rave", RAVE, "--out", combined],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (tmp_path / "pd").mkdir()
    work = workdir(tmp_path / "pd", "combine.pd", {"combined.ts": combined})
    patch = harness.Instrumented(open(os.path.join(work, "combine.pd")).read())
    gen = [o.index for o in harness.nn_objects(patch.text) if o.method == "generate"][0]
    m = torch.jit.load(combined, map_location="cpu")
    assert {"encode", "decode", "forward", "prior", "generate"} <= set(m.get_methods())
    out_ch = int(m.generate_params[2])
    end = 6000
    patch.record("audio", gen, 0, ms(end))
    patch.connect(patch.loadbang(), 0, gen, 0)
    patch.connect(gen, out_ch, patch.obj("print combined"), 0)
    for t, msg in [(0, "set temperature 1"), (3000, "set reset 1"), (3000, "set temperature 0.5")]:
        patch.at(t, gen, msg)
    run = harness.run_pd(patch, work, nn_external, end + 200)
    print(f"combine generate: {end / 1000:.0f} s of audio in {run.seconds:.1f} s of Pd")
    assert run.returncode == 0 and not run.errors(), (run.errors(), run.stderr[-3000:])
    info = run.info("combined")
    assert info.get("method") == ["generate"], info
    assert {"temperature", "listen", "learn_context", "reset"} <= set(info["attributes"]), info
    audio = run.tables["audio"][ms(500):]
    assert np.all(np.isfinite(audio)) and float(np.sqrt(np.mean(audio ** 2))) > 1e-3
    # the decoded audio changes over time (not one repeated buffer)
    blocks = audio[: len(audio) // 1024 * 1024].reshape(-1, 1024)
    assert len(np.unique(blocks.round(5), axis=0)) > len(blocks) // 2


# -- cheap checks: the Max twins of the Pd patches, a failing build ---------------------------------------


@pytest.mark.parametrize("name", ["prior_rave", "seq2seq_prior", "combine"])
def test_max_patch_matches_the_pd_patch(name):
    """Each .maxpat is a Max patcher (JSON) with the same nn~ objects as its Pd twin, wired the same
    (the same number of connections into and out of each nn~)."""
    import json

    pd_text = open(os.path.join(EXAMPLES, f"{name}.pd")).read()
    boxes = json.load(open(os.path.join(EXAMPLES, f"{name}.maxpat")))["patcher"]
    ids = {b["box"]["id"]: b["box"].get("text", "") for b in boxes["boxes"]}
    max_nn = sorted(t for t in ids.values() if t.startswith("nn~ "))
    pd_nn = sorted(f"nn~ {o.model} {o.method}" for o in harness.nn_objects(pd_text))
    assert max_nn == pd_nn
    lines = [(ln["patchline"]["source"][0], ln["patchline"]["destination"][0]) for ln in boxes["lines"]]
    assert all(a in ids and b in ids for a, b in lines)
    pd_links = [r.split()[2:6] for r in harness.records(pd_text) if r.startswith("#X connect")]
    objs = harness.top_level_objects(harness.records(pd_text))
    for o in harness.nn_objects(pd_text):
        key = f"nn~ {o.model} {o.method}"
        pd_in = sum(int(c[2]) == o.index for c in pd_links)
        pd_out = sum(int(c[0]) == o.index for c in pd_links)
        box = [i for i, t in ids.items() if t == key][0]
        assert (sum(b == box for _, b in lines), sum(a == box for a, _ in lines)) == (pd_in, pd_out), (key, objs[o.index])


def test_build_fails_loudly_without_pd_headers(tmp_path):
    proc = subprocess.run(["bash", BUILD], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PD_INCLUDE=str(tmp_path), NN_TILDE_CACHE=str(tmp_path)))
    assert proc.returncode != 0
    assert "puredata-dev" in proc.stderr.strip().splitlines()[-1]
