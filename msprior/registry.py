"""MLflow model registry for nn~ exports: register a version, move `champion`, pull the exact bytes.

A version is a pyfunc "models from code" model (msprior/export/pyfunc.py) carrying the `.ts` as
its artifact "ts": no pickled Python objects, and the file nn~ loads comes back byte for byte.
A version is created with its tags in one call (a crash cannot leave a version without them):
sha256 (of the .ts), rave_sha256, table, corpus, config, continuous, val_loss, quantize,
torch_version, run, checkpoint.

A registered model belongs to one corpus: the RAVE model (its sha256) and the latent table (its
location) its versions were trained on. The registered model carries them as tags from its
creation; a version of another corpus is refused, so `NAME@champion` never hands back a prior for
another RAVE. `champion` is the version of lowest validation cross-entropy (ties: the older one)
among those validated on the same split as the model's first (`comparable`: like with like).
Every registration, after creating its version, re-reads the versions and the alias and sets the
alias until the two agree: two registrations racing on one model leave it on the better version,
whatever the interleaving (each write is followed by a read, and the last reader sees every
version).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from msprior import storage
from msprior.errors import UserError
from msprior.flags import flag
from msprior.redact import redact_uri, with_credentials

CHAMPION = "champion"
TS_ARTIFACT = "ts"
# the registered model's corpus, set when it is created (tag keys)
BOUND_RAVE, BOUND_TABLE, BOUND_CORPUS = "msprior.rave_sha256", "msprior.table", "msprior.corpus"
# fault injection for tests: before its first alias write, wait until this file exists (a
# registration that chose its champion, then stalled while another one registered a better version)
STALL_ENV = "MSPRIOR_FAULT_CHAMPION_STALL"


class RegistryError(UserError):
    """A missing model / alias / version, a corpus mismatch or a corrupted download; one line."""


def registry_client(tracking_uri: Optional[str]):
    """The MLflow client of `tracking_uri` (a recorded, redacted URI gets MLFLOW_TRACKING_URI's
    credentials back; None: the default store)."""
    from msprior.tracking import client, default_tracking_uri

    return client(default_tracking_uri(with_credentials(tracking_uri)))


def model_name(run_name: str) -> str:
    """`msprior-<run name>`, restricted to characters every MLflow store accepts."""
    return "msprior-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-")


def corpus_id(rave_sha256: Optional[str], table: Optional[str]) -> str:
    """12 hex digits naming a corpus: the RAVE model's sha256 and the latent table's location."""
    key = f"{rave_sha256 or 'unknown'}\n{redact_uri(table) or 'unknown'}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def table_content(db_path: Optional[str]) -> Optional[str]:
    """The committed content digest of a latent table (its manifest's `content_sha256`), or None
    (a table of an older msprior, or one that cannot be read from here)."""
    if not db_path:
        return None
    try:
        return json.loads(storage.read_bytes(storage.join(db_path, "manifest.json"))).get("content_sha256")
    except Exception:
        return None


def corpus_tags(meta: Dict[str, Any]) -> Dict[str, str]:
    """The corpus of an export (from its metadata) as version tags: the RAVE model and the table's
    committed content (a copy elsewhere is the same corpus, a table rewritten in place is another).
    The content is the export's `table_sha256` (what training read); for an export without it (an
    older msprior) the table's manifest now; the table's location only when both are unknown."""
    rave, table = meta.get("rave_sha256"), redact_uri(meta.get("db_path"))
    content = meta.get("table_sha256") or table_content(meta.get("db_path"))
    return {"rave_sha256": str(rave or "unknown"), "table": str(table or "unknown"),
            "table_sha256": str(content or "unknown"),
            "corpus": corpus_id(rave, f"content:{content}" if content else table)}


def _float(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def version_tags(meta: Dict[str, Any], digest: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Every tag of a new version, from the export's metadata and the file's sha256."""
    val_loss = _float(meta.get("best_val_loss") if meta.get("checkpoint") == "best" else meta.get("val_loss"))
    if val_loss is None:
        val_loss = _float(meta.get("val_loss"))
    return {
        "sha256": digest,
        **corpus_tags(meta),
        "config": str(meta.get("config_name")),
        "continuous": str(bool(meta.get("continuous"))).lower(),
        "val_loss": "" if val_loss is None else repr(val_loss),
        "quantize": str(meta.get("quantize", "none")),
        "torch_version": str(meta.get("torch_version")),
        "run": str(meta.get("run_name")),
        "checkpoint": str(meta.get("checkpoint")),
        "val_split": val_split(meta),
        **(extra or {}),
    }


def val_split(meta: Dict[str, Any]) -> str:
    """Which files a version's val_loss was measured on: the run's split settings (the corpus is the
    model's). Two versions validated on other files (or, with val_fraction 0, on their training
    files) do not hold comparable val_loss values."""
    data = (meta.get("config") or {}).get("data") or {}
    return f"seed={data.get('seed')},val_fraction={data.get('val_fraction')}" if data else ""


def default_name(c, run_name: str, tags: Dict[str, str]) -> str:
    """`msprior-<run name>`, or `msprior-<run name>-<corpus id>` when that name holds another corpus."""
    base = model_name(run_name)
    try:
        bound = (c.get_registered_model(base).tags or {}).get(BOUND_CORPUS)
    except Exception:  # no such model yet
        return base
    return base if bound in (None, tags["corpus"]) else f"{base}-{tags['corpus'][:8]}"


def bind_corpus(c, name: str, tags: Dict[str, str]) -> None:
    """Create `name` bound to this corpus, or check that the existing model is bound to it."""
    bound = {BOUND_RAVE: tags["rave_sha256"], BOUND_TABLE: tags["table"], BOUND_CORPUS: tags["corpus"]}
    try:
        c.create_registered_model(name, tags=bound, description="msprior prior for nn~ (one corpus)")
        return
    except Exception:  # exists already (maybe created by a concurrent registration this instant)
        rm = c.get_registered_model(name)
    have = (rm.tags or {}).get(BOUND_CORPUS)
    if have is None:  # registered before models were bound to a corpus: bind it now
        for k, v in bound.items():
            c.set_registered_model_tag(name, k, v)
    elif have != tags["corpus"]:
        raise RegistryError(
            f"registered model {name!r} holds priors of another corpus (RAVE {rm.tags.get(BOUND_RAVE, '?')[:12]}, "
            f"table {rm.tags.get(BOUND_TABLE)}); this export is RAVE {tags['rave_sha256'][:12]}, table {tags['table']}: "
            f"pass another name (e.g. --name {name}-{tags['corpus'][:8]})")


def register_export(ts_path: str, name: Optional[str] = None, tracking_uri: Optional[str] = None,
                    previews: Iterable[str] = (), extra_tags: Optional[Dict[str, str]] = None,
                    echo: Optional[Callable[[str], Any]] = None) -> Dict[str, Any]:
    """Log `ts_path` (with its config, manifest facts, sha256 and previews) to the training run it came
    from (or a new run), register it as a new version with its tags, then settle `champion`.

    `name` None: `default_name` (never a model of another corpus); a `name` given is refused when it
    holds another corpus. Returns {"name", "version", "champion" (bool: this version is the champion),
    "champion_version", "run_id", "sha256"}.
    """

    from msprior.export.metadata import read_metadata
    from msprior.storage import sha256_file
    from msprior.tracking import active

    meta = read_metadata(ts_path)
    c = registry_client(tracking_uri or meta.get("tracking_uri"))
    digest = sha256_file(ts_path)
    tags = version_tags(meta, digest, extra_tags)
    name = name or default_name(c, meta.get("run_name") or "prior", tags)
    bind_corpus(c, name, tags)  # before anything is logged: a wrong corpus is refused cheaply
    run_id = _log_run(c, meta)
    with active(c.tracking_uri):  # the registry store finds the logged model through the fluent globals
        mv = _log_version(c, name, run_id, ts_path, meta, previews, digest, tags)
    version = str(mv.version)
    champion = settle_champion(c, name, echo)
    split = comparable(c, name)[1]
    if echo and tags["val_split"] and split and tags["val_split"] != split:
        echo(f"[register] {name} v{version} was validated on another split ({tags['val_split']}) than the model's "
             f"versions ({split}): registered, but its val_loss is not compared for champion; register it under "
             "another --name to compare it with its own kind")
    return {"name": name, "version": version, "champion": champion == version, "champion_version": champion,
            "run_id": run_id, "sha256": digest, "comparable": not (tags["val_split"] and split and tags["val_split"] != split)}


def _log_version(c, name: str, run_id: str, ts_path: str, meta: Dict[str, Any], previews: Iterable[str],
                 digest: str, tags: Dict[str, str]):
    """The export's files and pyfunc model logged to `run_id`, then one new version of `name`."""
    import mlflow

    with mlflow.start_run(run_id=run_id):
        safe = {k: redact_uri(v) for k, v in meta.items() if k != "config"}
        mlflow.log_dict(safe, "export/export.json")
        mlflow.log_dict(meta.get("config") or {}, "export/config.json")
        mlflow.log_artifact(ts_path, "export")
        for wav in previews:
            mlflow.log_artifact(wav, "previews")
        mlflow.set_tags({"msprior.export.sha256": digest, "msprior.export.file": os.path.basename(ts_path)})
        info = mlflow.pyfunc.log_model(
            name="nn_tilde",
            python_model=os.path.join(os.path.dirname(os.path.abspath(__file__)), "export", "pyfunc.py"),
            artifacts={TS_ARTIFACT: os.path.abspath(ts_path)},
            pip_requirements=[f"torch>={tags['torch_version']}"],
        )
    # the version and its tags in one call: no window where a version exists without its sha256
    return c.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id)


def _log_run(c, meta: Dict[str, Any]) -> str:
    """The training run of the export when it is in this store, else a new run `export-<name>`."""
    from msprior.tracking import experiment_id

    run_id = meta.get("mlflow_run_id")
    if run_id:
        try:
            c.get_run(run_id)
            return run_id
        except Exception:  # the training run lives in another store: log to a new run here
            pass
    exp = experiment_id(c, meta.get("run_name") or "msprior-export")
    return c.create_run(exp, run_name=f"export-{meta.get('run_name')}", tags={"msprior.export": "true"}).info.run_id


def all_versions(c, name: str) -> List[Any]:
    """Every version of `name`, tags included (all pages)."""
    out: List[Any] = []
    token = None
    while True:
        page = c.search_model_versions(f"name='{name}'", page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def comparable(c, name: str) -> Tuple[List[Tuple[float, int]], str]:
    """(val_loss, version) of the versions that compete for champion, and their validation split.

    Like with like: a version competes when it has its sha256 and a finite val_loss (the mean
    validation CE over all the corpus's quantizers), its corpus is the model's, and it was validated
    on the same split as the model's first version that records one (versions registered before
    splits were recorded compete with any)."""
    rm = c.get_registered_model(name)
    corpus = (rm.tags or {}).get(BOUND_CORPUS)
    found = []
    for v in all_versions(c, name):
        t = v.tags or {}
        loss = _float(t.get("val_loss"))
        if t.get("sha256") and loss is not None and (corpus is None or t.get("corpus") == corpus):
            found.append((loss, int(v.version), t.get("val_split") or ""))
    split = min(((n, s) for _, n, s in found if s), default=(0, ""))[1]
    return [(loss, n) for loss, n, s in found if s in ("", split)], split


def best_version(c, name: str) -> Optional[str]:
    """The comparable version (`comparable`) of lowest val_loss (ties: the lower number), or None."""
    ranked, _ = comparable(c, name)
    return str(min(ranked)[1]) if ranked else None


def _alias(c, name: str, alias: str = CHAMPION) -> Optional[str]:
    rm = c.get_registered_model(name)
    v = (rm.aliases or {}).get(alias)
    return str(v) if v is not None else None


def settle_champion(c, name: str, echo: Optional[Callable[[str], Any]] = None, max_rounds: int = 50) -> Optional[str]:
    """Set `champion` to the best eligible version, re-reading after each write until alias and
    versions agree (a concurrent registration may have written in between). Returns the champion."""
    for _ in range(max_rounds):
        best = best_version(c, name)
        current = _alias(c, name)
        if best is None or best == current:
            return current
        _fault_stall(echo)
        if echo:
            echo(f"[register] {name}: champion -> version {best}")
        c.set_registered_model_alias(name, CHAMPION, best)
    raise RegistryError(f"{name}: champion did not settle after {max_rounds} rounds (registrations racing?); "
                        "re-run the registration")


def _fault_stall(echo: Optional[Callable[[str], Any]]) -> None:
    flag = os.environ.get(STALL_ENV)
    if flag and not os.path.exists(flag):
        if echo:
            echo(f"[fault] stalled before the alias write until {flag} exists")
        while not os.path.exists(flag):
            time.sleep(0.1)


def parse_ref(ref: str) -> Tuple[str, Optional[str], Optional[str]]:
    """`NAME@alias` | `NAME/version` | `NAME` -> (name, alias, version)."""
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        return name, alias, None
    m = re.fullmatch(r"(.+)/(\d+)", ref)
    if m:
        return m.group(1), None, m.group(2)
    return ref, None, None


def _describe(c, name: str) -> str:
    rm = c.get_registered_model(name)
    numbers = sorted(int(v.version) for v in all_versions(c, name))
    aliases = ", ".join(f"{a} (v{v})" for a, v in sorted((rm.aliases or {}).items())) or "none"
    return f"aliases: {aliases}; versions: {', '.join(map(str, numbers)) or 'none'}"


def resolve(c, ref: str):
    """The ModelVersion that `ref` names, or a RegistryError listing what exists."""
    name, alias, version = parse_ref(ref)
    try:
        c.get_registered_model(name)
    except Exception:
        names = sorted(m.name for m in c.search_registered_models())
        raise RegistryError(f"no registered model {name!r}; registered models: {', '.join(names) or 'none'}") from None
    try:
        if alias:
            return c.get_model_version_by_alias(name, alias)
        if version:
            return c.get_model_version(name, version)
    except Exception:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise RegistryError(f"model {name!r} has no {what}; {_describe(c, name)}") from None
    try:  # bare name: the champion, else the latest version
        return c.get_model_version_by_alias(name, CHAMPION)
    except Exception:
        found = sorted(all_versions(c, name), key=lambda v: int(v.version))
        if not found:
            raise RegistryError(f"model {name!r} has no versions") from None
        return found[-1]


@dataclass
class PullRequest:
    """`msprior pull`: one registered nn~ model to a local file."""

    ref: str = flag(help="NAME, NAME@alias (e.g. msprior-x@champion) or NAME/version.", argument=True)
    out: str = flag("model.ts", "Where to write the .ts file.")
    tracking_uri: Optional[str] = flag(None, "MLflow tracking URI (default MLFLOW_TRACKING_URI or ./mlflow.db).")


def pull(ref: str, out: str, tracking_uri: Optional[str] = None) -> str:
    """Download the `.ts` of `ref` (`NAME[@alias|/version]`) to `out`, verified against its sha256."""
    import mlflow

    from msprior.storage import sha256_file
    from msprior.tracking import active

    c = registry_client(tracking_uri)
    mv = resolve(c, ref)
    if not (mv.tags or {}).get("sha256"):  # a registration interrupted before its tags: unverifiable
        raise RegistryError(f"{mv.name} v{mv.version} has no sha256 tag, so its download cannot be verified; "
                            f"pull another version ({_describe(c, mv.name)})")
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out)) as tmp:
        with active(c.tracking_uri):  # `models:/` resolves through the fluent globals
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=tmp)
        found: List[str] = []
        for root, _, files in os.walk(os.path.join(local, "artifacts")):
            found += [os.path.join(root, f) for f in files if f.endswith(".ts")]
        if len(found) != 1:
            raise RegistryError(f"{mv.name} v{mv.version}: expected one .ts artifact, found {len(found)}")
        digest = sha256_file(found[0])
        expected = (mv.tags or {}).get("sha256")
        if digest != expected:
            raise RegistryError(f"{mv.name} v{mv.version}: downloaded file sha256 {digest[:12]}... does not match "
                                f"the registered {expected[:12]}...; the artifact store is corrupted")
        staged = os.path.join(tmp, ".pulled.ts")
        shutil.copyfile(found[0], staged)
        os.replace(staged, out)
    return out
