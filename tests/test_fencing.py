"""The table contract under faults, on real processes and real storage (local disk and SeaweedFS):
a writer paused past its lease (SIGSTOP, then SIGCONT) is fenced out; clock skew never expires a
live lease; a SIGKILLed holder on this host is taken over at once; release never frees another's
lease; a conditional PUT whose answer is lost is recognised as ours; three processes racing for a
stale lease (forced to meet at the swap) leave one owner; every kill point of commit and dedup
(a real SIGKILL there) resumes to the uninterrupted table. The mini writer is tests/_table_writer.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from msprior import storage
from msprior.data import commit as commit_mod
from msprior.data import table as tbl
from msprior.data.lease import Lease, LeaseHeld, read_owner

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent
WRITER = str(ROOT / "tests" / "_table_writer.py")
SOURCES = "a,b,c,d,e,f"


@pytest.fixture(params=["local", "s3"])
def table_path(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "table")
    request.getfixturevalue("s3_env")
    return f"s3://test-bucket/fence-{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}"


def writer(table, *args, env=None, sources=SOURCES) -> subprocess.Popen:
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, WRITER, table, sources, *args], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_state(pid: int, state: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} never reached state {state}")


def content(table: str) -> dict:
    """The table as a reader sees it: rows (sorted), index less file names, summed counters."""
    entries = tbl.read_ledger(table)
    t = tbl.read_table(table).sort_by([("source", "ascending"), ("chunk", "ascending")])
    idx = tbl.read_index(table).drop_columns(["file"]).sort_by("source")
    counters = sum(e.get("counters", {}).get("hits", 0) for e in entries)
    return {"rows": t.to_pydict(), "index": idx.to_pydict(), "hits": counters}


def test_paused_writer_is_fenced_out(table_path):
    """A (TTL 2 s) commits bundle 1, passes its fence for bundle 2 and is paused there (SIGSTOP, as a
    GC or VM pause); B takes the lease over (epoch 2), seals and sweeps; A resumes: its bundle-2
    record lands after the seal and never counts, bundle 3 is refused by the fence (exit 3)."""
    a = writer(table_path, "--ttl", "2", "--stop_bundle", "2", env={"MSPRIOR_FAULT_STOP": "commit.after_fence"})
    wait_state(a.pid, "T")
    time.sleep(3.5)  # past A's TTL on the storage's clock
    with Lease.acquire(table_path, ttl_s=30, run_id="b") as b:
        assert b.epoch == 2 and b.took_over["epoch"] == 1
        sealed = commit_mod.seal(table_path, b.epoch)
        commit_mod.sweep(table_path)
        assert [s for e in sealed for s, _, _ in e["sources"]] == ["a", "b"]
        os.kill(a.pid, signal.SIGCONT)
        _, err = a.communicate(timeout=120)
        assert a.returncode == 3 and "another run took this lease over" in err, err
        everything = tbl.read_ledger(table_path, everything=True)
        late = [e for e in everything if e["stem"] not in {x["stem"] for x in sealed}]
        assert [s for e in late for s, _, _ in e["sources"]] == ["c", "d"]  # landed after the seal ...
        assert tbl.read_ledger(table_path) == sealed  # ... and never counts
        assert not [e for e in everything if {"e", "f"} & {s for s, _, _ in e["sources"]}]  # fenced out
        for e in tbl.read_ledger(table_path):  # what counts names files that exist
            assert storage.exists(storage.join(table_path, e["file"]))
    rc = writer(table_path).wait(timeout=120)  # the resume: sweeps A's late record, encodes c..f
    assert rc == 0 and content(table_path)["index"]["source"] == list("abcdef")


def test_clock_skew_never_expires_a_live_lease(table_path):
    """The holder's wall clock is an hour behind (its heartbeats say 3600 s ago): still live."""
    a = writer(table_path, "--ttl", "4", "--hold", env={"MSPRIOR_FAULT_CLOCK_SKEW_S": "-3600"})
    try:
        assert json.loads(a.stdout.readline())["epoch"] == 1
        for _ in range(3):  # across several heartbeats
            with pytest.raises(LeaseHeld, match=r"heartbeat \d s ago"):
                Lease.acquire(table_path, ttl_s=4, run_id="b")
            time.sleep(2)
    finally:
        a.kill()
        a.wait()


def test_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
    """kill -9 (or the OOM killer): the next run on this host does not wait the 60 s TTL; a holder
    that is only stopped (alive) is still refused."""
    table = str(tmp_path / "t")
    a = writer(table, "--ttl", "60", "--hold")
    json.loads(a.stdout.readline())
    os.kill(a.pid, signal.SIGSTOP)
    with pytest.raises(LeaseHeld, match=f"pid {a.pid},"):
        Lease.acquire(table, ttl_s=60, run_id="b")
    a.kill()
    a.wait()
    t0 = time.monotonic()
    with Lease.acquire(table, ttl_s=60, run_id="b") as b:
        assert b.took_over["pid"] == a.pid and b.epoch == 2 and time.monotonic() - t0 < 10


def test_release_never_frees_another_owners_lease(table_path):
    old = Lease.acquire(table_path, ttl_s=1.0, run_id="old")
    old._stop.set()  # stops beating without noticing anything (a paused process)
    old._thread.join()
    time.sleep(2.5)
    with Lease.acquire(table_path, ttl_s=30, run_id="new") as new:
        old._thread = None
        old.release()  # the late release of the old owner
        assert read_owner(table_path)["run_id"] == "new"
        with pytest.raises(LeaseHeld, match="run new"):
            Lease.acquire(table_path, ttl_s=30, run_id="third")
        assert new.renew()


def test_three_processes_racing_for_a_stale_lease_leave_one_owner(table_path):
    """The three all read the same stale lease, then are released together at the swap (each is
    stopped at `lease.before_takeover` until all three are there): exactly one wins."""
    dead = Lease.acquire(table_path, ttl_s=1.0, run_id="dead")
    dead._stop.set()
    dead._thread.join()
    time.sleep(2.5)
    racers = [writer(table_path, "--ttl", "30", "--hold", env={"MSPRIOR_FAULT_STOP": "lease.before_takeover"})
              for _ in range(3)]
    try:
        for p in racers:
            wait_state(p.pid, "T", timeout=120)
        for p in racers:
            os.kill(p.pid, signal.SIGCONT)
        time.sleep(4)
        won = [p for p in racers if p.poll() is None]
        assert len(won) == 1, [p.stderr.read() for p in racers if p.poll() is not None]
        for p in racers:
            if p is not won[0]:
                assert p.returncode == 1 and "holds this table" in p.stderr.read()
        assert read_owner(table_path)["pid"] == won[0].pid and read_owner(table_path)["epoch"] == 2
    finally:
        for p in racers:
            p.kill()
            p.wait()


# --- a conditional PUT whose answer is lost: a TCP proxy in front of SeaweedFS -------------------


class DropAnswerProxy(threading.Thread):
    """Forwards to the S3 server; the answer to the next conditional PUT of `key` is never relayed
    (the server did the write; the client's connection is closed), as a network cut does."""

    def __init__(self, upstream: str, key: str):
        super().__init__(daemon=True)
        host, port = upstream.split("://")[1].split(":")
        self.up, self.key, self.armed, self.dropped = (host, int(port)), key, False, 0
        self.drop_all = False  # every conditional PUT of `key` loses its answer (the client gives up)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def run(self) -> None:
        while True:
            client, _ = self.sock.accept()
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client) -> None:
        server = socket.create_connection(self.up)
        drop = threading.Event()

        def down():
            try:
                while data := server.recv(65536):
                    if drop.is_set() and not data.startswith(b"HTTP/1.1 100"):  # the write happened: its
                        # answer is lost with the connection (a 100-continue is relayed: the body follows it)
                        drop.clear()
                        self.dropped += 1
                        for sock in (client, server):  # shutdown, not only close: the other thread's
                            sock.shutdown(socket.SHUT_RDWR)  # recv() returns, and the client sees the cut
                            sock.close()  # now, not after its read timeout
                        return
                    client.sendall(data)
            except OSError:
                pass

        threading.Thread(target=down, daemon=True).start()
        try:
            while data := client.recv(65536):
                head = data[:4096].decode("latin-1").lower()
                if (self.armed or self.drop_all) and head.startswith("put") and self.key in head and "if-" in head:
                    self.armed = False
                    drop.set()
                server.sendall(data)
        except OSError:
            pass


def test_a_lost_answer_to_a_conditional_put_is_not_a_conflict(s3_env, monkeypatch):
    key = f"lost-{time.time_ns()}"
    proxy = DropAnswerProxy(s3_env.endpoint, key)
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    storage._S3FS.clear()
    path = f"s3://test-bucket/{key}/x.json"
    proxy.armed = True
    tag = storage.retry(lambda: storage.create_exclusive(path, b"mine"), first_wait_s=0.1)
    assert proxy.dropped == 1 and storage.read_versioned(path) == (b"mine", tag)
    proxy.armed = True
    tag2 = storage.retry(lambda: storage.replace_if(path, b"mine, 2", tag), first_wait_s=0.1)
    assert proxy.dropped == 2 and storage.read_versioned(path) == (b"mine, 2", tag2)
    with pytest.raises(storage.Conflict):  # what another writer stored is still a conflict
        storage.replace_if(path, b"theirs", tag)
    # a heartbeat whose answer is lost: the lease is not lost, the next beat goes on
    lease = Lease.acquire(f"s3://test-bucket/{key}/table", ttl_s=60, run_id="r")
    lease._stop.set()
    lease._thread.join()
    proxy.armed = True
    try:
        lease.renew()
    except Exception:
        pass  # the answer was lost in transit (the client may or may not retry by itself)
    assert proxy.dropped == 3
    assert lease.renew() and not lease.lost
    lease.check()
    lease.release()
    storage._S3FS.clear()


def test_a_heartbeat_whose_answer_never_came_is_adopted_and_the_writer_commits(s3_env, monkeypatch):
    """A heartbeat PUT lands but no answer ever reaches the writer (every retry's answer is lost
    too, so the client gives up with a connection error): the stored lease now holds that beat, not
    the version the writer knows. Its next beat is refused (412) on the old version, finds its own
    lost beat stored, adopts it, and beats on: the lease is not lost, and the writer commits."""
    from _table_writer import rows, settings

    key = f"lostbeat-{time.time_ns()}"
    proxy = DropAnswerProxy(s3_env.endpoint, key)
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("MSPRIOR_RETRY_S", "5")
    storage._S3FS.clear()
    table = storage.Location.of(f"s3://test-bucket/{key}/table")  # resolved with the proxy's endpoint
    lease = Lease.acquire(table, ttl_s=60, run_id="w")
    lease._stop.set()  # the beats are driven by the test, one at a time
    lease._thread.join()
    try:
        known = lease.tag
        proxy.drop_all = True
        with pytest.raises(Exception) as lost:
            lease.renew()
        proxy.drop_all = False
        assert storage.is_transient(lost.value), lost.value
        stored, tag = table.join("lease.json").read_versioned()
        assert json.loads(stored)["beat"] == 1 and tag != known == lease.tag  # it landed; we never heard
        dropped = proxy.dropped
        assert dropped >= 1
        assert lease.renew() and not lease.lost  # adopted: beat 2 swapped on the lost beat's version
        assert json.loads(table.join("lease.json").read_versioned()[0])["beat"] == 2
        lease.check()
        commit_mod.commit_bundle(rows(["a", "b"]), settings(table, lease))  # fenced: still ours
        tbl.write_index(table, tbl.index_from_ledger(tbl.read_ledger(table)))
        assert sorted(tbl.read_index(table)["source"].to_pylist()) == ["a", "b"]
    finally:
        lease.release()
        storage._S3FS.clear()
    assert read_owner(table) is None  # released by its owner, not left held


# --- every kill point of commit, seal and dedup: a real SIGKILL there, then a resume -----------

KILL_POINTS = ["seal.after_seal", "commit.after_data", "commit.after_fence", "commit.after_record",
               "dedup.after_data", "dedup.after_fence", "dedup.after_record", "dedup.after_unrecord",
               "finish.after_index"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    table = str(tmp_path_factory.mktemp("ref") / "t")
    assert writer(table).wait(timeout=120) == 0
    return content(table)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_every_commit_and_dedup_point_then_resume(point, tmp_path, reference):
    """The writer commits some files twice (as a retried write task does), so its dedup runs; it is
    SIGKILLed at `point`; a plain resume gives the uninterrupted table: every source once, every row,
    the counters of every file, and no data file outside the committed records."""
    table, mark = str(tmp_path / "t"), tmp_path / "mark"
    env = {"MSPRIOR_FAULT_KILL": point, "MSPRIOR_FAULT_MARK": str(mark), "MSPRIOR_FAULT_DUPLICATE": "1"}
    killed = writer(table, env=env)
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL and mark.read_text().split() == [point]
    resumed = writer(table)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert content(table) == reference
    files = {f"latents/{p.name}" for p in (tmp_path / "t" / "latents").iterdir()}
    assert files == {e["file"] for e in tbl.read_ledger(table) if e.get("file")}


def _replacement_sorts_after(prefix: str) -> bool:
    """With sources prefix+a..f in bundles of 2 and each bundle's first file also committed alone,
    is the first record the dedup rewrites named before its replacement? (Then a dedup that forgot
    to remove replaced records first would drop the replacement as a duplicate of the original.)"""
    import hashlib

    names = [prefix + c for c in "abcdef"]
    rewritten = []
    for x, y in zip(names[::2], names[1::2]):
        alone, pair = tbl.data_file_stem([x]), tbl.data_file_stem([x, y])
        if alone < pair:  # x's first copy is the one kept: the pair is rewritten with y only
            new = "part-" + hashlib.sha1(("replaces " + pair + "\n" + y).encode()).hexdigest()[:20]
            rewritten.append((pair, new))
    return bool(rewritten) and min(rewritten)[0] < min(rewritten)[1]


def test_dedup_killed_between_replacement_and_removal_keeps_both_halves(tmp_path):
    """The dedup killed after a replacement record, before removing the record it replaces, where
    the original is named first: the resume removes the original (its replacement exists) and
    keeps every source."""
    prefix = next(p for p in (f"v{i}-" for i in range(200)) if _replacement_sorts_after(p))
    sources = ",".join(prefix + c for c in "abcdef")
    ref, table, mark = str(tmp_path / "ref"), str(tmp_path / "t"), tmp_path / "mark"
    assert writer(ref, sources=sources).wait(timeout=120) == 0
    env = {"MSPRIOR_FAULT_KILL": "dedup.after_record", "MSPRIOR_FAULT_MARK": str(mark), "MSPRIOR_FAULT_DUPLICATE": "1"}
    killed = writer(table, env=env, sources=sources)
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL and mark.read_text().split() == ["dedup.after_record"]
    assert writer(table, sources=sources).wait(timeout=120) == 0
    assert content(table) == content(ref)
