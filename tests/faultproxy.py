"""A fault-injecting loopback TCP proxy, for testing how code behaves when its network fails.

``FaultProxy(host, port)`` listens on ``127.0.0.1`` on a free ephemeral port and forwards every
connection it accepts to ``host:port``, in both directions. Point a client at the proxy instead of
the real service, then break the network under it::

    with FaultProxy("127.0.0.1", 6379) as proxy:
        client = redis.Redis(host=proxy.host, port=proxy.port, socket_timeout=0.5)
        client.ping()
        proxy.latency(0.2)  # every chunk, either direction, arrives 0.2 s late
        proxy.cut()  # open connections are reset, new connects are refused
        proxy.restore()  # normal forwarding again, on the same port
        proxy.blackhole()  # connections are accepted, nothing is ever answered
        proxy.blip(0.5).wait(5)  # a 0.5 s outage that ends by itself

The proxy runs an asyncio event loop in a daemon thread of its own. Every public method is
thread-safe and blocks only until the proxy's thread has applied the change (a few milliseconds),
so it can be called from synchronous tests, from worker threads and from async tests alike: it
never touches the caller's event loop.

Semantics worth knowing:

* ``cut()`` resets (RST, via ``SO_LINGER`` 0) the client side of every open connection and closes
  the listening socket, so new connects get ``ECONNREFUSED``. The upstream side of each connection
  is closed normally. ``restore()`` (or ``blackhole()``) binds the same port again.
* ``blackhole()`` keeps the listener open: new connections are accepted (the TCP handshake
  succeeds) but never connected upstream, and on every connection, old and new, bytes in both
  directions are read and discarded. Bytes already delayed by ``latency()`` are dropped too.
* ``restore()`` resets every connection that was blackholed (it can never be made consistent
  again: bytes were swallowed), so clients see a connection error on their next use of it and
  reconnect. Connections opened after ``restore()`` are forwarded normally; latency goes back to 0.
* A half-close is forwarded as a half-close (FIN); when one side resets, the other is reset too.
  When the target refuses (or does not answer within ``connect_timeout``), the client is reset.
* The port is ephemeral, so during a cut another socket could in theory take it; re-binding is
  retried for 2 s, then ``restore()`` raises ``OSError`` (never seen in practice on loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

__all__ = ["FaultProxy", "Mode", "wait_until"]

Mode = Literal["normal", "cut", "blackhole"]

_T = TypeVar("_T")

# l_onoff=1, l_linger=0: close() sends RST instead of FIN.
_LINGER_RST = struct.pack("ii", 1, 0)
# How long a public method waits for the proxy's thread to apply a change.
_CALL_TIMEOUT = 10.0
# How long re-binding the listening port is retried (EADDRINUSE) on restore.
_REBIND_TIMEOUT = 2.0


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value.

    Handy for the proxy's counters, which the proxy's own thread updates::

        assert wait_until(lambda: proxy.open_connections == 0)
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _reset(transport: asyncio.Transport | None) -> None:
    """Abort ``transport`` with an RST rather than a FIN."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


class _Side(asyncio.Protocol):
    """One end of a proxied connection: the accepted client socket or the upstream socket."""

    def __init__(self, proxy: FaultProxy, conn: _Connection | None = None) -> None:
        self.proxy = proxy
        self.conn = conn  # None for a client side until the proxy adopts it
        self.transport: asyncio.Transport | None = None
        self.eof = False  # the peer half-closed: nothing more will be read
        self.paused = False  # reading paused because the other side's write buffer is full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.conn is None:
            self.proxy._adopt(self)
        else:
            self.conn.upstream_made(self)

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.received(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.conn is not None:
            self.conn.received(self, None)
        return True  # keep the socket open: the other direction may still carry data

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.lost()

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.flow(self, pause=True)

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.flow(self, pause=False)


class _Pipe:
    """One direction of a connection: chunks (``None`` is EOF) queued until their due time."""

    def __init__(self, conn: _Connection, to_upstream: bool) -> None:
        self.conn = conn
        self.to_upstream = to_upstream
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.eof_sent = False

    def push(self, item: bytes | None) -> None:
        loop = self.conn.proxy._loop
        self.queue.append((loop.time() + self.conn.proxy._latency, item))
        self.flush()

    def flush(self) -> None:
        """Deliver every chunk that is due, in order; arm a timer for the next one."""
        if self.timer is not None:
            return  # the armed timer flushes
        dst = self.conn.upstream if self.to_upstream else self.conn.client
        if dst is None or dst.transport is None:
            return  # upstream still connecting: flushed once it is connected
        loop = self.conn.proxy._loop
        while self.queue and not self.conn.closed:
            due, item = self.queue[0]
            if due > loop.time():
                self.timer = loop.call_at(due, self._fire)
                return
            self.queue.popleft()
            if item is None:
                self.eof_sent = True
                if dst.transport.can_write_eof():
                    try:
                        dst.transport.write_eof()
                    except OSError:  # the peer is gone already (ENOTCONN): end the connection
                        self.conn.close()
                        return
                self.conn.eof_delivered()
            else:
                dst.transport.write(item)

    def _fire(self) -> None:
        self.timer = None
        self.flush()

    def clear(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()


class _Connection:
    """A proxied connection: the client side, the upstream side and a pipe each way."""

    def __init__(self, proxy: FaultProxy, client: _Side, *, blackholed: bool) -> None:
        self.proxy = proxy
        self.client = client
        client.conn = self
        self.upstream: _Side | None = None
        self.blackholed = blackholed
        self.closed = False
        self.to_upstream = _Pipe(self, to_upstream=True)
        self.to_client = _Pipe(self, to_upstream=False)
        self.connect_task: asyncio.Task[None] | None = None
        if not blackholed:
            self.connect_task = proxy._spawn(self._connect())

    async def _connect(self) -> None:
        proxy = self.proxy
        try:
            await asyncio.wait_for(
                proxy._loop.create_connection(
                    lambda: _Side(proxy, self), proxy.target_host, proxy.target_port
                ),
                proxy.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError):
            self.abort()  # the upstream is unreachable: reset the client

    def upstream_made(self, side: _Side) -> None:
        if self.closed:
            _reset(side.transport)
            return
        self.upstream = side
        if self.blackholed:
            return
        self.to_upstream.flush()

    def received(self, side: _Side, data: bytes | None) -> None:
        if self.closed or self.blackholed:
            return  # swallowed
        (self.to_upstream if side is self.client else self.to_client).push(data)

    def eof_delivered(self) -> None:
        if self.to_upstream.eof_sent and self.to_client.eof_sent:
            self.close()

    def flow(self, dst: _Side, *, pause: bool) -> None:
        """Pause reading the side feeding ``dst`` while ``dst``'s write buffer is full."""
        src = self.upstream if dst is self.client else self.client
        if src is None or src.transport is None or src.eof or self.closed:
            return
        if pause and not self.blackholed and not src.paused:
            src.paused = True
            src.transport.pause_reading()
        elif not pause and src.paused:
            src.paused = False
            src.transport.resume_reading()

    def blackhole(self) -> None:
        """Stop forwarding: drop what is queued, read and discard whatever arrives."""
        self.blackholed = True
        self.to_upstream.clear()
        self.to_client.clear()
        for side in (self.client, self.upstream):
            if side is not None and side.paused and side.transport is not None:
                side.paused = False
                if not side.eof:
                    side.transport.resume_reading()

    def lost(self) -> None:
        """One side is gone (reset, or a write failed): reset the other."""
        self.abort()

    def _detach(self) -> bool:
        if self.closed:
            return False
        self.closed = True
        self.proxy._conns.discard(self)
        self.to_upstream.clear()
        self.to_client.clear()
        task = self.connect_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        return True

    def abort(self) -> None:
        """Reset the client side (RST) and close the upstream side, dropping anything queued."""
        if self._detach():
            _reset(self.client.transport)
            if self.upstream is not None and self.upstream.transport is not None:
                self.upstream.transport.abort()

    def close(self) -> None:
        """Close both sides gracefully (both directions are at EOF)."""
        if self._detach():
            for side in (self.client, self.upstream):
                if side is not None and side.transport is not None:
                    side.transport.close()


class FaultProxy:
    """A loopback TCP proxy to ``target_host:target_port`` that injects network faults.

    Args:
        target_host: where connections are forwarded to.
        target_port: the target's port.
        port: the port to listen on (``0``, the default: a free ephemeral port).
        connect_timeout: how long connecting to the target may take before the client's
            connection is reset.

    See the module docstring for the exact semantics of each fault.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.connect_timeout = connect_timeout
        self.connections_accepted = 0
        """Connections accepted since the proxy started (including blackholed and reset ones)."""
        self.errors: list[dict[str, Any]] = []
        """Unexpected errors reported by the proxy's event loop (connection resets are not)."""
        self._mode: Mode = "normal"
        self._latency = 0.0
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: socket.socket | None = None
        self._accepting: set[asyncio.Task[None]] = set()  # accepted, not yet adopted
        self._blip_task: asyncio.Task[None] | None = None
        self._blip_event: threading.Event | None = None
        self._blip_error: BaseException | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._ready = threading.Event()
        self._thread_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop
        self._stop: asyncio.Event
        sock = self._bind(port)  # in the caller's thread: a bad port fails right here
        self.port: int = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name=f"FaultProxy-{self.port}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        error = self._failure()
        if error is not None:
            self._thread.join()
            self._closed = True
            raise RuntimeError("the FaultProxy thread failed to start") from error

    # --- addresses -------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return f"{self.host}:{self.port}"

    def redis_url(self, db: int = 0) -> str:
        """A ``redis://`` URL that connects through the proxy."""
        return f"redis://{self.host}:{self.port}/{db}"

    def postgres_url(self, base_url: str) -> str:
        """``base_url`` (a SQLAlchemy URL) with its host and port replaced by the proxy's."""
        from sqlalchemy.engine import make_url

        url = make_url(base_url).set(host=self.host, port=self.port)
        return url.render_as_string(hide_password=False)

    # --- state -----------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        """``"normal"``, ``"cut"`` or ``"blackhole"``."""
        return self._mode

    @property
    def open_connections(self) -> int:
        """Proxied connections open right now (their client side is connected to the proxy)."""
        return len(self._conns)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # --- faults ----------------------------------------------------------------------------

    def latency(self, seconds: float) -> None:
        """Delay every chunk read from now on, in either direction, by ``seconds``.

        A chunk read at time t is written at t + seconds; order is kept within each direction.
        ``latency(0)`` (or :meth:`restore`) turns it off for chunks read afterwards.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"latency must be a finite number >= 0, not {seconds!r}")

        async def apply() -> None:
            self._latency = float(seconds)

        self._call(apply)

    def cut(self) -> None:
        """A hard outage: reset every open connection and refuse new ones (``ECONNREFUSED``)."""
        self._call(self._cut)

    def blackhole(self) -> None:
        """Accept connections but never answer: nothing is forwarded, in either direction."""
        self._call(self._blackhole)

    def restore(self) -> None:
        """Forward normally again, with no latency; blackholed connections are reset."""
        self._call(self._restore)

    def blip(self, seconds: float) -> threading.Event:
        """Cut now, then restore after ``seconds`` in the proxy's thread; return at once.

        The outage is in effect when this returns. The returned event is set once the proxy has
        been restored (:meth:`wait_blip` waits for it too). A later :meth:`cut`,
        :meth:`blackhole`, :meth:`restore` or :meth:`blip` supersedes a pending blip: its
        restore is cancelled and its event set.
        """
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"blip must last a finite number of seconds >= 0, not {seconds!r}")
        event = threading.Event()

        async def start() -> None:
            await self._cut()
            self._blip_error = None
            self._blip_event = event
            self._blip_task = self._spawn(self._finish_blip(seconds, event))

        self._call(start)
        return event

    def wait_blip(self, timeout: float | None = None) -> bool:
        """Wait for the latest :meth:`blip` to end; False on timeout.

        Raises:
            OSError: restoring at the end of the blip failed (e.g. the port was taken).
        """
        event = self._blip_event
        if event is None:
            return True
        if not event.wait(timeout):
            return False
        if self._blip_error is not None:
            raise self._blip_error
        return True

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the proxy: reset every connection, close the listener and join the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(_CALL_TIMEOUT)
        if self._thread.is_alive():  # pragma: no cover - would be a bug in the proxy
            raise RuntimeError(f"{self!r} did not stop within {_CALL_TIMEOUT}s")
        error = self._failure()
        if error is not None:
            raise RuntimeError("the FaultProxy thread failed") from error

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        target = f"{self.target_host}:{self.target_port}"
        state = "closed" if self._closed else self._mode
        return f"<FaultProxy {self.address} -> {target} {state}>"

    # --- the proxy's thread ----------------------------------------------------------------

    def _call(self, make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        """Run ``make()`` on the proxy's loop and wait for its result."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy methods cannot be called from the proxy's own thread")
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if not self._thread.is_alive():  # pragma: no cover - would be a bug in the proxy
                raise RuntimeError(f"{self!r} has no running thread") from self._failure()
            coro = make()
            try:
                future = asyncio.run_coroutine_threadsafe(coro, self._loop)
            except BaseException:  # pragma: no cover - the loop closed under us
                coro.close()
                raise
            return future.result(_CALL_TIMEOUT)

    def _failure(self) -> BaseException | None:
        """What ended the proxy's thread with an error, if anything did."""
        return self._thread_error

    def _run(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self._main(sock))
        except BaseException as exc:  # reported by close() (or __init__), never printed
            self._thread_error = exc
        finally:
            self._ready.set()
            sock.close()  # the first listener (closed already, unless startup failed)

    async def _main(self, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(self._on_loop_error)
        self._stop = asyncio.Event()
        self._start_listening(sock)
        self._ready.set()
        await self._stop.wait()
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._cancel_blip()
        self._mode = "cut"  # connections accepted from here on are reset
        self._stop_listening()
        await self._settle_accepts()
        for conn in list(self._conns):
            conn.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # let the transports' connection_lost callbacks (which close the sockets) run
        for _ in range(3):
            await asyncio.sleep(0)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), (ConnectionError, TimeoutError)):
            return  # a peer went away: expected, and the connection is torn down already
        self.errors.append(context)
        loop.default_exception_handler(context)

    def _spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _adopt(self, client: _Side) -> None:
        """An accepted connection has its transport: forward it, blackhole it, or reset it."""
        if self._mode == "cut":  # accepted just before the listener closed
            _reset(client.transport)
            return
        self._conns.add(_Connection(self, client, blackholed=self._mode == "blackhole"))

    @staticmethod
    def _bind(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((FaultProxy.host, port))
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _listen(self) -> None:
        """Listen on the proxy's port again (after a cut)."""
        if self._listener is not None:
            return
        deadline = self._loop.time() + _REBIND_TIMEOUT
        while True:
            try:
                sock = self._bind(self.port)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or self._loop.time() >= deadline:
                    raise
            await asyncio.sleep(0.05)
        self._start_listening(sock)

    def _start_listening(self, sock: socket.socket) -> None:
        self._listener = sock
        self._loop.add_reader(sock.fileno(), self._on_acceptable)

    def _stop_listening(self) -> None:
        """Close the listening socket now: connects are refused, unaccepted ones reset."""
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None

    def _on_acceptable(self) -> None:
        # Accepting by hand rather than with loop.create_server(): asyncio's Server cannot be
        # closed safely while it is accepting (an AssertionError, and a leaked socket, on some
        # Python versions), and cut() closes the listener at any moment.
        for _ in range(socket.SOMAXCONN):
            if self._listener is None:
                return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNABORTED (the client gave up), EMFILE, ...: try again later
                return
            self.connections_accepted += 1
            task = self._loop.create_task(self._wrap(sock))
            self._accepting.add(task)
            task.add_done_callback(self._accepting.discard)

    async def _wrap(self, sock: socket.socket) -> None:
        """Give an accepted socket a transport; its protocol's connection_made adopts it."""
        try:
            await self._loop.connect_accepted_socket(lambda: _Side(self), sock)
        except OSError:  # the client is gone already
            sock.close()

    async def _settle_accepts(self) -> None:
        """Wait until every accepted connection has been adopted (or reset)."""
        # A finished task leaves the set only in a later callback: look at done(), and never
        # await an already finished future in a loop (that would spin without yielding).
        while True:
            pending = [task for task in self._accepting if not task.done()]
            if not pending:
                return
            await asyncio.wait(pending)

    def _cancel_blip(self) -> None:
        task, event = self._blip_task, self._blip_event
        self._blip_task = None
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            if event is not None:
                event.set()

    async def _finish_blip(self, seconds: float, event: threading.Event) -> None:
        try:
            await asyncio.sleep(seconds)
            self._blip_task = None
            await self._restore()
        except Exception as exc:  # reported by wait_blip()
            self._blip_error = exc
        finally:
            event.set()

    async def _cut(self) -> None:
        self._cancel_blip()
        self._mode = "cut"
        self._stop_listening()
        await self._settle_accepts()  # adopting a connection in "cut" mode resets it
        for conn in list(self._conns):
            conn.abort()

    async def _blackhole(self) -> None:
        self._cancel_blip()
        self._mode = "blackhole"
        for conn in list(self._conns):
            conn.blackhole()
        await self._listen()

    async def _restore(self) -> None:
        self._cancel_blip()
        self._mode = "normal"
        self._latency = 0.0
        for conn in list(self._conns):
            if conn.blackholed:
                conn.abort()
        await self._listen()


CONNECT_TIMEOUT = 2
"""Seconds a PostgreSQL connect may take in the fault tests (libpq's minimum)."""
SLACK = 0.5
"""Thread scheduling on a loaded machine, on top of a timeout."""
UNBOUNDED_PG_REPLY = (
    "nothing bounds the wait for a reply on an established PostgreSQL connection: "
    "connect_timeout covers connecting only, TCP keepalives and tcp_user_timeout see a live "
    "peer (the silent server's kernel still ACKs), statement_timeout runs on the server; "
    "the opt-in bound is statement_deadline() (tests/test_sql_deadline.py)"
)
"""Why the driver-default silent-server tests are strict expected failures."""


@dataclass(frozen=True)
class BlipReport:
    """What callers saw around a blip: see :func:`blip_under_load`."""

    recovered_after: float  # seconds from the restore to the last failed call (0: none after)
    failed: int  # calls that failed (or were answered without the store)
    calls: int  # calls made in all
    last_failed: bool  # whether the very last call failed


def blip_under_load(
    proxy: FaultProxy,
    call: Callable[[], bool],
    *,
    callers: int = 50,
    cut: float = 0.2,
    before: float = 0.3,
    after: float = 1.5,
) -> BlipReport:
    """Cut the proxy for ``cut`` seconds while ``callers`` threads run ``call`` in a loop.

    Args:
        proxy: the proxy in front of the store.
        call: one call; returns whether it failed (an error decision, a miss...).
        callers: how many threads call at once.
        cut: how long the blip lasts.
        before: seconds of normal load before the blip.
        after: seconds of load after the restore.

    Returns:
        When failures stopped after the restore, and the counts.
    """
    stop = threading.Event()
    log: list[tuple[float, bool]] = []
    lock = threading.Lock()

    def caller() -> None:
        while not stop.is_set():
            failed = call()
            with lock:
                log.append((time.monotonic(), failed))
            time.sleep(0.005)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(before)
        proxy.blip(cut)
        if not proxy.wait_blip(timeout=10):
            raise RuntimeError("the blip never ended")
        restored = time.monotonic()
        time.sleep(after)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    late = [at for at, failed in log if failed and at > restored]
    return BlipReport(
        recovered_after=max(late) - restored if late else 0.0,
        failed=sum(failed for _, failed in log),
        calls=len(log),
        last_failed=log[-1][1] if log else False,
    )
