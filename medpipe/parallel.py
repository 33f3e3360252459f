"""Run one function over many cases, in worker processes when asked, reporting progress."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def map_cases(
    function: Callable[..., Result],
    items: Sequence[Item],
    *shared: object,
    workers: int = 1,
    on_done: Callable[[Item], None] | None = None,
) -> Iterator[Result]:
    """`function(item, *shared)` for each item, in order; `on_done(item)` after each.

    With `workers` > 1 the calls run in processes (numpy/ITK work holds the GIL too often
    for threads to help), so `function` and its arguments must be picklable.
    """
    if workers > 1 and len(items) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(function, item, *shared) for item in items]
            for item, future in zip(items, futures, strict=True):
                yield future.result()
                if on_done:
                    on_done(item)
        return
    for item in items:
        yield function(item, *shared)
        if on_done:
            on_done(item)
