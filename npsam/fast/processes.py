"""Forked worker processes: the cores for work that Python threads cannot spread.

The fast layer's passes spread blocks of rows over threads (threads.py). That
works while each NumPy call is long: a thread releases the GIL inside it. The
automatic mask generator's batches make many short calls (a decoder block is
about 80 of them in 1.6 ms), and every one of them hands the GIL from thread
to thread: on dog.jpg two threads ran 1.6x as fast as one, not 2x, and the
serial parts between the passes (the token side, the masks at photo size)
ran on one core. A batch of points needs nothing from another batch, so the
generator can run whole batches in separate processes instead, each on one
thread, with no GIL between them.

:func:`ordered_map` forks the calling process (so the children have the
model, the image's embedding and everything computed for it, without copying
or pickling them), and this process and its children take the next index in
turn from a shared counter until none is left. Each child sends back each
result (pickled: a batch's MaskData, a few hundred KB at most) from a thread
of its own, so it never waits for this process to read; the results come
back in index order, so the caller sees what a loop would have given.

The values are the same: each index is one call of ``fn``, and every product
in it runs on single-threaded BLAS in blocks fixed by its sizes (threads.py),
whatever process or number of threads runs it.

A child that dies (killed, out of memory) loses nothing: the indices it took
and did not send are computed here afterwards. An exception in a child is
raised here, after every child has stopped.

Linux only: fork is the only way to start a process with all this in memory
at no cost, and on macOS a forked child may not use the system's frameworks
(Accelerate among them). Elsewhere, and with one process, it is a plain loop.
"""

from __future__ import annotations

import os
import pickle
import sys
import warnings
from typing import Any, Callable, List, Optional

from . import threads


def available() -> bool:
    """Whether ordered_map can fork workers here (Linux)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def ordered_map(fn: Callable[[int], Any], n: int, processes: int,
                on_done: Optional[Callable[[int], None]] = None,
                in_child: Optional[Callable[[], None]] = None) -> List[Any]:
    """[fn(0), ..., fn(n - 1)], computed by this process and ``processes - 1``
    forked children, each on one thread (threads.num_threads(1)), taking
    indices in turn. ``on_done(i)`` is called here as each result arrives
    (in the order they finish). ``in_child()`` runs first in each child.
    With one process (or where fork is not available: see ``available``),
    a loop here with this process's threads."""
    processes = max(1, min(int(processes), n))

    def here(i: int) -> Any:  # fn(i) in this process
        result = fn(i)
        if on_done is not None:
            on_done(i)
        return result

    if processes == 1 or not available():
        return [here(i) for i in range(n)]

    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("fork")
    try:
        counter = ctx.Value("q", 0)  # the next index to take, in shared memory, with its lock
    except OSError:  # no POSIX semaphores here (a container without /dev/shm): a loop here
        return ordered_map(fn, n, 1, on_done)

    def claim() -> Optional[int]:
        with counter.get_lock():
            i = counter.value
            if i >= n:
                return None
            counter.value = i + 1
            return i

    results, children, pids = {}, {}, []  # index -> result; receiving end -> child's pid; every child
    try:
        for _ in range(processes - 1):
            receive, send = ctx.Pipe(duplex=False)
            with warnings.catch_warnings():
                # Python 3.12+ warns that forking a process with threads may deadlock the
                # child on a lock another thread held. The other threads here are idle:
                # npsam's pool, waiting for a task (its locks are renewed in the child:
                # threads._after_fork_in_child), and OpenBLAS's, which handles fork itself.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # the child: never returns
                receive.close()
                _child(fn, claim, send, in_child)
            send.close()
            children[receive] = pid
            pids.append(pid)

        def take(conn) -> None:
            try:
                kind, i, value = conn.recv()
            except (EOFError, OSError, pickle.UnpicklingError):  # the child has ended (or died)
                del children[conn]
                conn.close()
                return
            if kind == "done":
                results[i] = value
                if on_done is not None:
                    on_done(i)
            else:  # "error": the child stops; the others are stopped below
                raise value

        with threads.num_threads(1), threads.single_threaded_blas():
            while (i := claim()) is not None:
                results[i] = here(i)
                for conn in wait(list(children), timeout=0):
                    take(conn)
            while children:
                for conn in wait(list(children)):
                    take(conn)
    finally:
        for conn, pid in children.items():  # still open: an exception here or in a child
            _kill(pid)
            conn.close()
        for pid in pids:  # every child has exited (its pipe ended) or been killed: no zombies
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    for i in range(n):  # taken by a child that died before sending it
        if i not in results:
            results[i] = here(i)
    return [results[i] for i in range(n)]


def _child(fn: Callable[[int], Any], claim: Callable[[], Optional[int]], send,
           in_child: Optional[Callable[[], None]]) -> None:
    """A forked worker: results of the indices it takes, sent as ("done", i,
    result); an exception as ("error", i, exception). Exits, never returns.
    Results are pickled here and written by an _Outbox, so the next index
    starts while the parent is still busy with its own."""
    code = 0
    outbox = None
    try:
        threads.set_num_threads(1)
        outbox = _Outbox(send)
        if in_child is not None:
            in_child()
        with threads.single_threaded_blas():
            while (i := claim()) is not None:
                try:
                    result = fn(i)
                except BaseException as error:
                    outbox.put(_message(("error", i, _portable(error, i))))
                    raise
                outbox.put(_message(("done", i, result)))  # a result that cannot be pickled: the parent redoes i
    except BaseException:
        code = 1
    finally:
        try:
            if outbox is not None:
                outbox.close()
            send.close()
        finally:
            os._exit(code)  # no atexit handlers, no finalizers: they are the parent's


def _message(obj) -> bytes:
    """obj pickled as Connection.send pickles it (the parent's recv reads it)."""
    from multiprocessing.reduction import ForkingPickler

    return bytes(ForkingPickler.dumps(obj))


class _Outbox:
    """A thread of the worker that writes its pickled results to the pipe.

    A pipe holds 64 KB; a batch's MaskData is a few hundred. The parent reads
    only between its own items, so a worker writing itself would wait, idle,
    for the parent's item to end (measured on dog.jpg: 1.8 s of the worker's
    15, two batches more for the parent). The thread waits instead (in the
    write, without the GIL), and the worker goes on to its next index."""

    def __init__(self, send) -> None:
        import queue
        import threading

        self._send, self._queue = send, queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="npsam-outbox", daemon=True)
        self._thread.start()

    def put(self, message: bytes) -> None:
        self._queue.put(message)

    def close(self) -> None:
        """Wait until every message is written (or the parent has gone)."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                self._send.send_bytes(message)
            except OSError:  # the parent has gone: nothing more can arrive
                return


def _portable(error: BaseException, i: int) -> BaseException:
    """The child's exception, as it can cross the pipe, naming the index."""
    note = f"(in a worker process, on item {i})"
    try:
        error.add_note(note)  # Python 3.11+
    except AttributeError:
        pass
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error} {note}")


def _kill(pid: int) -> None:
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
