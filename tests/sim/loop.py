"""Virtual time: a discrete-event loop, simulated processes, futures and coroutine tasks.

Everything in the simulator runs on one `Loop`: a heap of (time, counter, callback). Nothing
reads a wall clock, sleeps or starts a thread, so a run is a pure function of its seed.

A `Process` stands for an OS process (a node, the broker, the publisher): its callbacks run only
while it lives, and while it is paused (SIGSTOP) they are kept, in order, and run when it
resumes; a killed process runs nothing ever again. Code that in the real mesh is asyncio is
written here as ordinary `async def` coroutines driven by `Task`, awaiting the simulator's own
`Future`; this keeps the executor readable and close to mesh/node.py. Not modelled: CPU time
(work takes the virtual time the model says it takes) and preemption inside a callback.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class SimError(Exception):
    """A bug in the simulator itself (never a finding about the mesh)."""


class Process:
    """A simulated OS process: alive or killed, running or paused."""

    __slots__ = ("dead", "name", "paused", "pending", "tasks")

    def __init__(self, name: str) -> None:
        self.name = name
        self.dead = False
        self.paused = False
        self.pending: list[Callable[[], None]] = []
        self.tasks: list[Task] = []  # closed when it is killed, in order (deterministic)

    def adopt(self, task: Task) -> None:
        if len(self.tasks) > 64:
            self.tasks = [t for t in self.tasks if not t.done.done()]
        self.tasks.append(task)


class Handle:
    __slots__ = ("cancelled", "fn", "proc")

    def __init__(self, fn: Callable[[], None], proc: Process | None) -> None:
        self.fn = fn
        self.proc = proc
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """The event loop of one simulated world."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Handle]] = []
        self._counter = 0
        self.failure: BaseException | None = None  # an exception that escaped a task
        self.events = 0

    def call_at(self, when: float, fn: Callable[[], None], proc: Process | None = None) -> Handle:
        handle = Handle(fn, proc)
        self._counter += 1
        heapq.heappush(self._heap, (max(when, self.now), self._counter, handle))
        return handle

    def call_later(self, delay: float, fn: Callable[[], None],
                   proc: Process | None = None) -> Handle:
        return self.call_at(self.now + delay, fn, proc)

    def call_soon(self, fn: Callable[[], None], proc: Process | None = None) -> Handle:
        return self.call_at(self.now, fn, proc)

    def run(self, until: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= until:
            when, _, handle = heapq.heappop(heap)
            if handle.cancelled:
                continue
            self.now = when
            proc = handle.proc
            if proc is not None:
                if proc.dead:
                    continue
                if proc.paused:
                    proc.pending.append(handle.fn)
                    continue
            self.events += 1
            handle.fn()
            if self.failure is not None:
                raise SimError(f"a simulated task failed at t={self.now:.4f}") from self.failure
        self.now = max(self.now, until)

    def pause(self, proc: Process) -> None:
        proc.paused = True

    def resume(self, proc: Process) -> None:
        """Run what came for `proc` while it was paused, in order, as from now."""
        proc.paused = False
        pending, proc.pending = proc.pending, []
        for fn in pending:
            self.call_soon(fn, proc)

    def kill(self, proc: Process) -> None:
        """kill -9: nothing of it runs again; its coroutines are closed now, in order."""
        proc.dead = True
        proc.pending = []
        for task in proc.tasks:
            task.cancel()
        proc.tasks = []


class Future(Generic[T]):
    """A result that arrives later; `await`-able from a `Task`."""

    __slots__ = ("_callbacks", "_done", "_exc", "_result")

    def __init__(self) -> None:
        self._done = False
        self._result: T | None = None
        self._exc: BaseException | None = None
        self._callbacks: list[Callable[[Future[T]], None]] = []

    def done(self) -> bool:
        return self._done

    def result(self) -> T:
        if not self._done:
            raise SimError("result() of a future that is not done")
        if self._exc is not None:
            raise self._exc
        return self._result  # type: ignore[return-value]

    def exception(self) -> BaseException | None:
        return self._exc

    def set_result(self, value: T) -> None:
        if self._done:
            return
        self._done, self._result = True, value
        self._fire()

    def set_exception(self, exc: BaseException) -> None:
        if self._done:
            return
        self._done, self._exc = True, exc
        self._fire()

    def _fire(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable[[Future[T]], None]) -> None:
        if self._done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def __await__(self) -> Generator[Future[Any], None, T]:
        if not self._done:
            yield self
        return self.result()


class Cancelled(Exception):
    """Raised into nothing: a cancelled task is closed where it waits (GeneratorExit)."""


class Task:
    """Drives one coroutine on `loop` as part of `proc`; its steps obey the process's fate."""

    __slots__ = ("_coro", "_running", "cancelled", "done", "loop", "name", "proc")

    def __init__(self, loop: Loop, proc: Process, coro: Coroutine[Future[Any], None, Any],
                 name: str, *, eager: bool = False) -> None:
        """`eager`: run its first step now (as asyncio.gather starts coroutines in order)."""
        self.loop = loop
        self.proc = proc
        self.name = name
        self._coro = coro
        self._running = False
        self.cancelled = False
        self.done: Future[None] = Future()
        proc.adopt(self)
        if eager:
            self._step()
        else:
            loop.call_soon(self._step, proc)

    def _step(self) -> None:
        if self.cancelled or self.done.done():
            return
        self._running = True
        try:
            waiting = self._coro.send(None)
        except StopIteration:
            self.done.set_result(None)
            return
        except BaseException as exc:
            self.done.set_exception(exc)
            if not isinstance(exc, Exception) or not _expected(exc):
                self.loop.failure = exc
            return
        finally:
            self._running = False
        if self.cancelled:
            self._coro.close()
            return
        waiting.add_done_callback(self._wake)

    def _wake(self, _: Future[Any]) -> None:
        self.loop.call_soon(self._step, self.proc)

    def cancel(self) -> None:
        """Stop it where it waits; `finally` blocks run, nothing after them."""
        if self.cancelled or self.done.done():
            return
        self.cancelled = True
        if not self._running:
            self._coro.close()
        self.done.set_exception(Cancelled(self.name))


_EXPECTED: tuple[type[Exception], ...] = ()


def expect(*kinds: type[Exception]) -> None:
    """Exceptions that may end a task without failing the run (the mesh's own errors)."""
    global _EXPECTED  # noqa: PLW0603
    _EXPECTED = (*_EXPECTED, *kinds)


def _expected(exc: Exception) -> bool:
    return isinstance(exc, _EXPECTED)


def sleep(loop: Loop, proc: Process, seconds: float) -> Future[None]:
    future: Future[None] = Future()
    loop.call_later(seconds, lambda: future.set_result(None), proc)
    return future


def first(*futures: Future[Any]) -> Future[None]:
    """Done when any of `futures` is (whatever its outcome)."""
    out: Future[None] = Future()
    for future in futures:
        future.add_done_callback(lambda _: out.set_result(None))
    return out


def gather(futures: list[Future[Any]]) -> Future[None]:
    """Done when all of `futures` are (whatever their outcomes)."""
    out: Future[None] = Future()
    left = [len(futures)]

    def one(_: Future[Any]) -> None:
        left[0] -= 1
        if left[0] == 0:
            out.set_result(None)

    if not futures:
        out.set_result(None)
    for future in futures:
        future.add_done_callback(one)
    return out


class Event:
    """asyncio.Event: `wait()` is a future done once the event is set."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: Future[None] = Future()

    def is_set(self) -> bool:
        return self._future.done()

    def set(self) -> None:
        self._future.set_result(None)

    def clear(self) -> None:
        if self._future.done():
            self._future = Future()

    def wait(self) -> Future[None]:
        return self._future


class Lock:
    """asyncio.Lock, FIFO."""

    __slots__ = ("_locked", "_waiters")

    def __init__(self) -> None:
        self._locked = False
        self._waiters: list[Future[None]] = []

    async def acquire(self) -> None:
        if self._locked:
            waiter: Future[None] = Future()
            self._waiters.append(waiter)
            await waiter
        self._locked = True

    def release(self) -> None:
        if self._waiters:
            self._waiters.pop(0).set_result(None)  # handed on: stays locked
        else:
            self._locked = False
