"""Run an iterator on a background thread, a few items ahead of its consumer.

Why: a training step and the next batch's sampling/augmentation (NumPy, OpenCV, PIL: they release
the GIL) can then overlap instead of alternating, and an inference loop can read and tile the next
image while the network works on this one. A thread, not a process: the items are large arrays that
a process would have to copy, and the work that overlaps releases the GIL anyway.

The producer is the only code that advances the iterator, so its order (and any RNG it draws from)
is exactly that of a plain loop; an exception in the producer is raised in the consumer at the item
where it happened; closing the consumer early (``break``) stops the producer.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` in order while a daemon thread computes up to ``depth`` of them ahead.

    ``depth <= 0`` returns a plain iterator (no thread). Always close or exhaust the result (a
    ``for`` loop does, also on ``break`` once the generator is garbage collected; ``contextlib.closing``
    makes it immediate) so the producer thread ends.
    """
    if depth <= 0:
        yield from items
        return
    buffer: "queue.Queue[object]" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, re-raised there
            put(_Failure(exc))
            return
        put(_DONE)

    worker = threading.Thread(target=produce, name="cytofuse-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()
