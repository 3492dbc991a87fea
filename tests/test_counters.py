"""Counters shared by forked processes (s3fsimg/counters.py)."""

from __future__ import annotations

import os
import threading

import pytest

from s3fsimg.counters import Counters


def test_add_and_snapshot_in_one_process() -> None:
    c = Counters(["reads", "bytes_read"])
    assert c.snapshot() == {"reads": 0, "bytes_read": 0}
    c.add("reads")
    c.add("bytes_read", 4096)
    c.add_many({"reads": 2, "bytes_read": 10})
    assert c.snapshot() == {"reads": 3, "bytes_read": 4106}


def test_unknown_name_is_a_key_error_and_adds_nothing() -> None:
    c = Counters(["reads"])
    with pytest.raises(KeyError):
        c.add("nope")
    with pytest.raises(KeyError):
        c.add_many({"reads": 1, "nope": 1})
    assert c.snapshot() == {"reads": 0}


def test_bad_slots() -> None:
    with pytest.raises(ValueError):
        Counters(["a"], slots=0)
    c = Counters(["a"], slots=2)
    with pytest.raises(ValueError):
        c.use_slot(2)
    with pytest.raises(ValueError):
        Counters(["a", "a"])


def test_slots_are_summed() -> None:
    c = Counters(["a", "b"], slots=3)
    for slot in range(3):
        c.use_slot(slot)
        c.add("a", slot + 1)
        c.add("b", 10 * (slot + 1))
    assert c.snapshot() == {"a": 6, "b": 60}


def test_threads_lose_no_counts() -> None:
    c = Counters(["n"])

    def bump() -> None:
        for _ in range(20_000):
            c.add("n")

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.snapshot() == {"n": 80_000}


def test_forked_workers_write_their_slots_and_the_parent_sums_them() -> None:
    c = Counters(["reads", "bytes_read"], slots=3)
    c.add("reads", 5)  # the parent's own counts stay in slot 0
    pids = []
    for slot in (1, 2):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                c.use_slot(slot)
                for _ in range(1000):
                    c.add("reads")
                c.add_many({"bytes_read": slot * 100})
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert c.snapshot() == {"reads": 2005, "bytes_read": 300}


def test_a_lock_held_at_fork_does_not_block_the_worker() -> None:
    c = Counters(["n"], slots=2)
    c._lock.acquire()  # another thread of the parent is counting when the parent forks
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                c.use_slot(1)
                c.add("n", 7)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        c._lock.release()
    assert os.waitstatus_to_exitcode(status) == 0
    assert c.snapshot() == {"n": 7}
