"""Audio corpus -> latent table (Parquet + manifest), and readers for that table.

    from msprior.data import preprocess, load_manifest, read_table, list_shards
"""

from msprior.data.preprocess import PreprocessError, PreprocessRequest, preprocess
from msprior.data.table import (list_shards, load_centroids, load_manifest, load_report, rave_array,
                                read_index, read_table)

__all__ = ["preprocess", "PreprocessRequest", "PreprocessError", "read_index", "load_manifest", "load_report", "load_centroids",
           "list_shards", "read_table", "rave_array"]
