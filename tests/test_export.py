"""Export for nn~: every config, discrete and continuous, reloaded with torch.jit.load only.

The nn~ behaviour (API, listen pass-through, reset, batch, flat state, a 60 s stream in 4096-sample
buffers) is checked by tests/nn_host.py in a subprocess that never imports msprior.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from export_runs import Q, RATIO, V, make_run, save_decoder, synthetic_batch, window
from msprior.conditioning import ConditioningSpec
from msprior.export.run import ExportError, export_run, load_trained, quantize_int8, read_metadata
from msprior.latent_bins import dequantize, quantize

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = [  # (config, continuous RAVE)
    ("decoder_only", False),
    ("recurrent", False),
    ("encoder_decoder", False),
    ("encoder_decoder_continuous", False),
    ("decoder_only", True),
    ("encoder_decoder_continuous", True),
]
BATCH = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _key(config: str, continuous: bool) -> str:
    return f"{config}{'-continuous' if continuous else ''}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{key: (run_dir, model.ts)} for every variant, plus int8 exports of two families."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for config, continuous in VARIANTS:
        run = make_run(str(root), config, continuous, steps=20)
        out[_key(config, continuous)] = (run, export_run(run, str(root / f"{_key(config, continuous)}.ts"),
                                                         batch_size=BATCH))
    for config in ("decoder_only", "recurrent"):
        run = out[config][0]
        out[f"{config}-int8"] = (run, export_run(run, str(root / f"{config}-int8.ts"), batch_size=BATCH,
                                                 quantize="int8"))
    return out


def test_nn_host_drives_every_export(exported, tmp_path):
    """API, listen pass-through, reset, batch, flat state and a 60 s stream, from torch.jit.load only."""
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    paths = [ts for _, ts in exported.values()]
    subprocess.run([sys.executable, os.path.join(HERE, "nn_host.py"), str(report), *paths],
                   check=True, cwd=tmp_path, env=env, timeout=600)
    data = json.loads(report.read_text())
    assert data["msprior_imported"] is False
    for key, r in zip(exported, data["reports"]):
        cond = {"encoder_decoder": 1, "encoder_decoder_continuous": 3}.get(key.split("-")[0], 0)  # + tokens | F
        assert r["methods"] == ["forward"], key
        assert r["forward_params"] == [Q + cond, RATIO, Q + 1, RATIO], key
        assert len(r["input_labels"]) == Q + cond and r["output_labels"][-1] == "(signal) perplexity"
        # the original's attributes, order and defaults (listen ON); booleans typed str (docs/NN_TILDE.md)
        assert r["attributes"] == ["temperature", "listen", "learn_context", "reset"]
        assert r["types"] == {"temperature": [2], "listen": [3], "learn_context": [3], "reset": [3]}
        assert r["getters"] == {"temperature": [1.0], "listen": ["true"], "learn_context": ["false"],
                                "reset": ["false"]}  # lists
        assert r["strings"]["temperature"] == "1.000000" and r["strings"]["listen"] == "true"
        s = r["setters"]
        assert s["temperature=0.5"] == [0, [0.5]]
        assert s["temperature=-1.000000"][0] != 0 and s["temperature=-1.000000"][1] == [0.5]  # refused, unchanged
        assert s["listen=1.000000"] == [0, ["true"]] and s["listen=0.000000"] == [0, ["false"]]  # Pd's strings
        assert s["listen=bogus"][0] != 0
        assert s["listen=1"] == [0, ["true"]] and s["listen=0"] == [0, ["false"]]  # Max's ints
        assert s["learn_context=1.000000"] == [0, ["true"]] and s["learn_context=false"] == [0, ["false"]]
        assert r["set_sample_rate"] == 0
        assert r["listen_passthrough"] and r["listen_perplexity_finite"], key
        assert r["reset_code"] == 0 and r["reset_restores"], key
        assert r["set_sample_rate"] == 0 and r["warm_up_keeps_state"], key
        assert all(len(v) == 10 for v in r["first_buffers_ms"].values()), key
        assert r["batch1_shape"] == [Q + 1, 4096] and r["batchN_shape"] == [BATCH * (Q + 1), 4096]
        st = r["stream"]
        assert st["seconds"] >= 60.0 and st["frames"] > 100 * 16  # far beyond the 16-frame KV window
        assert st["finite"] and st["toggles"] > 100
        assert st["state_numel"] == [st["state_numel_start"]], key  # flat for the whole stream


@pytest.mark.parametrize("config,continuous", VARIANTS)
def test_generate_at_zero_temperature_is_greedy_sampling(exported, config, continuous):
    """Listen to a prefix, then generate at temperature 0: the frames of the unscripted model's
    greedy `sample` (full recompute) from the same prefix (a stream that listens first has no seed
    frame: the original's listen fed the frames it heard, nothing before them)."""
    run, ts = exported[_key(config, continuous)]
    m = torch.jit.load(ts)
    prior = load_trained(run).prior
    r = prior.cond_ratio
    n_prefix, n_gen = 10, 12  # 22 frames: beyond the 16-frame attention window
    tokens, cond = window(config, n_prefix + n_gen, seed=3)
    cond_dec = cond if cond is not None else torch.zeros(1, n_prefix + n_gen, 0)
    if cond_dec.dim() == 2:
        cond_dec = cond_dec.unsqueeze(-1)
    x = torch.cat([dequantize(tokens, V) if continuous else tokens.float(), cond_dec.float()], -1).transpose(1, 2)
    m.set_listen("true")
    m.set_temperature(0.0)
    with torch.inference_mode():
        m(x[:, :, :n_prefix])
        m.set_listen("false")
        y = torch.cat([m(x[:, :, n_prefix:n_prefix + 5]), m(x[:, :, n_prefix + 5:])], -1)  # two buffers
    got = quantize(y[:, :Q], V) if continuous else y[:, :Q].long()

    # positions: the prefix, then the generated frames; a frame's conditioning is the value that
    # arrived with it
    context = tokens[:, :n_prefix]
    ccond = cond_dec.float()
    expected = []
    with torch.no_grad():
        for _ in range(n_gen):
            c = None
            if prior.conditioned:
                c = ccond[:, : context.shape[1]][:, ::r]  # conditioning frames: t % r == 0
                c = c[..., 0].long() if config == "encoder_decoder" else c
            frame, _ = prior.sample(context, c, temperature=0.0)
            expected.append(frame)
            context = torch.cat([context, frame.unsqueeze(1)], 1)
    assert torch.equal(got[0].T, torch.cat(expected, 0))


def test_manifest_facts_and_metadata(exported):
    meta = read_metadata(exported["encoder_decoder_continuous-continuous"][1])
    assert meta["ratio"] == RATIO and meta["num_quantizers"] == Q and meta["continuous"] is True
    assert meta["resolution"] == V  # the preprocessing resolution, from the manifest
    assert meta["conditioning"] == "features" and meta["batch_size"] == BATCH
    # the prior's ConditioningSpec, feature names included; the nn~ inlets are derived from it
    spec = ConditioningSpec.from_dict(meta["conditioning_spec"])
    assert (spec.kind, spec.ratio, spec.names, spec.channels) == ("features", 2, ("loudness", "centroid", "flatness"), 3)
    m = torch.jit.load(exported["encoder_decoder_continuous-continuous"][1])
    assert list(m.forward_input_labels)[Q:] == list(spec.labels()) and "(loudness)" in spec.labels()[0]
    assert ConditioningSpec.from_dict(read_metadata(exported["decoder_only"][1])["conditioning_spec"]).channels == 0
    assert read_metadata(exported["decoder_only-int8"][1])["quantize"] == "int8"


def test_export_refuses_bad_options(exported, tmp_path):
    run = exported["decoder_only"][0]
    with pytest.raises(ExportError, match="--continuous"):
        export_run(run, str(tmp_path / "x.ts"), continuous=True)
    with pytest.raises(ExportError, match="--quantize"):
        export_run(run, str(tmp_path / "x.ts"), quantize="fp16")
    with pytest.raises(ExportError, match="--batch_size"):
        export_run(run, str(tmp_path / "x.ts"), batch_size=0)
    with pytest.raises(ExportError, match="--checkpoint"):
        export_run(run, str(tmp_path / "x.ts"), checkpoint="first")
    with pytest.raises(ExportError, match="neither a run directory"):
        export_run(str(tmp_path / "missing"), str(tmp_path / "x.ts"))
    assert not (tmp_path / "x.ts").exists()


def test_int8_validation_cross_entropy(exported):
    """Dynamic int8 Linear weights barely move the teacher-forced cross-entropy (nats)."""
    import copy

    from msprior.model import int8_predictor

    prior = load_trained(exported["decoder_only"][0]).prior
    batch = synthetic_batch(16, 17, "none", torch.Generator().manual_seed(7))
    split = copy.deepcopy(prior)
    split.predictor = int8_predictor(split.predictor)  # per-quantizer heads, still fp32: same model
    with torch.no_grad():
        fp32 = float(prior.loss(batch))
        assert abs(float(split.loss(batch)) - fp32) < 1e-5
        int8 = float(quantize_int8(prior).loss(batch))
    print(f"\nvalidation CE fp32 {fp32:.4f} int8 {int8:.4f} (delta {int8 - fp32:+.4f} nats)")
    assert abs(int8 - fp32) < 0.05


def _latent_table(root, manifest: dict, conditioning: str = "none") -> str:
    """A latent table in the documented Parquet format (docs/ARCHITECTURE.md), from synthetic chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root / "latents")
    (root / "manifest.json").write_text(json.dumps(manifest))
    rows = {"source": [], "chunk": [], "start_s": [], "frames": [], "rave": []}
    gen = torch.Generator().manual_seed(11)
    for i in range(40):  # 40 source files: the 5 % validation split holds some
        b = synthetic_batch(1, 64, conditioning, gen)
        rows["source"].append(f"song{i}.wav")
        rows["chunk"].append(0)
        rows["start_s"].append(0.0)
        rows["frames"].append(64)
        rows["rave"].append(b["rave"][0].reshape(-1).tolist())
    schema = pa.schema([("source", pa.string()), ("chunk", pa.int32()), ("start_s", pa.float64()),
                        ("frames", pa.int32()), ("rave", pa.list_(pa.int16()))])
    pq.write_table(pa.table(rows, schema=schema), root / "latents" / "part0.parquet")
    return str(root)


def test_int8_effect_on_the_runs_validation_split(exported, tmp_path):
    """`--quantize int8` reports fp32 vs int8 validation CE on the run's latent table."""
    from export_runs import manifest
    from msprior.cli import main
    from msprior.checkpoint import read_run_json, write_run_json

    run = exported["decoder_only"][0]
    db = _latent_table(tmp_path / "table", manifest())
    from msprior.export.evaluate import int8_effect

    loaded = load_trained(run)
    effect = int8_effect(loaded.prior, loaded.config, db)
    assert effect["val_ce_fp32"] < math.log(V) - 0.2  # below the uniform guess: it learnt the stream
    assert abs(effect["val_ce_int8_delta"]) < 0.05  # and int8 scores it like fp32
    info = read_run_json(run)
    write_run_json(run, {**info, "db_path": db})
    try:
        with pytest.raises(SystemExit) as ok:
            main(["export", "--run", run, "--out", str(tmp_path / "q.ts"), "--quantize", "int8", "--no-register"])
        assert ok.value.code in (0, None)
    finally:
        write_run_json(run, info)


def test_int8_effect_refuses_a_table_with_other_conditioning(exported, tmp_path):
    """The export compares the prior's ConditioningSpec with the table it scores: other feature
    names, one line naming the field (and publish reports it instead of a number)."""
    from msprior.conditioning import ConditioningError
    from msprior.export.evaluate import int8_effect
    from msprior.export.publish import int8_effect_tags
    from msprior.export.run import conditioning_of
    from tests._train_data import write_synthetic_table

    run = exported["encoder_decoder_continuous"][0]  # features loudness, centroid, flatness; ratio 2
    db = str(tmp_path / "t")
    write_synthetic_table(db, num_files=4, quantizers=Q, vocab=V, ratio=2, features=3)  # features f0, f1, f2
    loaded = load_trained(run)
    with pytest.raises(ConditioningError, match=r"the prior's conditioning vs this table's: conditioning names "
                                                r"differs \(\[loudness, centroid, flatness\] vs \[f0, f1, f2\]\)"):
        int8_effect(loaded.prior, loaded.config, db, trained=conditioning_of(loaded))
    said = []
    assert int8_effect_tags(run, "best", None, {"db_path": db}, said.append) == {}
    assert said and said[0].startswith("int8 effect not measured: ") and "conditioning names differs" in said[0]


def test_cli_export_and_checkpoint_dir(exported, tmp_path):
    from msprior.cli import main

    run = exported["recurrent"][0]
    out = tmp_path / "cli.ts"
    with pytest.raises(SystemExit) as ok:  # typer's standalone mode exits, 0 on success
        main(["export", "--run", run, "--out", str(out), "--checkpoint", "last", "--batch_size", "3", "--no-register"])
    assert ok.value.code in (0, None)
    m = torch.jit.load(str(out))
    assert m.batch_size == 3 and m(torch.zeros(3, Q, 4)).shape == (3, Q + 1, 4)
    ckpt_dir = os.path.join(run, "checkpoints", "best")  # a checkpoint directory exports too
    assert torch.jit.load(export_run(ckpt_dir, str(tmp_path / "ck.ts"))).batch_size == 1
    with pytest.raises(SystemExit) as err:
        main(["export", "--run", run, "--out", str(tmp_path / "y.ts"), "--quantize", "int4", "--no-register"])
    assert err.value.code == 2  # a one-line user error, no traceback


def test_preview_wav(exported, tmp_path):
    """Generated latents decoded by a RAVE-like TorchScript decoder into a WAV at the RAVE rate."""
    import soundfile as sf

    from msprior.export.preview import render_preview

    rave = tmp_path / "rave.ts"
    save_decoder(str(rave))
    wav = render_preview(exported["decoder_only"][1], str(rave), str(tmp_path / "p.wav"), seconds=1.0)
    audio, sr = sf.read(wav)
    assert sr == 44100 and len(audio) == 44 * RATIO and abs(audio).max() > 0


def test_quantize_is_the_preprocessing_one():
    """Export dequantizes with the inverse of exactly the quantizer the data stage uses."""
    rave = pytest.importorskip("msprior.rave")
    z = torch.randn(10000) * 1.5
    for res in (64, 1024):
        assert torch.equal(quantize(z, res), rave.quantize_normal(z, res))
        t = torch.arange(res)
        assert torch.equal(quantize(dequantize(t, res, torch.rand(res)), res), t)


@pytest.mark.torch25
def test_loads_in_torch_2_5_1(exported, tmp_path):
    """Opt-in: MSPRIOR_TORCH25_PYTHON=/path/to/venv/bin/python with torch==2.5.1 (nn~ 1.6's libtorch)."""
    py = os.environ.get("MSPRIOR_TORCH25_PYTHON")
    if not py:
        pytest.skip("set MSPRIOR_TORCH25_PYTHON to a python with torch 2.5.1")
    report = tmp_path / "report25.json"
    paths = [ts for _, ts in exported.values()]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([py, os.path.join(HERE, "nn_host.py"), str(report), *paths], check=True, cwd=tmp_path,
                   env=env, timeout=900)
    data = json.loads(report.read_text())
    assert data["torch_version"].startswith("2.5.1") and not data["msprior_imported"]
    for r in data["reports"]:
        assert r["listen_passthrough"] and r["reset_restores"] and r["stream"]["finite"], r["path"]


# --- the original's export command line (issue 19) ------------------------------------------------


def _main(*argv: str) -> int:
    from msprior.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(argv))
    return done.value.code or 0


def test_export_without_out_writes_run_name_ts(exported, capsys):
    """`msprior export --run RUN` writes RUN/<run name>.ts and prints the path (the original's)."""
    run = exported["decoder_only"][0]
    assert _main("export", "--run", run, "--no-register", "--temporal_ratio", str(RATIO), "--ema_weights") == 0
    out = os.path.join(run, "decoder_only.ts")  # run.json's name
    assert os.path.exists(out) and out in capsys.readouterr().out
    assert read_metadata(out)["weights"] == "raw"  # this run kept no EMA: its only weights
    os.remove(out)


def test_original_export_flags_that_differ_fail_in_one_line(exported, tmp_path, capsys):
    run = exported["decoder_only"][0]
    assert _main("export", "--run", run, "--no-register", "--temporal_ratio", "2048") == 2
    err = capsys.readouterr().err.strip()
    assert "--temporal_ratio 2048" in err and f"{RATIO} samples per latent frame" in err and "\n" not in err
    assert _main("export", "--run", run, "--no-register", "--vae_path", "vae.ts") == 2
    err = capsys.readouterr().err.strip()
    assert "encoder_decoder_continuous" in err and "\n" not in err
    assert not os.path.exists(os.path.join(run, "decoder_only.ts"))


def test_ema_weights_flag_picks_the_weights(exported, tmp_path):
    """A run that kept EMA weights: `model` (EMA) by default and with --ema_weights, `raw_model` with
    --no-ema_weights (the original's default was the raw weights)."""
    from msprior.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(os.path.join(exported["decoder_only"][0], "checkpoints", "best"))
    raw = {k: v + 1.0 if v.is_floating_point() else v for k, v in state["model"].items()}
    ckpt = save_checkpoint(str(tmp_path / "ema"), {**state, "raw_model": raw})
    for flag, expected in [(None, state["model"]), (True, state["model"]), (False, raw)]:
        loaded = load_trained(ckpt, ema_weights=flag)
        key = "embedding.table.weight"
        assert torch.equal(loaded.prior.state_dict()[key], expected[key]), flag
        assert loaded.state["weights"] == ("raw" if flag is False else "ema")
    for flag, weights in [("--no-ema_weights", "raw"), ("--ema-weights", "ema")]:  # both spellings
        out = str(tmp_path / f"{weights}.ts")
        assert _main("export", "--run", ckpt, "--out", out, "--no-register", flag) == 0
        assert read_metadata(out)["weights"] == weights


def test_export_of_an_s3_run_lands_in_its_prefix(exported, s3_env, tmp_path, capsys):
    """An s3:// run: `msprior export --run s3://...` writes the .ts into the run prefix."""
    from msprior import storage
    from msprior.checkpoint import read_run_json, write_run_json

    run = exported["recurrent"][0]
    prefix = "s3://test-bucket/runs-export/recurrent"
    with open(os.path.join(run, "checkpoints", "best", "checkpoint.pt"), "rb") as f:
        storage.write_bytes(f"{prefix}/checkpoints/best/checkpoint.pt", f.read())
    info = read_run_json(run)
    write_run_json(prefix, {**info, "best_checkpoint": f"{prefix}/checkpoints/best",
                            "last_checkpoint": f"{prefix}/checkpoints/best"})
    assert _main("export", "--run", prefix, "--no-register") == 0
    out = f"{prefix}/recurrent.ts"
    assert out in capsys.readouterr().out and storage.exists(out)
    local = tmp_path / "pulled.ts"
    local.write_bytes(storage.read_bytes(out))
    assert torch.jit.load(str(local)).get_listen() == ["true"]


@pytest.mark.parametrize("config", ["decoder_only", "recurrent"])
def test_listen_outlet_is_the_originals_perplexity(exported, config):
    """Listening, frame t's perplexity outlet is the original's: exp(entropy) of the model's prediction
    of frame t + 1 given frames <= t, averaged over quantizers (the full-recompute model's, at
    temperature 0 where the quantizer chain is the argmax one)."""
    run, ts = exported[config]
    m, prior = torch.jit.load(ts), load_trained(run).prior
    tokens, _ = window(config, 20, seed=5)
    m.set_temperature(0.0)
    assert m.get_listen() == ["true"]  # the original's default
    with torch.inference_mode():
        y = torch.cat([m(tokens[:, :7].float().transpose(1, 2)), m(tokens[:, 7:].float().transpose(1, 2))], -1)
        expected = torch.stack([prior.sample(tokens[:, : t + 1], None, temperature=0.0)[1][0] for t in range(20)])
    assert torch.equal(y[0, :Q], tokens[0].T.float())  # latents passed through
    assert torch.allclose(y[0, Q], expected, rtol=1e-4, atol=1e-4)


def test_a_fresh_stream_generates_from_a_zero_seed(exported):
    """Generating from a fresh (or reset) stream starts from a frame of zeros, as the original did."""
    run, ts = exported["decoder_only"]
    m, prior = torch.jit.load(ts), load_trained(run).prior
    m.set_listen("false")
    m.set_temperature(0.0)
    with torch.inference_mode():
        m(torch.zeros(1, Q, 3))  # some history, then a reset
        m.set_reset("true")
        got = m(torch.zeros(1, Q, 6))[0, :Q].T.long()
    context = torch.zeros(1, 1, Q, dtype=torch.long)
    with torch.no_grad():
        for _ in range(6):
            frame, _ = prior.sample(context, None, temperature=0.0)
            context = torch.cat([context, frame.unsqueeze(1)], 1)
    assert torch.equal(got, context[0, 1:])
