"""The demo codec: RAVE's exported interface, deterministic, and a codec that keeps the envelope."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from msprior.codec import build_codec
from msprior.data.synthetic import chord, melody, noise


@pytest.fixture(scope="module", params=[False, True], ids=["continuous", "discrete"])
def codec(request):
    return request.param, build_codec(discrete=request.param)


def _audio(seconds=3.0, sr=44100):
    rng = np.random.default_rng(0)
    return torch.from_numpy(np.stack([melody(seconds, sr, rng), chord(seconds, sr, rng)]).astype(np.float32))


def test_rave_interface(codec):
    discrete, m = codec
    assert m.sr == 44100 and m.get_methods() == ["forward", "encode", "decode"]
    lat, ratio = int(m.encode_params[2]), int(m.encode_params[3])
    assert m.decode_params.tolist() == [lat, ratio, 1, 1]
    x = _audio()[:, None, :1000 * ratio // 1000 * 3 + 5]  # not a multiple of ratio: ceil(N / ratio)
    z = m.encode(x)
    assert z.shape == (2, lat, -(-x.shape[-1] // ratio)) and z.dtype == torch.float32
    y = m.decode(z)
    assert y.shape == (2, 1, z.shape[-1] * ratio)
    assert m.forward(x).shape == y.shape
    if discrete:
        assert "Discrete" in m.encoder.original_name
        assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() < 64
        names = dict(m.named_buffers())
        assert names["encoder.rvq.layers.0._codebook.embed"].shape == (64, 16)
    assert torch.equal(m.encode(x), z)  # deterministic


def test_decoded_audio_keeps_the_band_envelope(codec):
    discrete, m = codec
    rng = np.random.default_rng(0)
    x = torch.from_numpy(np.stack([melody(3.0, 44100, rng), noise(3.0, 44100, rng)]).astype(np.float32))[:, None]
    z = m.encode(x)
    analysis = m.encoder.analysis  # normalised log band energies per frame

    def envelope_error(z_decoded):
        return (analysis(x) - analysis(m.decode(z_decoded))).abs().mean().item()

    err = envelope_error(z)
    swapped = envelope_error(z.flip(0))  # the other signal's code: a codec that ignored its input
    shuffled = envelope_error(z[..., torch.randperm(z.shape[-1], generator=torch.Generator().manual_seed(0))])
    assert err < 0.25 * swapped and err < shuffled, (err, swapped, shuffled)


def test_cli_says_demo_and_writes_a_loadable_file(tmp_path):
    out = tmp_path / "rave.ts"
    h = subprocess.run([sys.executable, "-m", "msprior", "codec", "--help"], capture_output=True, text=True)
    assert "DEMO codec" in h.stdout
    r = subprocess.run([sys.executable, "-m", "msprior", "codec", "--out", str(out), "--discrete"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from msprior.rave import load_rave

    assert load_rave(str(out)).discrete
