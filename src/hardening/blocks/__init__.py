"""Block documents: id-aware diffs, strict JSON Patch, rebase of concurrent edits, history.

``diff.py`` says which operations turn one document into another (blocks matched by id),
``patch.py`` applies and validates patches (atomic, bounded), ``rebase.py`` merges a patch
written against an old version into the current one, ``policy.py`` decides when a snapshot is
due; all four are pure. ``history.py`` (``DocumentHistory``, needs the ``sqlalchemy`` extra)
stores heads, patches and snapshots in SQL and is imported only when used.
"""

from hardening.blocks.diff import diff, diff_blocks
from hardening.blocks.patch import PatchLimits, apply_patch, validate_patch
from hardening.blocks.policy import SnapshotPolicy
from hardening.blocks.rebase import rebase

__all__ = [
    "PatchLimits",
    "SnapshotPolicy",
    "apply_patch",
    "diff",
    "diff_blocks",
    "rebase",
    "validate_patch",
]
