"""`msprior combine`: a prior export + a streaming RAVE export (RAVE's own exporter, tests/fixtures/rave)
in one nn~ file, driven the way nn~'s backend drives it (tests/nn_host.py); `msprior compact`'s answer.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from export_runs import TINY, manifest
from msprior.checkpoint import save_checkpoint, write_run_json
from msprior.config import load_config
from msprior.export.metadata import read_metadata
from msprior.export.combine import CombineError, CombineRequest, combine, rave_mismatch
from msprior.export.run import export_run
from msprior.model import DatasetFacts, build_prior
from msprior.rave import load_rave
from nn_host import Host, pd_arg

HERE = os.path.dirname(os.path.abspath(__file__))
RAVES = os.path.join(HERE, "fixtures", "rave")
ORIGINAL_ATTRIBUTES = ["temperature", "listen", "learn_context", "reset"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def matched_prior(root, config: str, rave_file: str, resolution: int = 16) -> str:
    """An msprior export whose latent table (manifest) was encoded with `rave_file`'s model (random
    weights: combine's contract does not depend on what the prior learnt)."""
    r = load_rave(os.path.join(RAVES, rave_file), allow_streaming=True)
    cfg = load_config(config, TINY)
    man = manifest(not r.discrete, cfg.model.conditioning)
    vocab = r.codebook_size if r.discrete else resolution
    man["rave"].update(sr=r.sr, ratio=r.ratio, latent_size=r.latent_size, num_quantizers=r.latent_size,
                       vocab_size=vocab, resolution=None if r.discrete else resolution, original_name=rave_file)
    torch.manual_seed(0)
    prior = build_prior(cfg.model, DatasetFacts.from_manifest(man))
    run = os.path.join(str(root), f"{config}-{rave_file}")
    ckpt = save_checkpoint(os.path.join(run, "checkpoints", "best"), {
        "model": prior.state_dict(), "step": 1, "val_loss": 1.0, "best_val_loss": 1.0,
        "config": cfg.to_dict(), "manifest": man})
    write_run_json(run, {"name": os.path.basename(run), "best_checkpoint": os.path.dirname(ckpt),
                         "last_checkpoint": os.path.dirname(ckpt), "best_val_loss": 1.0, "step": 1,
                         "mlflow_run_id": None, "tracking_uri": None, "db_path": None})
    return export_run(run, os.path.join(str(root), f"{config}-{rave_file}.prior.ts"))


@pytest.fixture(scope="module")
def priors(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    return {
        "discrete": matched_prior(root, "decoder_only", "v2_discrete_streaming.ts"),
        "continuous": matched_prior(root, "recurrent", "v2_continuous_streaming.ts"),
        "seq2seq": matched_prior(root, "encoder_decoder", "v2_discrete_streaming.ts"),
    }


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msprior.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, "PYTHONPATH": os.path.dirname(HERE)})


def test_original_command_line_writes_name_ts(priors, tmp_path):
    """The original's flags verbatim: --prior, --rave, --name (writes NAME.ts), --batch_size."""
    rave = os.path.join(RAVES, "v2_discrete_streaming.ts")
    p = _cli("combine", "--prior", priors["discrete"], "--rave", rave, "--name", "combined", "--batch_size", "1",
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "combined.ts"
    assert str(out) in p.stdout and out.exists()
    meta = read_metadata(str(out))
    assert meta["combined"]["rave_file"] == "v2_discrete_streaming.ts" and meta["num_quantizers"] == 8


@pytest.mark.parametrize("kind,rave_file", [("discrete", "v2_discrete_streaming.ts"),
                                            ("continuous", "v2_continuous_streaming.ts"),
                                            ("seq2seq", "v2_discrete_streaming.ts")])
def test_combined_model_in_the_nn_host(priors, tmp_path, kind, rave_file):
    """The original's methods and the prior's attributes, plus `generate`: control in, audio out."""
    rave_path = os.path.join(RAVES, rave_file)
    out = combine(CombineRequest(prior=priors[kind], rave=rave_path, out=str(tmp_path / "c.ts")), echo=print)
    host, rave, prior = Host(out), torch.jit.load(rave_path), torch.jit.load(priors[kind])
    m = host.model
    assert host.methods() == ["encode", "decode", "forward", "prior", "generate"]
    for method in ("encode", "decode", "forward"):
        assert host.params(method) == [int(v) for v in getattr(rave, f"{method}_params")]
        assert list(getattr(m, f"{method}_output_labels")) == list(getattr(rave, f"{method}_output_labels"))
    assert host.params("prior") == [int(v) for v in prior.forward_params]
    cond = int(prior.cond_channels)
    ratio = int(rave.decode_params[1])
    assert host.params("generate") == [max(cond, 1), ratio, 1, 1]
    assert host.attributes() == ORIGINAL_ATTRIBUTES  # the original's, in its order
    assert {a: host.types(a) for a in ORIGINAL_ATTRIBUTES} == {a: [int(t) for t in getattr(prior, f"{a}_params")]
                                                                for a in ORIGINAL_ATTRIBUTES}
    assert {a: host.get(a) for a in ORIGINAL_ATTRIBUTES} == {
        "temperature": [1.0], "listen": ["true"], "learn_context": ["false"], "reset": ["false"]}
    assert m.set_sample_rate(44100) == 0

    # messages as Pd sends them reach the prior inside
    assert host.set("temperature", pd_arg(0.5)) == 0 and host.get("temperature") == [0.5]
    assert host.set("listen", pd_arg(0)) == 0 and host.get("listen") == ["false"]
    assert host.set("reset", pd_arg(1)) == 0

    # generate: two objects make sound (audio at the RAVE rate, exactly one buffer, not silent, moving)
    rng = np.random.default_rng(0)
    n_vec = 4096
    control = np.zeros((max(cond, 1), n_vec), dtype=np.float32)
    if cond:
        control[:] = rng.integers(0, 8, (cond, n_vec // ratio)).repeat(ratio, 1)
    audio = np.concatenate([host.perform(control, 1, "generate") for _ in range(4)], 1)
    assert audio.shape == (1, 4 * n_vec) and np.isfinite(audio).all()
    assert audio.std() > 1e-4 and not np.allclose(audio[:, :n_vec], audio[:, -n_vec:])

    # prior: the prior's forward (listen passes RAVE's latents through), with the same attributes
    host.set("listen", pd_arg(1))
    x = rng.integers(0, 16, (int(prior.num_quantizers) + cond, n_vec // ratio)).astype(np.float32).repeat(ratio, 1)
    y = host.perform(x, 1, "prior")
    q = int(prior.num_quantizers)
    assert np.array_equal(y[:q], x[:q]) and np.isfinite(y[q]).all() and (y[q] >= 1.0 - 1e-4).all()

    # encode -> decode round trip through RAVE's own methods, inside the combined file
    z = host.perform(rng.standard_normal((1, n_vec)).astype(np.float32) * 0.1, 1, "encode")
    assert z.shape == (q, n_vec) and host.perform(z, 1, "decode").shape == (1, n_vec)


def test_generate_follows_the_prior_and_reset(priors, tmp_path):
    """generate = the prior generating (whatever `listen` says), decoded by RAVE: the prior's tokens are
    exactly those a lone prior export generates from a fresh stream at temperature 0."""
    rave_path = os.path.join(RAVES, "v2_discrete_streaming.ts")
    m = torch.jit.load(combine(CombineRequest(prior=priors["discrete"], rave=rave_path, out=str(tmp_path / "c.ts"))))
    lone = torch.jit.load(priors["discrete"])
    for model in (m, lone):
        model.set_temperature(0.0)
    m.set_listen("true")  # generate ignores listen
    lone.set_listen("false")
    with torch.inference_mode():
        tokens = lone(torch.zeros(1, 8, 6))[:, :8]
        z = m.prior_model.generate(torch.zeros(1, 1, 6))
        assert torch.equal(z, tokens)
        m.set_reset("true")
        assert torch.equal(m.prior_model.generate(torch.zeros(1, 1, 6)), tokens)  # reset: a fresh stream


def test_mismatched_rave_is_refused_in_one_line(priors, tmp_path):
    rave = os.path.join(RAVES, "v2_continuous_streaming.ts")  # 512 samples per frame, continuous
    p = _cli("combine", "--prior", priors["discrete"], "--rave", rave, "--out", str(tmp_path / "x.ts"))
    assert p.returncode == 2 and not (tmp_path / "x.ts").exists()
    line = p.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "does not match the prior" in line and "v2_continuous_streaming.ts" in line and "512" in line

    meta = {"sr": 44100, "ratio": 1024, "num_quantizers": 8, "continuous": False, "resolution": 1024,
            "rave": {"vocab_size": 1024}}
    facts = {"sr": 44100, "ratio": 1024, "latent_size": 8, "continuous": False, "codebook_size": 1024}
    assert rave_mismatch(meta, facts) is None
    for key, value, words in [("sr", 48000, "sample rate 48000"), ("latent_size", 16, "latent size 16"),
                              ("ratio", 2048, "samples per latent frame 2048"),
                              ("codebook_size", 512, "token count (codebook size) 512"),
                              ("continuous", True, "kind continuous")]:
        assert words in rave_mismatch(meta, {**facts, key: value}), key


def test_bad_inputs_are_refused(priors, tmp_path):
    rave = os.path.join(RAVES, "v2_discrete_streaming.ts")
    with pytest.raises(CombineError, match="not an msprior export"):
        combine(CombineRequest(prior=rave, rave=rave, out=str(tmp_path / "x.ts")))  # a RAVE as the prior
    with pytest.raises(CombineError, match="no such file"):
        combine(CombineRequest(prior=str(tmp_path / "missing.ts"), rave=rave, out=str(tmp_path / "x.ts")))
    with pytest.raises(CombineError, match="--batch_size 4: the prior was exported with --batch_size 1"):
        combine(CombineRequest(prior=priors["discrete"], rave=rave, out=str(tmp_path / "x.ts"), batch_size=4))
    with pytest.raises(CombineError, match="give --out"):
        combine(CombineRequest(prior=priors["discrete"], rave=rave))
    with pytest.raises(CombineError, match="--rave"):
        combine(CombineRequest(prior=priors["discrete"], rave=priors["discrete"], out=str(tmp_path / "x.ts")))
    assert not (tmp_path / "x.ts").exists()


def test_compact_says_what_replaces_it(tmp_path):
    p = _cli("compact", "--db", str(tmp_path), "--max_elm", "100")
    assert p.returncode == 2 and "not needed here" in p.stderr and "msprior preprocess" in p.stderr


@pytest.mark.torch25
def test_combined_loads_in_torch_2_5_1(priors, tmp_path):
    """Opt-in: MSPRIOR_TORCH25_PYTHON=/path/to/python with torch==2.5.1 (nn~ 1.6's libtorch)."""
    py = os.environ.get("MSPRIOR_TORCH25_PYTHON")
    if not py:
        pytest.skip("set MSPRIOR_TORCH25_PYTHON to a python with torch 2.5.1")
    out = combine(CombineRequest(prior=priors["seq2seq"], rave=os.path.join(RAVES, "v2_discrete_streaming.ts"),
                                 out=str(tmp_path / "c.ts")))
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); m.set_sample_rate(44100); "
            "a = m.generate(torch.zeros(1, 1, 8)); print(torch.__version__, m.get_methods(), tuple(a.shape))")
    p = subprocess.run([py, "-c", code, out], capture_output=True, text=True, timeout=600,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert p.returncode == 0 and p.stdout.startswith("2.5.1"), p.stderr
    assert "(1, 1, 8192)" in p.stdout
