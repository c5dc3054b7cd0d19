"""Where data lives: one `storage.Location`, and no module outside msprior/storage/ that tests a scheme.

The static check reads the code (AST: docstrings and help texts do not count) of msprior/ and jobs/.
The round trips run on a real local folder and on the real SeaweedFS S3 of the session, including a
Ray task that reads through a Location made on the driver while its own environment holds no S3
credentials (a worker started before they were set, which once failed a run's first checkpoint).
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path
from typing import List

import pytest

from msprior import storage

ROOT = Path(__file__).resolve().parents[1]
STORAGE = ROOT / "msprior" / "storage"  # the package that owns where data lives
# "://" tests that are not about where data lives: MLflow tracking URIs (http://, sqlite://)
NOT_DATA = {ROOT / "msprior" / "tracking.py"}
# the local dev stack names the buckets it creates itself (f"s3://{bucket}")
MAKES_BUCKETS = {ROOT / "msprior" / "devstack.py", ROOT / "msprior" / "devstack" / "servers.py",
                 ROOT / "msprior" / "devstack" / "stack.py"}


def _has_scheme(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and "://" in node.value


def scheme_tests(source: str, builds_urls: bool = False) -> List[str]:
    """`line: what` for each place in `source` that knows there are two kinds of storage."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, (ast.Name, ast.Attribute)):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if name in ("is_s3", "_is_s3", "S3Options"):
                found.append(f"{line}: uses {name}")
        elif isinstance(node, ast.arg) and (node.arg == "s3" or "S3Options" in ast.unparse(node.annotation or ast.Constant(""))):
            found.append(f"{line}: parameter {node.arg}")
        elif isinstance(node, ast.Compare) and any(_has_scheme(n) for n in [node.left, *node.comparators]):
            found.append(f"{line}: compares a scheme ({ast.unparse(node)[:60]})")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in ("startswith", "endswith", "partition", "split") \
                    and any(_has_scheme(a) for a in node.args):
                found.append(f"{line}: tests a scheme ({ast.unparse(node)[:60]})")
            if isinstance(f, ast.Name) and f.id == "len" and any(_has_scheme(a) for a in node.args):
                found.append(f"{line}: slices a scheme off ({ast.unparse(node)[:60]})")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and (_has_scheme(node.left) or _has_scheme(node.right)):
            found.append(f"{line}: adds a scheme ({ast.unparse(node)[:60]})")
        elif isinstance(node, ast.JoinedStr) and not builds_urls and node.values and _has_scheme(node.values[0]) \
                and str(node.values[0].value).endswith("://"):
            found.append(f"{line}: builds a URL from a path ({ast.unparse(node)[:60]})")
    return found


def test_no_module_but_storage_tests_for_a_scheme():
    files = sorted([*(ROOT / "msprior").rglob("*.py"), *(ROOT / "jobs").rglob("*.py")])
    bad = {}
    for path in files:
        if STORAGE in path.parents or path in NOT_DATA:
            continue
        found = scheme_tests(path.read_text(), builds_urls=path in MAKES_BUCKETS)
        if found:
            bad[str(path.relative_to(ROOT))] = found
    assert not bad, ("these modules test for a storage scheme or take S3 settings; pass a "
                     f"msprior.storage.Location instead: {bad}")


def test_the_check_sees_each_way_of_testing_a_scheme():
    """The guard above fails when one of these comes back (the forms storage's callers used to have)."""
    samples = ['storage.is_s3(path)', 'x = p[len("s3://"):]', 'ok = path.startswith("s3://")',
               'ok = "://" in root', 'u = "s3://" + parent', 'u = f"s3://{p}"',
               'def f(path, s3: storage.S3Options): pass', 'def g(folder, s3=None): pass']
    for code in samples:
        assert scheme_tests(code), code
    assert not scheme_tests('"""Local or s3:// paths."""\nhelp = "folder or s3://bucket/prefix"\n')
    assert not scheme_tests('u = f"s3://{bucket}"', builds_urls=True)


def round_trip(base: storage.Location, tmp: str) -> None:
    """Everything stages do through a Location, on one storage."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert pickle.loads(pickle.dumps(base)) == base
    f = base.join("sub", "a.bin")
    assert not f.exists() and base.listdir() == []
    f.write_bytes(b"one")
    assert f.exists() and f.read_bytes() == b"one" and f.name == "a.bin"
    assert base.list_files() == [("sub/a.bin", 3)] and base.listdir() == ["sub"]
    tag = base.join("lease.json").create_exclusive(b"v1")
    with pytest.raises(storage.Conflict):
        base.join("lease.json").create_exclusive(b"v1 of another writer")
    data, tag2 = base.join("lease.json").read_versioned()
    assert data == b"v1" and tag2 == tag
    base.join("lease.json").replace_if(b"v2", tag)
    with pytest.raises(storage.Conflict):
        base.join("lease.json").replace_if(b"v3", tag)
    assert base.join("lease.json").read_aged()[0] == b"v2"
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"x": [1, 2, 3]}), buf)
    base.join("t.parquet").write_bytes(buf.getvalue().to_pybytes())
    fs, root = base.pyarrow()
    assert pq.read_table(f"{root}/t.parquet", filesystem=fs)["x"].to_pylist() == [1, 2, 3]
    assert base.at(f"{root}/t.parquet").read_bytes() == base.join("t.parquet").read_bytes()
    with f.local_copy() as local:
        assert Path(local).read_bytes() == b"one"
    out = base.join("out", "model.ts")
    local = out.local_path(tmp)
    Path(local).write_bytes(b"model")  # what a library that wants a local file writes
    out.upload_from(local)
    assert out.read_bytes() == b"model"
    out.download_to(f"{tmp}/copy.ts")
    assert Path(tmp, "copy.ts").read_bytes() == b"model"
    f.delete()
    f.delete()  # a missing file is not an error
    assert not f.exists()


def test_a_local_folder_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = storage.Location.of("table")
    assert base.url == str(tmp_path / "table") and base.is_local and base.s3 is None
    assert storage.Location.of(base) is base
    (tmp_path / "tmp").mkdir()
    round_trip(base, str(tmp_path / "tmp"))
    assert base.ray_storage() == (base.url, None)


def test_s3_round_trips_with_the_settings_it_was_resolved_with(s3_env, monkeypatch, tmp_path):
    import time

    base = storage.Location.of(f"s3://test-bucket/location-{time.time_ns()}/")
    assert base.url.startswith("s3://test-bucket/location-") and not base.url.endswith("/")
    assert s3_env.secret_key not in repr(base) and base.s3.key
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)  # from here on only the Location knows where and who
    storage._S3FS.clear()
    round_trip(base, str(tmp_path))
    path, fs = base.ray_storage()
    assert fs is not None and path == base.url[len("s3://"):]


def test_a_ray_task_reads_through_the_drivers_location(ray_session, s3_env):
    """The worker's environment holds no S3 settings at all; the Location made on the driver does."""
    import time

    ray = ray_session
    where = storage.Location.of(f"s3://test-bucket/location-ray-{time.time_ns()}/data.bin")
    where.write_bytes(b"from the driver")
    blank = {k: "" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                             "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}

    @ray.remote(num_cpus=0.1, runtime_env={"env_vars": blank})
    def read(loc: storage.Location):
        worker_env = storage.Location.of(loc.url).s3  # what the worker itself would resolve
        return worker_env.key, worker_env.endpoint_url, loc.read_bytes()

    key, endpoint, data = ray.get(read.remote(where), timeout=300)
    assert key is None and endpoint is None  # the worker could not have found the server by itself
    assert data == b"from the driver"
