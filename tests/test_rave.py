"""Loading RAVE exports: current and v1 interfaces, and one-line refusals of everything else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msprior.codec import build_codec
from msprior.rave import RaveError, dequantize_normal, load_rave, quantize_normal
from tests.data_helpers import NoEncode, StreamingExport, V1Export


@pytest.fixture(scope="module")
def codecs(tmp_path_factory):
    d = tmp_path_factory.mktemp("rave")
    out = {}
    for discrete in (False, True):
        m = build_codec(discrete=discrete)
        p = d / f"codec_{'discrete' if discrete else 'continuous'}.ts"
        m.save(str(p))
        out[discrete] = (m, str(p))
    return out


def test_current_exports_load(codecs):
    r = load_rave(codecs[False][1])
    assert (r.sr, r.ratio, r.latent_size, r.discrete, r.version) == (44100, 1024, 16, False, "v2")
    assert r.vocab_size(64) == 64
    d = load_rave(codecs[True][1])
    assert (d.discrete, d.num_quantizers, d.codebook_size, d.vocab_size(64)) == (True, 4, 64, 64)


def test_v1_export_loads(codecs, tmp_path):
    p = tmp_path / "v1.ts"
    torch.jit.script(V1Export(codecs[True][0])).save(str(p))
    r = load_rave(str(p))
    assert r.version == "v1" and r.sr == 44100 and r.ratio == 1024
    assert r.discrete and r.codebook_size == 64  # codebooks found through the wrapped module
    x = torch.randn(1, 44100)
    assert torch.equal(r.encode(x), codecs[True][0].encode(x[:, None]))


def _one_line_error(path) -> str:
    with pytest.raises(RaveError) as e:
        load_rave(str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_refusals_are_one_line(tmp_path):
    sd = tmp_path / "state_dict.ckpt"
    torch.save({"encoder.weight": torch.zeros(3)}, sd)
    assert "state dict" in _one_line_error(sd)
    txt = tmp_path / "notes.ts"
    txt.write_text("hello")
    assert "not a TorchScript file" in _one_line_error(txt)
    empty = tmp_path / "empty.ts"
    empty.write_bytes(b"")
    assert "empty" in _one_line_error(empty)
    no_enc = tmp_path / "noencode.ts"
    torch.jit.script(NoEncode()).save(str(no_enc))
    assert "without an `encode` method" in _one_line_error(no_enc)
    stream = tmp_path / "model.ts"
    torch.jit.script(StreamingExport()).save(str(stream))
    assert "streaming export" in _one_line_error(stream)
    assert "no such file" in _one_line_error(tmp_path / "missing.ts")


def test_normal_quantization_round_trip():
    z = torch.randn(10000)
    t = quantize_normal(z, 64)
    assert t.min() >= 0 and t.max() <= 63
    counts = torch.bincount(t, minlength=64).float()
    assert counts.std() / counts.mean() < 0.2  # equiprobable bins for N(0, 1) latents
    assert torch.equal(quantize_normal(dequantize_normal(t, 64), 64), t)


# --- RAVE's own exports (tests/fixtures/rave, made by tests/fixtures/make_rave_fixtures.sh) ---------

FIXTURES = Path(__file__).parent / "fixtures" / "rave"
EXPORTS = {  # name -> (ratio, latents or quantizers, discrete)
    "v2_discrete": (1024, 8, True),
    "v2_continuous": (512, 8, False),
    "v1_continuous": (2048, 8, False),  # RAVE v1's architecture through acids-rave 2.3's exporter
}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_rave_exports_load(name):
    ratio, size, discrete = EXPORTS[name]
    r = load_rave(str(FIXTURES / f"{name}.ts"))
    assert (r.sr, r.ratio, r.latent_size, r.discrete, r.version) == (44100, ratio, size, discrete, "v2")
    assert r.codebook_size == (1024 if discrete else None)
    x = torch.randn(2, 3 * ratio) * 0.1
    z = r.encode(x)
    assert z.shape == (2, size, 3)
    if not discrete:  # the export samples its latent: seeded per item, batch or not
        torch.manual_seed(0)
        assert torch.equal(z[1:], r.module.encode(x[1:, None]))
        assert torch.equal(r.encode(x), z)


@pytest.mark.parametrize("name", ["v2_discrete_streaming", "v2_continuous_streaming"])
def test_rave_streaming_exports_refused(name):
    path = FIXTURES / f"{name}.ts"
    msg = _one_line_error(path)
    assert "a streaming export" in msg and "without --streaming" in msg
    assert load_rave(str(path), allow_streaming=True).ratio in (512, 1024)
