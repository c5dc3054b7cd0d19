"""The export's metadata: a JSON file stored inside the `.ts` (torch.jit `_extra_files`).

Its one owner: export writes it (`msprior.export.run.save_scripted`), the registry and publish read
it. A leaf module (json and torch only), so that the registry reads it without depending on export.
"""

from __future__ import annotations

import json
from typing import Any, Dict

METADATA_FILE = "msprior.json"


def read_metadata(path: str) -> Dict[str, Any]:
    """The export's metadata without running anything (torch.jit.load reads the extra file)."""
    import torch

    files = {METADATA_FILE: ""}
    torch.jit.load(path, map_location="cpu", _extra_files=files)
    return json.loads(files[METADATA_FILE]) if files[METADATA_FILE] else {}
