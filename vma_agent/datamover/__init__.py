"""Data mover: copies disk extents from a source NBD export to a target NBD export."""
from vma_agent.datamover.copier import (
    CopyCancelled,
    CopyError,
    CopyProgress,
    CopyResult,
    RetryPolicy,
    copy_disk,
    default_connections,
    extents_total,
    normalize_extents,
    plan_full_copy,
    plan_full_copy_from_block_status,
    plan_incremental_copy,
)

__all__ = [
    "CopyCancelled",
    "CopyError",
    "CopyProgress",
    "CopyResult",
    "RetryPolicy",
    "copy_disk",
    "default_connections",
    "extents_total",
    "normalize_extents",
    "plan_full_copy",
    "plan_full_copy_from_block_status",
    "plan_incremental_copy",
]
