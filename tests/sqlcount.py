"""Counting the SQL statements an engine runs: the cost of a call as fixed work, not time."""

from __future__ import annotations

import sqlalchemy as sa


class Statements:
    """The SQL statements an engine runs inside the ``with`` block (``seen``, in order)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.seen: list[str] = []

    def _count(self, *args: object) -> None:
        self.seen.append(str(args[2]))

    def __enter__(self) -> Statements:
        sa.event.listen(self.engine, "before_cursor_execute", self._count)
        return self

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._count)
