"""How preprocess spreads its work: seeded tasks that mix the corpus, task sizes at scale, the CPU
decode stage apart from the encoder pool, torch threads from Ray's assignment, and every knob
reachable from `msprior pipeline` (and so from jobs/pipeline.py, which runs the same command)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from msprior import cli, devices
from msprior.data import decode, encode, intent, plan
from msprior.data.request import PreprocessRequest, RaveInfo, Settings

pytestmark = pytest.mark.timeout(600)


def _listing(n: int, size: int = 1 << 20):
    return [(f"artist{i // 10:03d}/track{i:05d}.wav", f"/c/artist{i // 10:03d}/track{i:05d}.wav", size)
            for i in range(n)]


def contiguous(sources, listing) -> bool:
    """Whether `sources` are one unbroken run of the sorted listing."""
    order = {src: i for i, (src, _, _) in enumerate(sorted(listing))}
    idx = sorted(order[s] for s in sources)
    return idx == list(range(idx[0], idx[0] + len(idx)))


def test_tasks_mix_the_corpus_and_a_resume_plans_the_same_way():
    files = _listing(200)
    req = PreprocessRequest("a", "o", "r", files_per_task=10)
    tasks = plan.tasks(files, req, seed=0)
    assert sorted(f for t in tasks for f in t) == sorted(files) and all(len(t) <= 10 for t in tasks)
    assert not any(contiguous([f[0] for f in t], files) for t in tasks)
    assert plan.tasks(list(reversed(files)), req, seed=0) == tasks  # the listing's order does not matter
    assert plan.tasks(files, req, seed=1) != tasks
    # a resume: the first three tasks committed; the rest keep the order they had
    done = {f for t in tasks[:3] for f in t}
    rest = plan.tasks([f for f in files if f not in done], req, seed=0)
    assert [f for t in rest for f in t] == [f for t in tasks[3:] for f in t]


def test_tasks_at_scale_are_thousands_and_a_small_corpus_still_spreads():
    """200,000 files, 6.3 TB: ~1 GB tasks (thousands, not the ~50,000 of 128 MB tasks); a small
    corpus is cut into at least 4 tasks per encoder whatever --task_mb says."""
    files = _listing(200_000, size=31_500_000)
    n = len(plan.tasks(files, PreprocessRequest("a", "o", "r"), seed=0))
    assert 5_000 < n < 8_000, n
    small = _listing(40, size=1 << 20)
    assert len(plan.tasks(small, PreprocessRequest("a", "o", "r", num_workers=2), seed=0)) >= 8


def test_the_seed_is_recorded_and_a_resume_keeps_the_tables(tmp_path):
    """A new table records --shuffle_seed in intent.json; a resume with another seed plans with the
    table's (no Ray here: no conditioning and a discrete RAVE fit nothing)."""
    rave = RaveInfo(data=b"ts", sha256="ab" * 32, facts={"continuous": False, "resolution": None, "sr": 44100,
                                                         "ratio": 1024})
    corpus = (str(tmp_path / "a"), [("x.wav", str(tmp_path / "a" / "x.wav"), 10)], [])
    kw = dict(condition_ratio=0, min_frames=32)
    first = PreprocessRequest(corpus[0], str(tmp_path / "t"), "r.ts", shuffle_seed=7, **kw)
    made = intent.check_or_write(first, rave, corpus, "r1", None)
    assert json.loads((tmp_path / "t" / "intent.json").read_text())["shuffle_seed"] == 7
    again = PreprocessRequest(corpus[0], str(tmp_path / "t"), "r.ts", shuffle_seed=3, **kw)
    kept = intent.check_or_write(again, rave, corpus, "r2", None)
    assert intent.shuffle_seed(made, first) == intent.shuffle_seed(kept, again) == 7
    assert intent.shuffle_seed({}, again) == 3  # a table from before the seed was recorded


def _settings(root) -> Settings:
    from msprior.data import features as feat

    n = len(feat.feature_names())
    return Settings(audio_root=str(root), out_path="", run_id="", sr=44100, ratio=1024, chunk_samples=172 * 1024,
                    min_frames=32, resolution=64, batch_size=4, condition_ratio=4,
                    centroids=np.random.default_rng(0).standard_normal((8, n)).astype(np.float32),
                    scale=np.ones(n, np.float32))


def test_decode_stage_rows_encode_exactly_like_the_old_in_actor_decode(tmp_path):
    """The decode task's rows (one per file, whole) through the chunk encoder give the rows of the old
    path (decode threads inside the encoder), bad files as one error row each."""
    from msprior.codec import save_codec
    from msprior.data.synthetic import write_bad_files, write_corpus

    write_corpus(str(tmp_path / "c"), n_files=3, seconds=9.0, seed=0)
    write_bad_files(str(tmp_path / "c" / "bad"))
    files = sorted(p for p in (tmp_path / "c").rglob("*.*") if p.suffix != ".txt")
    batch = {"source": np.array([str(p.relative_to(tmp_path / "c")) for p in files]),
             "path": np.array([str(p) for p in files])}
    s, model = _settings(tmp_path / "c"), [open(save_codec(str(tmp_path / "c.ts"), discrete=True), "rb").read()]
    decoded = list(decode.decode_task(batch, s))
    assert [t.num_rows for t in decoded] == [1] * len(files)  # one row per file: never split between blocks
    new = encode.ChunkEncoder(model, s)(pa.concat_tables(decoded))
    old = encode.Encoder(model, s)(batch)
    key = [("source", "ascending"), ("chunk", "ascending")]
    assert new.sort_by(key).equals(old.sort_by(key))
    assert sum(1 for r in new.to_pylist() if r["error"]) == 6 and new.num_rows == 6 + 3 * 3


def test_torch_threads_are_the_cpus_ray_assigned(ray_session):
    ray = ray_session
    threads = ray.remote(num_cpus=3)(devices.assigned_threads)
    assert ray.get(threads.remote(0)) == 3  # never os.cpu_count() (2 here)
    assert ray.get(ray.remote(num_cpus=0.5)(devices.assigned_threads).remote(0)) == 1
    assert ray.get(threads.remote(5)) == 5  # --threads_per_worker wins


def _ops(ds) -> list:
    """The logical operators of a dataset, source first."""
    out, op = [], ds._logical_plan.dag
    while op is not None:
        out.append(op)
        op = op.input_dependencies[0] if op.input_dependencies else None
    return out[::-1]


def test_decode_is_a_stage_of_cpu_tasks_before_the_encoder_pool(ray_session, tmp_path):
    """Decode: Ray tasks (autoscaled, or --decode_concurrency at most) with --decode_cpus each, no
    GPU; then the encoder actor pool of --num_workers. The old path has one actor stage only."""
    from msprior.data import flow

    ray, s, rave = ray_session, _settings(tmp_path), RaveInfo(data=b"ts", sha256="", facts={})
    ds = ray.data.from_items([{"source": ["a.wav"], "path": ["/a.wav"]}])
    req = PreprocessRequest("a", "o", "r", decode_concurrency=3, decode_cpus=2.0, num_workers=2)
    _, dec, enc = _ops(flow.build_stages([(ds, 0.0)], s, req, rave))
    assert dec.fn is decode.decode_task and isinstance(dec.compute, ray.data.TaskPoolStrategy)
    assert dec.compute.size == 3 and dec.ray_remote_args["num_cpus"] == 2.0 and not dec.ray_remote_args.get("num_gpus")
    assert enc.fn is encode.ChunkEncoder and isinstance(enc.compute, ray.data.ActorPoolStrategy)
    assert enc.compute.max_size == 2 and enc.batch_size is None  # whole blocks: whole files
    auto = _ops(flow.build_stages([(ds, 0.0)], s, PreprocessRequest("a", "o", "r"), rave))[1]
    assert auto.compute.size is None  # autoscaled: as many tasks as free CPUs allow
    old = _ops(flow.build_stages([(ds, 0.0)], s, PreprocessRequest("a", "o", "r", decode_in_encoder=True), rave))
    assert [op.fn for op in old[1:]] == [encode.Encoder]


KNOBS = {"--encode_workers": ("num_workers", 3), "--encode_batch_size": ("batch_size", 7),
         "--encoder_cpus": ("cpus_per_worker", 1.5), "--task_mb": ("task_mb", 512.0),
         "--files_per_task": ("files_per_task", 77), "--target_file_mb": ("target_file_mb", 96.0),
         "--decode_cpus": ("decode_cpus", 2.0), "--decode_concurrency": ("decode_concurrency", 5),
         "--decode_threads": ("decode_threads", 4), "--shuffle_seed": ("shuffle_seed", 9)}


def test_every_preprocess_knob_reaches_the_stage_from_msprior_pipeline(monkeypatch, tmp_path):
    import msprior.pipeline as pipeline

    seen = []

    def stop(req, *a, **kw):  # the stage boundary: keep the request, run nothing
        seen.append(req)
        raise SystemExit(0)

    monkeypatch.setattr(pipeline, "run_pipeline", stop)
    argv = ["pipeline", "--audio", "a", "--rave", "r.ts", "--out", str(tmp_path), "--decode_in_encoder"]
    for name, (_, value) in KNOBS.items():
        argv += [name, str(value)]
    with pytest.raises(SystemExit):
        cli.main(argv)
    (req,) = seen
    p = pipeline.Plan(req, None, "n", "", str(tmp_path / "data"), "", "", "")
    got = pipeline.preprocess_request(p, 33)
    for name, (field, value) in KNOBS.items():
        assert getattr(got, field) == value, name
    assert got.decode_in_encoder and got.min_frames == 33
