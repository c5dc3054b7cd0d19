"""Quality benchmark: msprior's prior against the original acids-msprior 1.1.3, on the same tokens.

Corpus: structured audio made here (espeak-ng speech, 10 voices; generated General-MIDI music
rendered by fluidsynth + FluidR3_GM), 44.1 kHz mono files of 2^20 samples, the last `--heldout` held
out. Tokens: `msprior preprocess` with RAVE's own discrete export (tests/fixtures/rave/v2_discrete.ts,
8 x 1024 codes, ratio 1024, random weights) into a training table and a held-out table; the same
integer tokens go into the original's own LMDB format (bench/quality_orig.py checks them). Both
tools train the same size (decoder_only, 4 layers, dim 128, 8 heads x 16, seq_len 64, dropout
0.01), batch 16, `--steps` steps, the original's schedule (AdamW lr 1e-3, betas 0.9/0.99, weight
decay 0.01, warm-up 10k steps from 0.01, decay 0.9999985, no clipping), CPU, and are scored on the
SAME held-out windows (bench/quality_msprior.py) with each tool's own model code: teacher-forced
cross-entropy per quantizer (nats per token). Prints per seed and mean of seeds, the unigram floor
and the gain ratio (unigram - msprior) / (unigram - original); writes a JSON and a markdown table.

The original runs in a throwaway venv under the cache (acids-msprior 1.1.3, cached_conv 2.5.0,
nn_tilde 1.6.0, udls 1.1.4 with --no-deps, torch 2.13.0 CPU, pytorch-lightning, ...); its results
are cached per (tokens, seed, steps, batch, architecture) and reused unless --retrain_original.

msprior's training (--msprior_train):
  inprocess (default): msprior's model, optimizer and window sampler in this process, with the
      configured schedule exactly. The product cannot express the original's schedule for a short
      run: `msprior train` caps the warm-up at 10% of max_steps (msprior/train/schedule.py
      warmup_for), so at 1,512 steps it warms up over 151 steps instead of 10,000.
  product: `msprior train` (Ray Train, a real run folder under <cache>/msprior-runs/ that
      `msprior evaluate --run RUN --db_path <cache>/tables/<corpus>/heldout` can score), loaded
      with msprior.checkpoint.load_run (last checkpoint); its own warm-up rule applies.

Rerun msprior's side alone against the original's cached results (same corpus flags and steps as
the cached run; results under <cache>/original/<key>/seed<S>/result.json), ablating with --override:

    cd /work/main && .venv/bin/python bench/quality.py --minutes 28.5 --heldout 5 --seeds 0,1 \
        --steps 1512 --jobs 2 --only msprior --override model.dropout=0.01   # any msprior key, repeatable

The original's side alone (cached for later runs): the same with --only original. A results
JSON's table again, with the original's results cached since: --report <cache>/results/FILE.json (several,
comma-separated: msprior's seeds of all of them in one table, e.g. seeds 0,1 and 2,3 run apart). Without --only
both tools train (the original only where its result is not cached; --retrain_original forces it).
--jobs N runs N trainings at once, each in its own process with --threads torch threads. Cost per
training step (batch 16 x 64 frames, one thread): the original 0.54 CPU-s, msprior 0.36 CPU-s, so
1,512 steps take ~14 / ~9 CPU-minutes per seed; on the shared 2-core machine at load average
40-240 a process at nice 0 got ~3-6% of a core. Develop with --minutes 8 --seeds 0 --steps 20.
The original's results at the issue's size and 1,512 steps (seeds 0, 1) are cached on this machine
(2026-12-06, bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import quality_corpus as corpus  # noqa: E402
import quality_msprior as ms  # noqa: E402

RAVE = os.path.join(REPO, "tests", "fixtures", "rave", "v2_discrete.ts")
ORIG_WHEELS = ["acids-msprior==1.1.3", "cached_conv==2.5.0", "nn_tilde==1.6.0", "udls==1.1.4"]
# the original's runtime dependencies (its own wheel asks for more: preprocessing/export only)
ORIG_DEPS = ["pytorch-lightning", "gin-config", "lmdb", "einops", "scipy", "absl-py", "protobuf", "tqdm",
             "numpy", "flask", "requests", "librosa", "pathos", "tensorboardX"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/msprior-bench/quality"))
    p.add_argument("--minutes", type=float, default=13.5, help="corpus length, held-out files included")
    p.add_argument("--heldout", type=int, default=4, help="files held out for scoring")
    p.add_argument("--corpus_seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds (both tools)")
    p.add_argument("--steps", type=int, default=1512)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=64, help="context of both models and the held-out windows")
    p.add_argument("--override", action="append", default=[], help="msprior config key=value (repeatable)")
    p.add_argument("--msprior_train", choices=["inprocess", "product"], default="inprocess")
    p.add_argument("--retrain_original", action="store_true", help="ignore the original's cached results")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training (the machine is shared)")
    p.add_argument("--label", default="", help="name of msprior's rows in the table")
    p.add_argument("--only", choices=["original", "msprior"], default=None,
                   help="train one tool only (the other's cached results, if any, are still reported)")
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once (each its own process when > 1)")
    p.add_argument("--report", default=None, help="print a results JSON again (several: comma-separated, msprior's "
                   "seeds merged), with the original's results cached since (trains nothing)")
    p.add_argument("--msprior_job", type=int, default=None, help=argparse.SUPPRESS)  # internal: one seed
    p.add_argument("--job_out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def sha(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# --- corpus and tokens ---------------------------------------------------------------------------


def preprocess(audio: str, out: str, log: str) -> None:
    """`msprior preprocess` with RAVE's discrete export: one 1024-frame chunk per file."""
    if os.path.exists(os.path.join(out, "manifest.json")):
        return
    cmd = [sys.executable, "-m", "msprior", "preprocess", "--audio", audio, "--out_path", out, "--rave", RAVE,
           "--num_secs", repr(corpus.FILE_SECS), "--condition_ratio", "0"]
    for attempt in range(3):  # a re-run resumes; Ray's dashboard was seen to time out on a loaded machine
        with open(log, "w") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        if r.returncode == 0:
            return
        print(f"msprior preprocess failed (exit {r.returncode}, try {attempt + 1} of 3); see {log}", flush=True)
    raise SystemExit(f"bench/quality: msprior preprocess failed 3 times; see {log}")


def tokens(args) -> dict:
    """Corpus -> two latent tables -> <cache>/tokens/<tag>/ (train.npz, heldout.npz, windows)."""
    n = max(args.heldout + args.batch_size, round(args.minutes * 60 / corpus.FILE_SECS))
    tag = f"n{n}-h{args.heldout}-s{args.corpus_seed}"
    root = os.path.join(args.cache, "corpus", tag)
    corpus.make_corpus(root, n, args.heldout, args.corpus_seed, echo=lambda *a, **k: print(*a, **k, flush=True))
    tables = os.path.join(args.cache, "tables", tag)
    os.makedirs(tables, exist_ok=True)
    for split in ("train", "heldout"):
        preprocess(os.path.join(root, split), os.path.join(tables, split), os.path.join(tables, f"{split}.log"))
    out = os.path.join(args.cache, "tokens", f"{tag}-L{args.seq_len}")
    meta_path = os.path.join(out, "tokens.json")
    if not os.path.exists(meta_path):
        os.makedirs(out, exist_ok=True)
        train, held = ms.table_chunks(os.path.join(tables, "train")), ms.table_chunks(os.path.join(tables, "heldout"))
        windows = ms.heldout_windows(held, args.seq_len)
        ms.save_chunks(os.path.join(out, "train.npz"), train)
        ms.save_chunks(os.path.join(out, "heldout.npz"), held)
        np.save(os.path.join(out, "heldout_windows.npy"), windows)
        manifest = json.load(open(os.path.join(tables, "train", "manifest.json")))["rave"]
        meta = {"corpus": tag, "files": n, "heldout_files": args.heldout, "train_chunks": len(train),
                "train_frames": int(sum(len(c) for c in train)), "heldout_windows": int(len(windows)),
                "num_quantizers": int(manifest["num_quantizers"]), "vocab_size": int(manifest["vocab_size"]),
                "ratio": int(manifest["ratio"]), "rave_sha256": manifest["sha256"],
                "train_sha256": token_sha(train), "windows_sha256": token_sha([windows])}
        ms.write_json(meta_path, meta)
    meta = json.load(open(meta_path))
    meta.update(dir=out, tables=tables, corpus_dir=root)
    return meta


def token_sha(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.int16).tobytes())
    return h.hexdigest()


# --- the original ---------------------------------------------------------------------------------


def orig_venv(cache: str) -> str:
    """Python of the original's throwaway venv (made once)."""
    venv = os.path.join(cache, "orig-venv")
    py = os.path.join(venv, "bin", "python")
    done = os.path.join(venv, ".bench-installed")
    if os.path.exists(done):
        return py
    dl = os.path.join(cache, "dl")
    pip = [py, "-m", "pip", "install", "-q"]
    print("original: installing acids-msprior 1.1.3 into", venv, flush=True)
    _run(["python3", "-m", "venv", venv])
    _run([py, "-m", "pip", "download", "-q", "--no-deps", "-d", dl] + ORIG_WHEELS)
    _run(pip + ["torch==2.13.0"])  # the CPU wheel
    _run(pip + ["--no-deps"] + [os.path.join(dl, f) for f in sorted(os.listdir(dl)) if f.endswith(".whl")])
    _run(pip + ORIG_DEPS)
    open(done, "w").close()
    return py


def _run(cmd: list) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench/quality: {' '.join(cmd[:5])} ... failed: {(r.stderr.strip().splitlines() or [''])[-1]}")


def orig_bindings(args, meta) -> list:
    return ["MODEL_DIM=128", "NUM_LAYERS=4", "NUM_HEADS=8", "HEAD_DIM=16", f"SEQ_LEN={args.seq_len}",
            "DROPOUT_RATE=0.01", f"NUM_TOKENS={meta['vocab_size']}"]


def run_original(args, meta, seed: int) -> dict:
    """The original's result for `seed`: cached, or trained now in its venv."""
    bindings = orig_bindings(args, meta)
    key = sha({"tokens": meta["train_sha256"], "windows": meta["windows_sha256"], "steps": args.steps,
               "batch": args.batch_size, "bindings": bindings, "threads_do_not_matter": 1})
    work = os.path.join(args.cache, "original", key, f"seed{seed}")
    out = os.path.join(work, "result.json")
    if os.path.exists(out) and not args.retrain_original:
        res = json.load(open(out))
        res["cached"] = True
        return res
    if args.only == "msprior":
        return {}
    py = orig_venv(args.cache)
    os.makedirs(work, exist_ok=True)
    cmd = [py, os.path.join(HERE, "quality_orig.py"), "--tokens", meta["dir"], "--work", work, "--out", out,
           "--seed", str(seed), "--steps", str(args.steps), "--batch_size", str(args.batch_size),
           "--threads", str(args.threads)] + [f"--binding={b}" for b in bindings]
    log = os.path.join(work, "train.log")
    print(f"original seed {seed}: training {args.steps} steps (log: {log})", flush=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=work)
    if r.returncode != 0:
        raise SystemExit(f"bench/quality: the original's run failed (exit {r.returncode}); see {log}")
    res = json.load(open(out))
    if res["train_tokens_sha256"] != meta["train_sha256"]:
        raise SystemExit("bench/quality: the original trained on other tokens than msprior's training table")
    return res


# --- msprior --------------------------------------------------------------------------------------


def run_msprior(args, meta, seed: int) -> dict:
    import torch

    from msprior.model import DatasetFacts

    windows = np.load(os.path.join(meta["dir"], "heldout_windows.npy"))
    overrides = [f"model.seq_len={args.seq_len}", f"train.batch_size={args.batch_size}"] + args.override
    cfg = ms.config(overrides)
    print(f"msprior seed {seed}: training {args.steps} steps ({args.msprior_train})", flush=True)
    if args.msprior_train == "inprocess":
        train = _chunks(os.path.join(meta["dir"], "train.npz"))
        facts = DatasetFacts(num_quantizers=meta["num_quantizers"], vocab_size=meta["vocab_size"])
        prior, secs, cpu = ms.train_inprocess(cfg, facts, train, seed, args.steps, args.threads)
        steps_done, run_dir = args.steps, None
    else:
        runs = os.path.join(args.cache, "msprior-runs")
        name = f"q-{sha([meta['train_sha256'], overrides, args.steps])}-seed{seed}"
        run_dir = os.path.join(runs, name)
        log = os.path.join(runs, f"{name}.log")
        os.makedirs(runs, exist_ok=True)
        secs = ms.train_product(os.path.join(meta["tables"], "train"), runs, name, overrides, seed, args.steps,
                                args.batch_size, log)
        prior, steps_done = ms.load_product_run(run_dir)
        cpu = None  # in Ray's workers
    torch.set_num_threads(args.threads)
    ce = ms.score(prior, windows, args.batch_size)
    check = ms.shared_check(prior, windows, os.path.join(meta["tables"], "heldout"), args.seq_len, ce)
    return {**check, "tool": "msprior", "seed": seed, "steps": args.steps, "steps_done": steps_done,
            "train_s": round(secs, 1), "train_cpu_s": None if cpu is None else round(cpu, 1), "ce": ce,
            "mean": float(np.mean(ce)), "mode": args.msprior_train, "run_dir": run_dir, "overrides": args.override,
            "params": sum(p.numel() for p in prior.parameters())}


def msprior_in_subprocess(args, meta, seed: int, argv) -> dict:
    """run_msprior in its own process (own RNG and threads): this script with --msprior_job."""
    out = os.path.join(args.cache, "results", f"job-{os.getpid()}-seed{seed}.json")
    log = out[:-5] + ".log"
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, os.path.abspath(__file__)] + list(argv) +
                           ["--msprior_job", str(seed), "--job_out", out], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"bench/quality: msprior seed {seed} failed (exit {r.returncode}); see {log}")
    res = json.load(open(out))
    os.remove(out)
    return res


def run_all(args, meta, seeds, argv):
    """Both tools for every seed, `--jobs` trainings at a time (the original's longest first)."""
    from concurrent.futures import ThreadPoolExecutor

    def job(tool_seed):
        tool, seed = tool_seed
        if tool == "original":
            return run_original(args, meta, seed)
        if args.only == "original":
            return {}
        if args.jobs > 1:
            return msprior_in_subprocess(args, meta, seed, argv)
        return run_msprior(args, meta, seed)

    todo = [("original", s) for s in seeds] + [("msprior", s) for s in seeds]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        done = list(pool.map(job, todo))
    return [r for r in done[:len(seeds)] if r], [r for r in done[len(seeds):] if r]


def _chunks(path: str):
    z = np.load(path)
    starts = np.concatenate([[0], np.cumsum(z["lengths"])[:-1]])
    return [z["rave"][s:s + n] for s, n in zip(starts, z["lengths"])]


# --- report ---------------------------------------------------------------------------------------


def mean_of(results) -> list:
    return np.mean([r["ce"] for r in results], axis=0).tolist() if results else []


def _row(name: str, ce: list, extra: str = "") -> str:
    return f"| {name} | {extra} | **{np.mean(ce):.3f}** | {' '.join(f'{v:.2f}' for v in ce)} |"


def table(report: dict) -> str:
    lines = ["| model | seeds (train s) | held-out CE | q0 .. q{} |".format(len(report["unigram"]) - 1),
             "|---|---|---|---|", _row("unigram of the training tokens (add-one)", report["unigram"])]
    for tool, title in (("original", "original acids-msprior 1.1.3"), ("msprior", report["msprior_label"])):
        runs = report[tool]
        if not runs:
            lines.append(f"| {title} | not run | | |")
            continue
        for r in runs:
            lines.append(_row(f"{title}, seed {r['seed']}", r["ce"], f"{r['seed']} ({r['train_s']:.0f} s)"))
        lines.append(_row(f"{title}, mean of {len(runs)} seeds", mean_of(runs), ",".join(str(r["seed"]) for r in runs)))
    if report["original"] and report["msprior"]:
        d = np.array(mean_of(report["msprior"])) - np.array(mean_of(report["original"]))
        lines.append(f"| msprior - original (means) | | {d.mean():+.3f} | {' '.join(f'{v:+.2f}' for v in d)} |")
    return "\n".join(lines)


def per_quantizer(report: dict) -> str:
    """Means of seeds per quantizer at 3 decimals, their difference and its standard error
    (sqrt(s_o^2 / n_o + s_m^2 / n_m), seed standard deviations s)."""
    o, m = np.array([r["ce"] for r in report["original"]]), np.array([r["ce"] for r in report["msprior"]])
    if not (len(o) and len(m)):
        return ""
    q = o.shape[1]
    sd = lambda a: a.std(axis=0, ddof=1) if len(a) > 1 else np.full(q, np.nan)  # noqa: E731
    se = np.sqrt(sd(o) ** 2 / len(o) + sd(m) ** 2 / len(m))

    def row(name, v, fmt="{:.3f}", mean=True):
        cells = [fmt.format(x) for x in v] + ([fmt.format(float(np.mean(v)))] if mean else [""])
        return f"| {name} | " + " | ".join(cells) + " |"

    return "\n".join([
        "| quantizer | " + " | ".join(f"q{i}" for i in range(q)) + " | mean |", "|---" * (q + 2) + "|",
        row(f"original, mean of {len(o)} seeds", o.mean(axis=0)), row(f"msprior, mean of {len(m)} seeds", m.mean(axis=0)),
        row("difference", m.mean(axis=0) - o.mean(axis=0), "{:+.3f}"), row("s.e. of the difference", se, mean=False),
        row("seed s.d. original", sd(o), mean=False), row("seed s.d. msprior", sd(m), mean=False)])


def gain_ratio(report: dict):
    if not (report["original"] and report["msprior"]):
        return None
    u = float(np.mean(report["unigram"]))
    gain = u - np.mean(mean_of(report["original"]))
    return None if gain <= 0 else float((u - np.mean(mean_of(report["msprior"]))) / gain)


def finish(args, report: dict, t0: float) -> None:
    """Gain ratio, the JSON under <cache>/results/, the markdown table on stdout."""
    report["gain_ratio"] = gain_ratio(report)
    os.makedirs(os.path.join(args.cache, "results"), exist_ok=True)
    path = os.path.join(args.cache, "results", f"quality-{time.strftime('%Y%m%dT%H%M%S')}.json")
    ms.write_json(path, report)
    meta, original, msprior = report["tokens"], report["original"], report["msprior"]
    print(f"\ncorpus {meta['corpus']}: {meta['train_chunks']} training chunks ({meta['train_frames']} frames), "
          f"{meta['heldout_windows']} held-out windows of {report['seq_len'] + 1} frames; {report['steps']} steps, "
          f"batch {report['batch_size']}; params original {original[0]['params'] if original else '?'}, msprior "
          f"{msprior[0]['params'] if msprior else '?'}\n")
    print(table(report))
    print("\n" + per_quantizer(report))
    g = report["gain_ratio"]
    print(f"\ngain ratio (unigram - msprior) / (unigram - original): {g:.3f}" if g is not None else
          "\ngain ratio: n/a (no original result, or the original is not below the unigram floor)")
    print(f"results: {path} ({time.time() - t0:.0f} s)")


def rereport(args, path: str) -> None:
    """--report: a results JSON again, with the original's results cached since (nothing trains);
    several, comma-separated (same corpus and steps): msprior's seeds of all of them in one table."""
    paths = path.split(",")
    report = json.load(open(paths[0]))
    for other in paths[1:]:
        more = json.load(open(other))
        if (more["tokens"]["train_sha256"], more["steps"]) != (report["tokens"]["train_sha256"], report["steps"]):
            raise SystemExit(f"bench/quality: {other} was trained on other tokens or steps than {paths[0]}")
        report["msprior"] += more["msprior"]
    args.steps, args.batch_size, args.seq_len = report["steps"], report["batch_size"], report["seq_len"]
    args.only = "msprior"  # run_original: cached results only
    seeds = sorted({r["seed"] for r in report["msprior"] + report["original"]})
    report["original"] = [r for r in (run_original(args, report["tokens"], s) for s in seeds) if r]
    report["command"] += f"  (table: bench/quality.py --report {','.join(map(os.path.basename, paths))})"
    finish(args, report, time.time())


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report:
        return rereport(args, args.report)
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    if len(seeds) < 1:
        raise SystemExit("bench/quality: --seeds needs at least one seed")
    t0 = time.time()
    meta = tokens(args)
    if args.msprior_job is not None:
        ms.write_json(args.job_out, run_msprior(args, meta, args.msprior_job))
        return
    windows = np.load(os.path.join(meta["dir"], "heldout_windows.npy"))
    unigram = ms.unigram_ce(_chunks(os.path.join(meta["dir"], "train.npz")), windows, meta["vocab_size"])
    original, msprior = run_all(args, meta, seeds, argv)
    label = args.label or ("msprior" + (f" ({', '.join(args.override)})" if args.override else "")
                           + ("" if args.msprior_train == "inprocess" else ", `msprior train`"))
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
              "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]), "tokens": meta,
              "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "unigram": unigram,
              "original": original, "msprior": msprior, "msprior_label": label, "msprior_train": args.msprior_train}
    finish(args, report, t0)


if __name__ == "__main__":
    main()
