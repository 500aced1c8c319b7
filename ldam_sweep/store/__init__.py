"""The store: Zarr arrays for tensors, a Parquet manifest as the commit log, and the query API.

The store stands below the sampler: it imports no torch, and nothing above it (find, atlas,
sampling, model, cluster). Its schema (plan, arrays, manifest columns, row builders) is ``schema``.
"""

from ldam_sweep.errors import StoreError
from ldam_sweep.store.schema import LayerPlan, StorePlan, failed_rows
from ldam_sweep.store.layout import create_store
from ldam_sweep.store.query import SweepStore, open_store
from ldam_sweep.store.verify import repair_store, verify_store
from ldam_sweep.store.writer import BlockWriter, commit, write_block

__all__ = [
    "BlockWriter", "LayerPlan", "StoreError", "StorePlan", "SweepStore", "commit", "create_store",
    "failed_rows", "open_store", "repair_store", "verify_store", "write_block",
]
