"""Data access on SQLAlchemy 2: replica routing, keyset pagination, batched writes, batch loading.

``routing.py`` (``routed_sessionmaker``) sends reads to a healthy replica and everything else to
the primary; ``pagination.py`` (``paginate``) walks a query by signed keyset cursors, whose
encoding and signature live in the pure ``_cursor.py``; ``batch.py`` (``insert_batches``) writes
many rows in batches (``COPY`` on PostgreSQL) and isolates the bad ones; ``loader.py``
(``DataLoader``) coalesces loads made in one event-loop tick into one query. Every module but
``loader.py`` and ``_cursor.py`` needs the ``sqlalchemy`` extra; all are imported only when used.
"""
