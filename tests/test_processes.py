"""fast/processes.py: ordered_map over forked workers (Linux).

The generator's use of it (the same records, a worker that dies, an error in
a worker) is tested in test_automatic_mask_generator.py; here the map itself.
"""

from __future__ import annotations

import os
import time

import pytest

from npsam.fast import processes, threads

pytestmark = pytest.mark.skipif(not processes.available(), reason="workers are forked: Linux only")


def _forks(monkeypatch):
    """Record the pid of every child ordered_map forks."""
    pids, real = [], os.fork

    def fork():
        pid = real()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    return pids


def _reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.mark.parametrize("n, workers", [(0, 3), (1, 3), (7, 1), (7, 2), (9, 3)])
def test_results_come_back_in_order_and_each_is_done_once(monkeypatch, n, workers):
    pids = _forks(monkeypatch)
    done, before = [], threads.NUM_THREADS

    def fn(i):
        time.sleep(0.01)  # long enough for every worker to take some
        return (i * i, os.getpid(), threads.NUM_THREADS)

    out = processes.ordered_map(fn, n, workers, done.append)
    assert [r[0] for r in out] == [i * i for i in range(n)]
    assert sorted(done) == list(range(n))
    assert len(pids) == max(0, min(workers, n) - 1)
    if pids and n >= 7:
        assert {r[1] for r in out} - {os.getpid()}, "a worker computed none of them"
        assert all(r[2] == 1 for r in out), "each process of the map runs on one thread"
    assert all(_reaped(pid) for pid in pids), "every worker is waited for"
    assert threads.NUM_THREADS == before, "the caller's threads are restored"


def test_a_worker_that_dies_loses_nothing(monkeypatch):
    pids = _forks(monkeypatch)
    parent = os.getpid()

    def fn(i):
        if os.getpid() != parent:
            os._exit(9)  # every index a worker takes dies with it
        time.sleep(0.01)
        return i

    assert processes.ordered_map(fn, 6, 3) == list(range(6))
    assert len(pids) == 2 and all(_reaped(pid) for pid in pids)


def test_an_exception_in_a_worker_is_raised_here_with_its_index(monkeypatch):
    pids = _forks(monkeypatch)
    parent = os.getpid()

    def fn(i):
        if os.getpid() != parent:
            raise KeyError(f"item {i} failed")
        time.sleep(0.05)
        return i

    with pytest.raises(KeyError, match="failed") as raised:
        processes.ordered_map(fn, 8, 2)
    assert any("worker process, on item" in note for note in raised.value.__notes__)
    assert all(_reaped(pid) for pid in pids)


def test_an_exception_here_stops_the_workers(monkeypatch):
    pids = _forks(monkeypatch)
    parent = os.getpid()

    def fn(i):
        if os.getpid() == parent:
            raise RuntimeError("the parent's item failed")
        time.sleep(30)  # a worker still busy: it is killed, not waited for

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="parent's item"):
        processes.ordered_map(fn, 4, 2)
    assert time.monotonic() - started < 20
    assert all(_reaped(pid) for pid in pids)


def test_an_exception_that_cannot_be_pickled_still_arrives(monkeypatch):
    parent = os.getpid()

    class Local(Exception):  # defined in a function: pickle cannot find it by name
        pass

    def fn(i):
        if os.getpid() != parent:
            raise Local("not picklable")
        time.sleep(0.05)
        return i

    with pytest.raises(RuntimeError, match="Local: not picklable"):
        processes.ordered_map(fn, 6, 2)


def test_without_shared_memory_it_is_a_loop_here(monkeypatch):
    """No POSIX semaphores (a container without /dev/shm): no worker, the same results."""
    import multiprocessing

    pids = _forks(monkeypatch)
    context = multiprocessing.get_context("fork")

    class NoSemaphores(type(context)):
        def Value(self, *args, **kwargs):
            raise OSError(38, "Function not implemented")

    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: NoSemaphores())
    done = []
    assert processes.ordered_map(lambda i: i + 1, 5, 3, done.append) == [1, 2, 3, 4, 5]
    assert done == list(range(5)) and pids == []


def test_repeated_maps_leave_no_open_pipes():
    processes.ordered_map(lambda i: i, 6, 2)  # the first map sets up multiprocessing's shared memory
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        processes.ordered_map(lambda i: i, 6, 2)
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_worker_does_not_wait_for_this_process_to_read(tmp_path):
    """A worker goes on to its next index while this process is busy: its
    results (larger than a pipe holds) wait in its outbox, not the worker.
    Here this process's one index waits until the worker has done every
    other; a worker that waited for its first result to be read would never
    get there."""
    parent, n, big = os.getpid(), 6, 1 << 20  # 1 MiB a result: a pipe holds 64 KiB

    def fn(i):
        if os.getpid() == parent:
            deadline = time.monotonic() + 30
            while len(os.listdir(tmp_path)) < n - 1:
                assert time.monotonic() < deadline, f"the worker did {len(os.listdir(tmp_path))} of {n - 1} indices"
                time.sleep(0.01)
            return ("here", i)
        (tmp_path / str(i)).touch()
        return ("worker", i, b"x" * big)

    out = processes.ordered_map(fn, n, 2)
    assert [r[1] for r in out] == list(range(n))
    assert sum(r[0] == "here" for r in out) == 1, "this process should have done only the index it waited in"
    assert all(len(r[2]) == big for r in out if r[0] == "worker")
