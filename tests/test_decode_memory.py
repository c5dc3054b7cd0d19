"""Decode tasks declare `memory=` (issue 21): a row holds a whole file, so a multi-hour file or a
compressed one decodes to many times its size; Ray must not start more decodes on a node than its
memory holds. And the custom resources of a pool (--encoder_resources) reach the encoder actors."""

from __future__ import annotations

import pytest

from msprior import storage
from msprior.data import decode, flow
from msprior.data.request import PreprocessRequest, RaveInfo, Settings

MB = 1 << 20


def test_decode_memory_follows_the_largest_file_and_its_codec():
    wavs = [[("a.wav", "/c/a.wav", 10 * MB), ("b.wav", "/c/b.wav", 20 * MB)], [("c.wav", "/c/c.wav", 5 * MB)]]
    small = decode.decode_memory(wavs, node_memory=64e9)
    assert small == decode.DECODE_BASE + decode.COPIES * 4 * 20 * MB  # the 20 MB WAV, 4 B per PCM16 byte
    hours = wavs + [[("long.wav", "/c/long.wav", 1900 * MB)]]  # 3 h of 44.1 kHz stereo PCM16
    assert decode.decode_memory(hours, node_memory=64e9) > 20 * 1e9 > small
    mp3 = [[("a.mp3", "/c/a.mp3", 20 * MB)]]  # lossy: ~22x its size once decoded
    assert decode.decode_memory(mp3, node_memory=64e9) > 10 * small / 4
    # a file too big for any node: capped at 80% of the largest node, never unschedulable
    assert decode.decode_memory(hours, node_memory=8e9) == int(0.8 * 8e9)


@pytest.fixture
def stages(ray_session, tmp_path):
    def build(**req_kw):
        loc = storage.Location.of(str(tmp_path))
        s = Settings(audio_root=loc, out_path=loc, run_id="r", sr=44100, ratio=2048, chunk_samples=2048 * 64,
                     min_frames=1, resolution=64, batch_size=1, condition_ratio=0, centroids=None, scale=None)
        req = PreprocessRequest(str(tmp_path), str(tmp_path), str(tmp_path / "rave.ts"), **req_kw)
        import ray.data

        ds = ray.data.from_items([{"source": ["a.wav"], "path": [str(tmp_path / "a.wav")]}])
        out = flow.build_stages(ds, s, req, RaveInfo(data=b"rave", sha256="0" * 64, facts={}), memory=123 * MB)
        ops, op = {}, out._logical_plan.dag
        while op is not None:
            ops[op.name] = getattr(op, "ray_remote_args", None) or getattr(op, "_ray_remote_args", {})
            op = op.input_dependencies[0] if op.input_dependencies else None
        return ops
    return build


def test_the_decode_stage_asks_its_memory_and_encoders_their_pool(stages):
    ops = stages(encoder_resources="msprior_encode=1")
    decode_args = next(v for k, v in ops.items() if "decode_task" in k)
    assert decode_args["memory"] == 123 * MB
    encoder_args = next(v for k, v in ops.items() if "Encoder" in k)
    assert encoder_args["resources"] == {"msprior_encode": 1.0}
