"""Run a generator in a background thread, a few items ahead of whoever consumes it.

The store's reader uses it so that reading and decoding the next chunks overlaps the training
step that consumes the current batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


def prefetched(produce: Callable[[], Iterator[T]], depth: int, name: str = "prefetch") -> Iterator[T]:
    """The items of ``produce()``, computed by a daemon thread at most ``depth`` items ahead.

    An exception in the producer is raised in the consumer, at the point it would have come.
    Closing the returned generator early (``break``, ``.close()``, garbage collection) stops the
    producer and closes its generator, so that its own ``finally`` blocks run.
    """
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():  # a timeout, so that a stopped consumer never leaves us blocked
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            items = produce()
            try:
                for item in items:
                    if not put(item):
                        return
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
