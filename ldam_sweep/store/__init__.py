"""The store: Zarr arrays for tensors, a Parquet manifest as the commit log, and the query API.

The store stands below the sampler: it imports no torch. Its plan (shapes, arrays, identity)
comes from ``ldam_sweep.planning``.
"""

from ldam_sweep.errors import StoreError
from ldam_sweep.planning import LayerPlan, StorePlan
from ldam_sweep.store.layout import create_store
from ldam_sweep.store.query import SweepStore, open_store
from ldam_sweep.store.verify import repair_store, verify_store
from ldam_sweep.store.writer import BlockWriter, commit, failed_rows, write_block

__all__ = [
    "BlockWriter", "LayerPlan", "StoreError", "StorePlan", "SweepStore", "commit", "create_store",
    "failed_rows", "open_store", "repair_store", "verify_store", "write_block",
]
