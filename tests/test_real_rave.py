"""RAVE's own exports (tests/fixtures/rave, made by acids-rave's exporter) on real recordings
(tests/fixtures/audio): preprocess, train, export, register, pull, and the prior's stream decoded
by the RAVE export's own `decode`."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from msprior import latent_bins as bins
from tests.data_helpers import reference_audio

FIXTURES = Path(__file__).parent / "fixtures"
AUDIO = FIXTURES / "audio"
RAVES = {name: str(FIXTURES / "rave" / f"{name}.ts") for name in ("v2_discrete", "v2_continuous", "v1_continuous")}
RESOLUTION = 64
NUM_SECS = 4.0
TINY = ["model.dim=32", "model.num_layers=1", "model.num_heads=2", "model.head_dim=16", "model.seq_len=32",
        "optim.warmup_steps=1", "train.val_batches=1"]


def cli(*argv: str) -> None:
    """`msprior ARGV` in this process; fails the test on a non-zero exit."""
    from msprior.cli import main

    with pytest.raises(SystemExit) as done:
        main(list(argv))
    assert done.value.code in (0, None), argv


def audio_files():
    return sorted(p for p in AUDIO.iterdir() if p.suffix in (".wav", ".flac", ".ogg", ".aiff"))


@pytest.fixture(scope="module")
def tables(ray_session, tmp_path_factory):
    """name -> latent table of the real-audio corpus encoded by that RAVE export (made once)."""
    root = tmp_path_factory.mktemp("real_rave")
    made = {}

    def get(name: str) -> str:
        if name not in made:
            out = str(root / name)
            cli("preprocess", "--audio", str(AUDIO), "--out_path", out, "--rave", RAVES[name],
                "--num_secs", str(NUM_SECS), "--resolution", str(RESOLUTION), "--min_frames", "33",
                "--batch_size", "8")
            made[name] = out
        return made[name]

    return get


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(RAVES))
def test_chunk0_tokens_equal_the_exports_own_encode(tables, name):
    from msprior.data import load_manifest, read_table

    table = tables(name)
    m = load_manifest(table)
    r = m["rave"]
    assert m["counts"]["files_ok"] == len(audio_files()) and m["counts"]["files_skipped"] == 0
    rows = {(row["source"], row["chunk"]): row for row in read_table(table).to_pylist()}
    export = torch.jit.load(RAVES[name])
    q, chunk = r["num_quantizers"], m["chunk"]["frames"] * r["ratio"]
    loc = scale = None
    if r["continuous"]:
        assert len(r["latent_loc"]) == len(r["latent_scale"]) == q
        loc, scale = (torch.tensor(v)[:, None] for v in (r["latent_loc"], r["latent_scale"]))
        assert m["counts"]["latents_out_of_range"] >= 0
        assert 0.0 <= m["counts"]["latents_out_of_range_fraction"] < 0.01
    agree = total = 0
    for path in audio_files():
        x = torch.from_numpy(reference_audio(str(path), r["sr"])[:chunk])[None, None]
        torch.manual_seed(0)  # a variational export samples its latent inside `encode`
        with torch.no_grad():
            z = export.encode(x)[0]  # [Q, T]
        got = torch.tensor(rows[(path.name, 0)]["rave"]).reshape(-1, q).T.long()
        assert got.shape == z.shape
        if r["continuous"]:
            want = bins.quantize(z, RESOLUTION, loc, scale)
            # within half a bin: the latent's position in bin units against the token's centre
            u = 0.5 * (1 + torch.erf(bins.standardize(z, loc, scale) / math.sqrt(2)))
            low = 0.5 * (1 + math.erf(-bins.Z_MAX / math.sqrt(2)))
            pos = (u - low) / (1 - 2 * low) * RESOLUTION
            inside = ~bins.out_of_range(z, loc, scale)
            assert ((pos - (got + 0.5)).abs()[inside] <= 0.5 + 1e-3).float().mean() >= 0.99
        else:
            want = torch.round(z).long()
        agree += int((got == want).sum())
        total += got.numel()
    assert agree >= 0.99 * total, (agree, total)


def test_continuous_round_trip_on_real_latents():
    """Quantise -> dequantise on a real export's latents: within half a bin inside the fitted range;
    latents outside it are counted, not silently clipped."""
    from msprior.rave import load_rave

    rave = load_rave(RAVES["v2_continuous"])
    clips = [torch.from_numpy(reference_audio(str(p), rave.sr)) for p in audio_files()]
    loc, scale = rave.fit_bins(clips)
    assert not np.allclose(scale, 1.0, atol=0.05) or not np.allclose(loc, 0.0, atol=0.05)  # not N(0, 1)
    lo, sc = rave.latent_bins(loc, scale)
    z = torch.cat([rave.encode(c[None])[0] for c in clips], 1)  # [C, frames]
    tokens = bins.quantize(z, RESOLUTION, lo, sc)
    counts = torch.stack([torch.bincount(t, minlength=RESOLUTION) for t in tokens]).float()
    assert (counts > 0).float().mean() > 0.9  # the fitted affine spreads the latents over the bins
    zhat = bins.dequantize(tokens, RESOLUTION, loc=lo, scale=sc)
    inside = ~bins.out_of_range(z, lo, sc)
    assert inside.float().mean() > 0.99
    # bin edges in latent units (F^-1 of k / resolution, F the truncated normal CDF, then the affine)
    low_mass = 0.5 * (1 + math.erf(-bins.Z_MAX / math.sqrt(2)))
    u = low_mass + (1 - 2 * low_mass) * torch.arange(RESOLUTION + 1, dtype=torch.float64) / RESOLUTION
    edges = lo.double() + sc.double() * math.sqrt(2) * torch.erfinv(2 * u - 1)[None]  # [C, res + 1]
    low, high = torch.gather(edges, 1, tokens), torch.gather(edges, 1, tokens + 1)
    zhat, z = zhat.double(), z.double()
    assert ((zhat >= low - 1e-5) & (zhat <= high + 1e-5)).all()  # every token's centre is in its bin
    assert ((z >= low - 1e-5) & (z <= high + 1e-5))[inside].all()  # and so is the latent
    assert (((z - zhat).abs() <= (high - low)) | ~inside).all()
    assert torch.equal(bins.quantize(zhat.float(), RESOLUTION, lo, sc), tokens)
    far = z * 0 + lo + 10 * sc  # ten standard deviations out: counted and in the top bin
    assert int(bins.out_of_range(far, lo, sc).sum()) == far.numel()
    assert (bins.quantize(far, RESOLUTION, lo, sc) == RESOLUTION - 1).all()


def _train(table: str, tmp: Path, config: str, name: str, *extra: str) -> str:
    storage, uri = str(tmp / "runs"), f"sqlite:///{tmp / 'mlflow.db'}"
    cli("train", "--config", config, "--db_path", table, "--name", name, "--num_workers", "2",
        "--batch_size", "4", "--max_steps", "3", "--val_every", "3", "--storage_path", storage,
        "--tracking_uri", uri, *sum((["--override", o] for o in TINY), []), *extra)
    return os.path.join(storage, name)


def _export_and_pull(run_dir: str, tmp: Path, name: str, *extra: str) -> torch.jit.ScriptModule:
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out, pulled = tmp / f"{name}.ts", tmp / f"{name}.pulled.ts"
    cli("export", "--run", run_dir, "--out", str(out), "--tracking_uri", uri, "--preview_secs", "0",
        "--name", f"msprior-{name}", *extra)
    cli("pull", f"msprior-{name}@champion", "--out", str(pulled), "--tracking_uri", uri)
    assert pulled.read_bytes() == out.read_bytes()
    return torch.jit.load(str(pulled))


def _generate(prior: torch.jit.ScriptModule, frames: int) -> torch.Tensor:
    """A generated stream from the exported prior, as nn~ calls it: latents [1, Q, frames]."""
    in_ch, ratio, out_ch, _ = prior.forward_params.tolist()
    prior.set_listen("false")  # exports start listening (the original's default): generate
    with torch.no_grad():
        y = prior.forward(torch.zeros(1, in_ch, frames))
    assert y.shape == (1, out_ch, frames) and torch.isfinite(y).all()
    return y[:, :-1]  # the last channel is the perplexity


@pytest.mark.timeout(900)
def test_discrete_rave_train_export_register_pull_and_decode(tables, tmp_path):
    table = tables("v2_discrete")
    rave = torch.jit.load(RAVES["v2_discrete"])
    run = _train(table, tmp_path, "decoder_only", "disc", "--pretrained_embedding", RAVES["v2_discrete"])
    _train(table, tmp_path, "recurrent", "disc_gru")
    prior = _export_and_pull(run, tmp_path, "disc")
    z = _generate(prior, 24)
    assert z.shape[1] == 8 and torch.equal(z, z.round()) and z.min() >= 0 and z.max() < 1024
    with torch.no_grad():
        audio = rave.decode(z)
    assert audio.shape == (1, 1, 24 * 1024) and torch.isfinite(audio).all()


@pytest.mark.timeout(900)
def test_continuous_rave_train_export_register_pull_and_decode(tables, tmp_path):
    from msprior.data import load_manifest

    table = tables("v2_continuous")
    r = load_manifest(table)["rave"]
    rave = torch.jit.load(RAVES["v2_continuous"])
    run = _train(table, tmp_path, "decoder_only", "cont")
    prior = _export_and_pull(run, tmp_path, "cont", "--continuous")
    z = _generate(prior, 24)  # latents that [nn~ rave.ts decode] takes
    loc, scale = torch.tensor(r["latent_loc"])[:, None], torch.tensor(r["latent_scale"])[:, None]
    assert z.shape[1] == 8 and not bins.out_of_range(z, loc, scale).any()  # in the fitted range
    assert not torch.equal(z, z.round())  # latents, not token indices
    with torch.no_grad():
        audio = rave.decode(z)
    assert audio.shape == (1, 1, 24 * 512) and torch.isfinite(audio).all()
