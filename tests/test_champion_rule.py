"""The champion compares like with like: the same corpus and the same validation split."""

from __future__ import annotations

import pytest
import torch

from export_runs import make_run
from msprior.export.run import export_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _export(root, tag: str, val_loss: float, **data) -> str:
    """An export of a tiny run whose checkpoint config has these `data.*` values (its split)."""
    run = make_run(str(root / tag), "decoder_only", steps=3, val_loss=val_loss, name="split")
    ckpt = root / tag / "split" / "checkpoints" / "best" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["config"]["data"].update(data)
    torch.save(state, ckpt)
    return export_run(run, str(root / f"{tag}.ts"))


def test_champion_ignores_a_val_loss_measured_on_another_split(tmp_path):
    """val_fraction 0 validates on the training files: its low val_loss must not take the alias."""
    from msprior import registry

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lines = []
    v1 = registry.register_export(_export(tmp_path, "a", 2.0), tracking_uri=uri)
    assert v1["champion"] and v1["comparable"]
    v2 = registry.register_export(_export(tmp_path, "b", 0.5, val_fraction=0.0), tracking_uri=uri, echo=lines.append)
    assert not v2["champion"] and not v2["comparable"] and v2["champion_version"] == "1"
    assert any("validated on another split (seed=0,val_fraction=0.0)" in line for line in lines), lines
    v3 = registry.register_export(_export(tmp_path, "c", 1.5), tracking_uri=uri)  # the first's split: compared
    assert v3["champion"] and v3["comparable"]
    c = registry.registry_client(uri)
    tags = c.get_model_version(v2["name"], v2["version"]).tags
    assert tags["val_split"] == "seed=0,val_fraction=0.0" and tags["val_loss"] == "0.5"
    assert str(c.get_model_version_by_alias(v1["name"], "champion").version) == "3"
