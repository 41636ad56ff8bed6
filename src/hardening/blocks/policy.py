"""When a document's history stores a full snapshot, and what compaction may drop. Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hardening.errors import ConfigurationError

__all__ = ["SnapshotPolicy", "compaction_floor"]


@dataclass(frozen=True)
class SnapshotPolicy:
    """Decides when a full snapshot is due, so rebuilding any version stays cheap.

    Loading version *v* reads the nearest snapshot at or below *v* and replays the patches
    after it. A snapshot is due when any enabled rule fires (``None`` disables a rule):

    Args:
        every: at most this many patches between two snapshots (the seed's "every N saves").
        max_patch_bytes: the patches since the last snapshot add up to this many bytes.
        replay_ratio: the patches since the last snapshot weigh this many times the last
            snapshot: replaying them would read more than loading a fresh snapshot. ``1.0``
            keeps replay under one snapshot's worth of bytes.

    Raises:
        ConfigurationError: a rule that is not a positive number.
    """

    every: int | None = 10
    max_patch_bytes: int | None = None
    replay_ratio: float | None = 1.0

    def __post_init__(self) -> None:
        for name in ("every", "max_patch_bytes"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ConfigurationError(f"SnapshotPolicy.{name} must be a positive int or None")
        ratio = self.replay_ratio
        if ratio is not None and (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float))
            or not math.isfinite(ratio)
            or ratio <= 0
        ):
            raise ConfigurationError(
                "SnapshotPolicy.replay_ratio must be a positive number or None"
            )

    def due(self, *, patches: int, patch_bytes: int, snapshot_bytes: int) -> bool:
        """Whether the version being saved should also be stored as a snapshot.

        Args:
            patches: patches since the last snapshot, counting the one being saved.
            patch_bytes: their total size in bytes.
            snapshot_bytes: the size of the last snapshot (what loading one costs).

        Returns:
            ``True`` when a snapshot is due.
        """
        if self.every is not None and patches >= self.every:
            return True
        if self.max_patch_bytes is not None and patch_bytes >= self.max_patch_bytes:
            return True
        return self.replay_ratio is not None and patch_bytes >= self.replay_ratio * snapshot_bytes


def compaction_floor(*, head: int, oldest: int, keep: int) -> int:
    """The oldest version to keep rebuildable when keeping the ``keep`` latest versions.

    Args:
        head: the current version.
        oldest: the oldest version rebuildable now.
        keep: how many versions, counting head, must stay rebuildable (at least 1).

    Returns:
        The floor: every version from it to ``head`` stays rebuildable, none below.

    Raises:
        ConfigurationError: ``keep`` is not a positive int.
    """
    if type(keep) is not int or keep < 1:
        raise ConfigurationError(f"keep must be a positive int, not {keep!r}")
    return max(oldest, head - keep + 1)
