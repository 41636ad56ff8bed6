"""Documented data-access usage that ``mypy --strict`` checks (run by the ``type`` tox env)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from hardening import (
    DataLoader,
    FakeClock,
    InsertReport,
    InvalidCursor,
    Page,
    RejectedRow,
    ReplicaRouter,
    RoutedSession,
    RowRejected,
    async_routed_sessionmaker,
    insert_batches,
    insert_batches_async,
    load_by_ids,
    paginate,
    paginate_async,
    routed_sessionmaker,
    routed_sessionmaker_from_env,
    sql_loader,
)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    rank: Mapped[int | None]


# --- replica routing ---------------------------------------------------------------------
primary = sa.create_engine("sqlite://")
replica = sa.create_engine("sqlite://")
factory: sessionmaker[RoutedSession] = routed_sessionmaker(
    primary, [replica], sticky_for=2.5, clock=FakeClock(), expire_on_commit=False
)
with factory(sticky_key="user-1") as routed:
    router: ReplicaRouter = routed.router
    healthy: list[sa.Engine] = router.healthy_replicas()
    until: float = router.stick("user-2")
from_env: sessionmaker[RoutedSession] = routed_sessionmaker_from_env({"DATABASE_URL": "sqlite://"})
async_factory: async_sessionmaker[AsyncSession] = async_routed_sessionmaker(
    create_async_engine("postgresql+psycopg://localhost/db"), sticky_for=1
)

# --- pagination --------------------------------------------------------------------------
SECRET = "0123456789abcdef0123456789abcdef"
with Session(primary) as session:
    page: Page[Item] = paginate(
        session,
        sa.select(Item).where(Item.name != ""),
        order_by=[Item.rank.desc().nulls_last(), Item.name],
        limit=20,
        secret=SECRET,
    )
    first: list[Item] = page.items
    cursor: str | None = page.next_cursor
    rows = paginate(session, sa.select(Item.id, Item.name), order_by=[Item.name], secret=SECRET)
    try:
        paginate(session, sa.select(Item), order_by=[Item.id], after="x", secret=SECRET)
    except InvalidCursor as invalid:
        reason: str = invalid.reason


async def async_page(session: AsyncSession) -> bool:
    found = await paginate_async(session, sa.select(Item), order_by=[Item.id], secret=SECRET)
    return found.has_next


# --- batched inserts -----------------------------------------------------------------------
report: InsertReport = insert_batches(
    primary,
    Item,
    ({"id": i, "name": str(i)} for i in range(10)),
    batch_size=500,
    upsert="ignore",
    on_progress=lambda done, total: print(done, total),
)
rejected: tuple[RejectedRow, ...] = report.rejected
seconds: float = report.seconds
try:
    insert_batches(primary, Item.__table__, [], stop_on_error=True, transaction="single")
except RowRejected as stopped:
    where: int = stopped.index


async def upload(session: AsyncSession) -> int:
    done = await insert_batches_async(session, Item, [{"name": "a"}], upsert=["name"])
    return done.inserted


# --- batch loading -------------------------------------------------------------------------


async def names_by_id(ids: list[int]) -> dict[int, str]:
    return {i: str(i) for i in ids}


names: DataLoader[int, str] = DataLoader(names_by_id, max_batch_size=100)
optional_names: DataLoader[int, str | None] = DataLoader(names_by_id, default=None)


async def resolve(session: AsyncSession) -> list[str]:
    one: str = await names.load(1)
    maybe: str | None = await optional_names.load(2)
    items = DataLoader(sql_loader(session, Item))
    item: Item = await items.load(3)
    return [one, maybe or "", item.name, *await names.load_many([4, 5])]


with Session(primary) as session:
    loaded: list[Item | None] = load_by_ids(session, Item, [1, 2])
