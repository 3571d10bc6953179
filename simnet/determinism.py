"""Reproducible trio scheduling: the one place simnet touches trio's private internals.

trio runs the tasks that became runnable together in a random order (on purpose, so that
programs do not come to depend on it). Its scheduler has a switch that Hypothesis' trio
support flips: with ``trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING`` set, each batch is
sorted by task creation order and then shuffled with trio's module-level
``random.Random`` instance ``trio._core._run._r``, which we seed. The same program and seed
then give the same schedule, hence (with every other random source injected and seeded)
the same run. Both are private names: if a trio upgrade removes them, this function raises
a clear error instead of silently giving up reproducibility.

Example::

    with deterministic_scheduling(seed=7):
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["deterministic_scheduling"]


@contextmanager
def deterministic_scheduling(seed: int) -> Iterator[None]:
    """Make trio's scheduler deterministic (seeded by ``seed``) inside the ``with`` block.

    The previous settings are restored on exit. Not thread-safe: do not run other trio
    loops concurrently in other threads meanwhile.
    """
    try:
        from trio._core import _run
    except ImportError as exc:  # pragma: no cover - depends on the trio version
        raise RuntimeError(f"simnet needs trio's scheduler internals: {exc}") from exc
    if not hasattr(_run, "_ALLOW_DETERMINISTIC_SCHEDULING") or not hasattr(_run, "_r"):
        raise RuntimeError(  # pragma: no cover - depends on the trio version
            f"this trio ({_run.__name__}) has no deterministic-scheduling switch; simnet runs "
            "would not be reproducible: use a trio version with _ALLOW_DETERMINISTIC_SCHEDULING"
        )
    flag = _run._ALLOW_DETERMINISTIC_SCHEDULING
    state = _run._r.getstate()
    _run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    _run._r.seed(seed)
    try:
        yield
    finally:
        _run._ALLOW_DETERMINISTIC_SCHEDULING = flag  # type: ignore[misc]
        _run._r.setstate(state)
