"""Many deadlines served by one trio task: :class:`Alarms`.

A node keeps hundreds of channels, each with a next deadline (a keepalive due, a read
waiting too long), and simnet's virtual network wakes thousands of readers at the arrival
times of their chunks. A task or cancel scope per deadline costs more than the work done
when it rings: setting it up, moving its deadline and unwinding the ``Cancelled`` it raises.
:class:`Alarms` keeps the deadlines in one heap and one task sleeps until the earliest.

An item's alarm can be moved or dropped without touching the heap: the owner keeps the
time it last set for the item, and ``ring(item, at)`` ignores an entry whose ``at`` is no
longer that time (superseded or moot).

Example::

    >>> import trio
    >>> async def main():
    ...     rung = []
    ...     async with trio.open_nursery() as nursery:
    ...         alarms = Alarms(nursery, lambda item, at: rung.append(item))
    ...         now = trio.current_time()
    ...         alarms.set("b", now + 0.02)
    ...         alarms.set("a", now + 0.01)
    ...         await trio.sleep(0.05)
    ...         nursery.cancel_scope.cancel()
    ...     return rung
    >>> trio.run(main)
    ['a', 'b']
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

__all__ = ["Alarms"]

_T = TypeVar("_T")


class Alarms(Generic[_T]):
    """Calls ``ring(item, at)`` once each alarm time ``at`` set for ``item`` has come, from
    one task started in ``nursery`` with the first alarm. Alarms of equal times ring in
    the order they were set."""

    def __init__(self, nursery: trio.Nursery, ring: Callable[[_T, float], None]) -> None:
        self._nursery = nursery
        self._ring = ring
        self._heap: list[tuple[float, int, _T]] = []
        self._order = itertools.count()
        self._sleep: trio.CancelScope | None = None
        self._task: trio.lowlevel.Task | None = None
        self._started = False

    def set(self, item: _T, at: float) -> None:
        """Ring for ``item`` at ``at`` (in trio's clock)."""
        heapq.heappush(self._heap, (at, next(self._order), item))
        if not self._started:
            self._started = True
            self._nursery.start_soon(self._run)
        sleep = self._sleep
        if sleep is not None and at < sleep.deadline:
            sleep.deadline = at

    async def _run(self) -> None:
        heap = self._heap
        self._task = trio.lowlevel.current_task()
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                at, _, item = heapq.heappop(heap)
                self._ring(item, at)
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as self._sleep:
                await trio.lowlevel.wait_task_rescheduled(self._abort)
            self._sleep = None

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        # The sleep's own deadline passed: wake with a value rather than raise and unwind
        # a Cancelled each time; any other cancellation (the nursery ending) is delivered.
        sleep = self._sleep
        if sleep is not None and sleep.cancel_called and self._task is not None:
            trio.lowlevel.reschedule(self._task)
            return trio.lowlevel.Abort.FAILED
        return trio.lowlevel.Abort.SUCCEEDED
