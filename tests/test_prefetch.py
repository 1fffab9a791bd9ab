"""Background prefetch keeps order, re-raises the producer's error where it happened, and stops on break."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cytocore.prefetch import prefetch


def test_same_items_in_the_same_order_as_a_plain_loop():
    def draws(seed):
        rng = np.random.default_rng(seed)
        for _ in range(20):
            yield rng.integers(0, 1000, 3)

    plain = [d.tolist() for d in draws(7)]
    assert [d.tolist() for d in prefetch(draws(7), depth=3)] == plain
    assert [d.tolist() for d in prefetch(draws(7), depth=0)] == plain


def test_producer_error_is_raised_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("bad image 3")

    got = []
    with pytest.raises(ValueError, match="bad image 3"):
        for item in prefetch(items()):
            got.append(item)
    assert got == [1, 2]


def test_break_stops_the_producer_thread():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    gen = prefetch(endless(), depth=2)
    for item in gen:
        if item == 3:
            break
    gen.close()
    time.sleep(0.05)
    assert threading.active_count() == before
    assert len(produced) <= 4 + 2 + 1  # at most depth items (plus the one being put) beyond the consumer


def test_next_item_is_made_while_the_consumer_still_works_on_this_one():
    second_made = threading.Event()

    def items():
        yield 0
        second_made.set()
        yield 1

    for item in prefetch(items(), depth=2):
        if item == 0:  # a plain loop would only make item 1 after this body returns: the wait would time out
            assert second_made.wait(timeout=30)
