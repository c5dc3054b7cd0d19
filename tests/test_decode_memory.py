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
    def build(branches=None, **req_kw):
        loc = storage.Location.of(str(tmp_path))
        s = Settings(audio_root=loc, out_path=loc, run_id="r", sr=44100, ratio=2048, chunk_samples=2048 * 64,
                     min_frames=1, resolution=64, batch_size=1, condition_ratio=0, centroids=None, scale=None)
        req = PreprocessRequest(str(tmp_path), str(tmp_path), str(tmp_path / "rave.ts"), **req_kw)
        import ray.data

        ds = ray.data.from_items([{"source": ["a.wav"], "path": [str(tmp_path / "a.wav")]}])
        out = flow.build_stages(branches or [(ds, 123 * MB)], s, req, RaveInfo(data=b"rave", sha256="0" * 64, facts={}))
        ops, todo = [], [out._logical_plan.dag]
        while todo:  # every operator, through both sides of a union
            op = todo.pop()
            ops.append((op.name, getattr(op, "ray_remote_args", None) or getattr(op, "_ray_remote_args", {})))
            todo += list(op.input_dependencies)
        return ops
    return build


def test_the_decode_stage_asks_its_memory_and_encoders_their_pool(stages):
    ops = stages(encoder_resources="msprior_encode=1")
    decode_args = next(v for k, v in ops if "decode_task" in k)
    assert decode_args["memory"] == 123 * MB
    encoder_args = next(v for k, v in ops if "Encoder" in k)
    assert encoder_args["resources"] == {"msprior_encode": 1.0}


def test_a_long_file_decodes_in_a_stage_of_its_own(stages):
    """One 3-hour file must not set every decode task's memory: it goes to a stage of its own."""
    import ray.data

    short = [[("a.wav", "/c/a.wav", 10 * MB), ("long.wav", "/c/long.wav", 1900 * MB)], [("c.mp3", "/c/c.mp3", 5 * MB)]]
    regular, long = decode.split_long(short)
    assert regular == [[("a.wav", "/c/a.wav", 10 * MB)], [("c.mp3", "/c/c.mp3", 5 * MB)]]
    assert long == [[("long.wav", "/c/long.wav", 1900 * MB)]]
    assert decode.decode_memory(regular, 64e9) < 1e9 < 20e9 < decode.decode_memory(long, 64e9)
    assert decode.split_long(regular) == (regular, [])  # nothing long: one stage, as before
    rows = [ray.data.from_items([{"source": [f[0] for f in t], "path": [f[1] for f in t]} for t in part])
            for part in (regular, long)]
    ops = stages(branches=[(rows[0], 1 * MB), (rows[1], 2 * MB)])
    assert sorted(v["memory"] for k, v in ops if "decode_task" in k) == [1 * MB, 2 * MB]
    assert sum("Encoder" in k for k, _ in ops) == 1 and any(k.startswith("Union") for k, _ in ops)
