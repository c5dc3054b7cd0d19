"""Conditioning: what a prior is conditioned on, owned by one type (`ConditioningSpec`).

A latent table preprocessed with `--condition_ratio r` (r > 0) stores, per conditioning frame (r
RAVE frames), F features (`names`, in column order; `mean` / `std` over the whole table normalise
them) and one k-means token of `vocab_size` classes (the nearest centroid, distances in units of
`scale`): its spec's kind is `TABLE` ("tokens+features"). A prior reads one of the two, or none
(config `model.conditioning`): `table_spec.use(kind, where)` is the run's spec. Preprocess writes
the table's spec into `intent.json` and `manifest.json` (`to_manifest()`), training and export read
it back (`from_manifest()`, which also reads manifests written before this type existed), a resume
and an export compare specs (`check_compatible`), and the nn~ inlets come from `channels` / `labels`.
Plain data only: no storage, no torch (the model is given `dims()`, plain numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Tuple

from msprior.errors import UserError

NONE, TOKENS, FEATURES = "none", "tokens", "features"
TABLE = "tokens+features"  # what a conditioned table stores: both columns
KINDS = (NONE, TOKENS, FEATURES)  # what a prior may read (config model.conditioning)
COMPARED = ("kind", "ratio", "names", "vocab_size", "scale", "centroids_sha256")  # what makes two specs one


class ConditioningError(UserError):
    """Two conditioning specs that do not match, or a kind the table does not hold: one line."""


@dataclass(frozen=True)
class ConditioningSpec:
    """The conditioning of a table (kind `TABLE` or `NONE`) or of a prior (`NONE`, `TOKENS`, `FEATURES`)."""

    kind: str = NONE
    ratio: int = 0  # RAVE (decoder) frames per conditioning frame; 0: no conditioning
    names: Tuple[str, ...] = ()  # feature names, in the order of the `features` column (F = len)
    mean: Tuple[float, ...] = ()  # per-feature mean over the table (normalisation)
    std: Tuple[float, ...] = ()  # per-feature population std + 1e-6
    vocab_size: int = 0  # k-means token classes
    scale: Tuple[float, ...] = ()  # F floats: token distances are measured in these units
    centroids: Optional[str] = None  # the centroids' file in the table (centroids.npy)
    centroids_sha256: Optional[str] = None  # None in manifests written before it was kept there

    # --- reading and writing the manifest's "conditioning" section ----------------------------

    @classmethod
    def from_manifest(cls, manifest: Optional[Dict]) -> "ConditioningSpec":
        """The spec of a manifest or an intent (their "conditioning" section; an export's metadata
        keeps the prior's under "conditioning_spec": `from_dict(meta["conditioning_spec"])`)."""
        return cls.from_dict((manifest or {}).get("conditioning"))

    @classmethod
    def from_dict(cls, cond: Optional[Dict]) -> "ConditioningSpec":
        """The "conditioning" section itself; a section without "kind" (manifests before this
        type) is a table's: both columns when it has a ratio."""
        if cond is not None and not isinstance(cond, dict):
            raise ConditioningError(f"conditioning section {cond!r:.60}: expected an object (or null)")
        if not cond or not int(cond.get("ratio") or 0):
            return cls()
        feats, toks = cond.get("features") or {}, cond.get("tokens") or {}
        names = tuple(str(n) for n in feats.get("names") or ())
        if not names and feats.get("size"):  # a section with a size alone: anonymous features
            names = tuple(f"feature_{i}" for i in range(int(feats["size"])))
        return cls(kind=str(cond.get("kind") or TABLE), ratio=int(cond["ratio"]), names=names,
                   mean=_floats(feats.get("mean")), std=_floats(feats.get("std")),
                   vocab_size=int(toks.get("vocab_size") or 0), scale=_floats(toks.get("scale")),
                   centroids=toks.get("centroids"), centroids_sha256=toks.get("sha256"))

    def to_manifest(self) -> Optional[Dict[str, Any]]:
        """The manifest's "conditioning" section (None without conditioning); the same keys as
        every earlier manifest, plus "kind"."""
        if self.kind == NONE:
            return None
        out: Dict[str, Any] = {"kind": self.kind, "ratio": self.ratio}
        if self.names:
            out["features"] = {"names": list(self.names), "size": len(self.names), "mean": list(self.mean),
                               "std": list(self.std)}
        if self.vocab_size:
            out["tokens"] = {"vocab_size": self.vocab_size, "centroids": self.centroids,
                             "sha256": self.centroids_sha256, "scale": list(self.scale)}
        return out

    # --- what a prior reads ------------------------------------------------------------------

    def has(self, kind: str) -> bool:
        """Whether this spec holds what a prior of `kind` reads."""
        return kind == NONE or self.kind in (kind, TABLE)

    def use(self, kind: str, where: str) -> "ConditioningSpec":
        """The spec a prior of `kind` reads from this (table's) spec; one line when it is not here.
        Tokens keep the feature names: they are k-means classes in that feature space."""
        if kind not in KINDS:
            raise ConditioningError(f"{where}: conditioning kind {kind!r} is not one of {', '.join(KINDS)}")
        if kind == NONE:
            return ConditioningSpec()
        if not self.has(kind):
            has = "none" if self.kind == NONE else self.kind
            raise ConditioningError(f"{where}: the prior reads conditioning {kind} but the table has {has}; "
                                    "preprocess it with --condition_ratio")
        if kind == FEATURES:
            return replace(self, kind=kind, vocab_size=0, scale=(), centroids=None, centroids_sha256=None)
        return replace(self, kind=kind, mean=(), std=())

    @property
    def num_features(self) -> int:
        """F: features per conditioning frame (0 without)."""
        return len(self.names)

    @property
    def column(self) -> Optional[str]:
        """The table column a prior of this spec reads ("tokens" or "features"); None without."""
        return self.kind if self.kind in (TOKENS, FEATURES) else None

    @property
    def step(self) -> int:
        """Decoder frames per conditioning frame as the read path steps: windows start on its
        multiples so that frame t sees conditioning frames 0 .. t // r (1 without conditioning)."""
        return self.ratio if self.column else 1

    @property
    def per_frame(self) -> int:
        """Values per conditioning frame in the column: F features, or 1 token."""
        return self.num_features if self.kind == FEATURES else 1

    def frames(self, lengths):
        """Conditioning frames of chunks of `lengths` decoder frames: ceil(T / r) (int or array)."""
        return -(-lengths // self.step)

    @property
    def channels(self) -> int:
        """Conditioning inputs of an export (nn~ inlets after the Q latents): 0, 1 token or F features."""
        return {NONE: 0, TOKENS: 1, FEATURES: self.num_features}.get(self.kind, 0)

    def labels(self) -> Tuple[str, ...]:
        """nn~ inlet labels of the conditioning channels, in order."""
        if self.kind == TOKENS:
            return ("(signal) conditioning token",)
        return tuple(f"(signal) conditioning feature {i + 1} ({n})" for i, n in enumerate(self.names)) \
            if self.kind == FEATURES else ()

    def dims(self) -> Dict[str, Any]:
        """Plain numbers for `msprior.model.DatasetFacts` (the model knows no manifest)."""
        return dict(cond_ratio=self.ratio, cond_vocab=self.vocab_size, cond_features=self.num_features,
                    feature_mean=list(self.mean), feature_std=list(self.std))

    # --- comparing --------------------------------------------------------------------------

    def check_compatible(self, other: "ConditioningSpec", what: str, fix: str = "") -> None:
        """Raise ConditioningError (one line) naming the first field of `COMPARED` where `other`
        differs from this spec. `what` says who compares (this spec first); `fix` what to do.
        A centroid digest missing on one side (older manifests) is not compared."""
        for name in COMPARED:
            a, b = getattr(self, name), getattr(other, name)
            if name == "centroids_sha256" and (a is None or b is None):
                continue
            if a != b:
                raise ConditioningError(f"{what}: conditioning {name} differs ({_show(a)} vs {_show(b)})"
                                        + (f"; {fix}" if fix else ""))


def _floats(values) -> Tuple[float, ...]:
    return tuple(float(v) for v in values or ())


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        text = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        return f"[{text[:120]}{'...' if len(text) > 120 else ''}]"
    return str(value)
