"""MLflow model registry for nn~ exports: register a version, move `champion`, pull the exact bytes.

A version is a pyfunc "models from code" model (msprior/export/pyfunc.py) carrying the `.ts` as
its artifact "ts": no pickled Python objects, and the file nn~ loads comes back byte for byte.
Version tags: sha256 (of the .ts), rave_sha256, config, continuous, val_loss, quantize,
torch_version, run. The alias `champion` moves to a new version only when its validation
cross-entropy is lower than the current champion's (aliases replace the deprecated stages).
"""

from __future__ import annotations

from msprior.errors import UserError
import os
import re
import shutil
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Tuple

CHAMPION = "champion"
TS_ARTIFACT = "ts"


class RegistryError(UserError):
    """A missing model / alias / version or a corrupted download; one line for the user."""


def _client(tracking_uri: Optional[str]):
    import mlflow
    from msprior.train.tracking import client, default_tracking_uri

    uri = default_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return client(uri)


def model_name(run_name: str) -> str:
    """`msprior-<run name>`, restricted to characters every MLflow store accepts."""
    return "msprior-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-")


def _float(v: Any) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def register_export(ts_path: str, name: Optional[str] = None, tracking_uri: Optional[str] = None,
                    previews: Iterable[str] = (), extra_tags: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Log `ts_path` (with its config, manifest facts, sha256 and previews) to the training run it came
    from (or a new run), register it as a new version, move `champion` if it is better.

    Returns {"name", "version", "champion" (bool: the alias moved here), "run_id", "sha256"}.
    """
    import mlflow

    from msprior.export.run import read_metadata, sha256_file
    from msprior.train.tracking import experiment_id

    meta = read_metadata(ts_path)
    c = _client(tracking_uri or meta.get("tracking_uri"))
    name = name or model_name(meta.get("run_name") or "prior")
    digest = sha256_file(ts_path)
    val_loss = _float(meta.get("best_val_loss") if meta.get("checkpoint") == "best" else meta.get("val_loss"))
    if val_loss is None:
        val_loss = _float(meta.get("val_loss"))
    tags = {
        "sha256": digest,
        "rave_sha256": str(meta.get("rave_sha256")),
        "config": str(meta.get("config_name")),
        "continuous": str(bool(meta.get("continuous"))).lower(),
        "val_loss": "" if val_loss is None else repr(val_loss),
        "quantize": str(meta.get("quantize", "none")),
        "torch_version": str(meta.get("torch_version")),
        "run": str(meta.get("run_name")),
        "checkpoint": str(meta.get("checkpoint")),
        **(extra_tags or {}),
    }
    run_id = meta.get("mlflow_run_id")
    if run_id:
        try:
            c.get_run(run_id)
        except Exception:  # the training run lives in another store: log to a new run here
            run_id = None
    if not run_id:
        exp = experiment_id(c, meta.get("run_name") or "msprior-export")
        run_id = c.create_run(exp, run_name=f"export-{meta.get('run_name')}", tags={"msprior.export": "true"}).info.run_id

    here = os.path.dirname(os.path.abspath(__file__))
    with mlflow.start_run(run_id=run_id):
        mlflow.log_dict({k: v for k, v in meta.items() if k != "config"}, "export/export.json")
        mlflow.log_dict(meta.get("config") or {}, "export/config.json")
        mlflow.log_artifact(ts_path, "export")
        for wav in previews:
            mlflow.log_artifact(wav, "previews")
        mlflow.set_tags({"msprior.export.sha256": digest, "msprior.export.file": os.path.basename(ts_path)})
        info = mlflow.pyfunc.log_model(
            name="nn_tilde",
            python_model=os.path.join(here, "export", "pyfunc.py"),
            artifacts={TS_ARTIFACT: os.path.abspath(ts_path)},
            pip_requirements=[f"torch>={tags['torch_version']}"],
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)
    moved = _maybe_promote(c, name, version, val_loss)
    return {"name": name, "version": version, "champion": moved, "run_id": run_id, "sha256": digest}


def _maybe_promote(c, name: str, version: str, val_loss: Optional[float]) -> bool:
    """Move `champion` to `version` when it is the first, or strictly better than the current one."""
    try:
        current = c.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # no champion yet
        current = None
    if current is not None:
        best = _float(current.tags.get("val_loss"))
        if val_loss is None or (best is not None and not val_loss < best):
            return False
    c.set_registered_model_alias(name, CHAMPION, version)
    return True


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
    versions = sorted(int(v.version) for v in c.search_model_versions(f"name='{name}'"))
    aliases = ", ".join(f"{a} (v{v})" for a, v in sorted((rm.aliases or {}).items())) or "none"
    return f"aliases: {aliases}; versions: {', '.join(map(str, versions)) or 'none'}"


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
        versions = sorted(c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
        if not versions:
            raise RegistryError(f"model {name!r} has no versions") from None
        return versions[-1]


def pull(ref: str, out: str, tracking_uri: Optional[str] = None) -> str:
    """Download the `.ts` of `ref` (`NAME[@alias|/version]`) to `out`, verified against its sha256."""
    import mlflow

    from msprior.export.run import sha256_file

    c = _client(tracking_uri)
    mv = resolve(c, ref)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out)) as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=tmp)
        found: List[str] = []
        for root, _, files in os.walk(os.path.join(local, "artifacts")):
            found += [os.path.join(root, f) for f in files if f.endswith(".ts")]
        if len(found) != 1:
            raise RegistryError(f"{mv.name} v{mv.version}: expected one .ts artifact, found {len(found)}")
        digest = sha256_file(found[0])
        expected = mv.tags.get("sha256")
        if expected and digest != expected:
            raise RegistryError(f"{mv.name} v{mv.version}: downloaded file sha256 {digest[:12]}... does not match "
                                f"the registered {expected[:12]}...; the artifact store is corrupted")
        staged = os.path.join(tmp, ".pulled.ts")
        shutil.copyfile(found[0], staged)
        os.replace(staged, out)
    return out
