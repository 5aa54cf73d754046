"""Worker threads, single-threaded BLAS and per-thread work arrays: the
machinery the fast layer's blocked passes run on.

Dimension letters as in :mod:`npsam.kernels.ops`.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Callable, Optional, Tuple

import numpy as np

# ---------------------------------------------------------------------------
# Threads for element-wise work
# ---------------------------------------------------------------------------
# NumPy's element-wise ufuncs run on one core; they release the GIL, so a few
# Python threads working on separate row blocks of the same arrays use the
# other cores. The fused passes (decoder, ViT attention and MLP) also run their
# matrix products on these threads, with BLAS single-threaded (see BLAS threads
# below). NPSAM_NUM_THREADS (or set_num_threads) sets how many; 1 runs them on
# the calling thread alone.
#
# The number of threads never changes a result's bits: every pass is cut into
# blocks fixed by its sizes (never by the number of threads), and every block's
# matrix products run on single-threaded BLAS, whatever the number of threads,
# 1 included. Both matter: on some OpenBLAS kernels (Haswell's, for one) a
# product's last bit depends on where a row falls in the call (its extent and
# offset) and on OpenBLAS's own thread count, so a block cut at a thread's
# boundary, or BLAS left multi-threaded on one thread only, would make a
# user's masks depend on NPSAM_NUM_THREADS.
def _threads_from_environment() -> int:
    """NPSAM_NUM_THREADS: a whole number, at most 8 used; unset, empty or 0: one
    per CPU (at most 8)."""
    value = os.environ.get("NPSAM_NUM_THREADS", "").strip()
    try:
        n = int(value) if value else 0
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"NPSAM_NUM_THREADS must be a whole number of threads >= 1 (or 0 for one per CPU), "
                         f"got {value!r}")
    return min(n or os.cpu_count() or 1, 8)


NUM_THREADS = _threads_from_environment()
# Elements per block of element-wise work: a block and its temporaries stay
# near the L2 cache (1.25 MB per core here), and each NumPy call is long enough
# that two threads seldom wait for each other's GIL hand-over. Measured on the
# decoder (A/B in one process): 128K is 4-6% faster than 64K, 32K 10% slower,
# 256K 9% slower for 16 prompts.
CHUNK = 1 << 17
_pool = None  # (task queue, workers): NUM_THREADS - 1 daemon threads, started on first use
_pool_lock = threading.Lock()
_in_worker = threading.local()  # set in pool threads: nested parallel_rows runs inline


def set_num_threads(n: int) -> None:
    """Threads for element-wise work and fused passes (>= 1)."""
    global NUM_THREADS, _pool
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: n must be an int >= 1, got {n!r}")
    with _pool_lock:
        NUM_THREADS = n
        if _pool is not None:
            for _ in _pool[1]:
                _pool[0].put(None)  # each worker exits when it takes a None
            _pool = None


@contextlib.contextmanager
def num_threads(n: int):
    """Context manager: set_num_threads(n) inside, the number before restored
    after (fast/processes.py runs each process of a map on one thread)."""
    saved = NUM_THREADS
    set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(saved)


def _after_fork_in_child() -> None:
    """A forked child has only the thread that forked: the pool's threads are
    gone (a new pool starts on first use), and a lock another thread held at
    the fork would stay held, so the locks are new too (fast/processes.py)."""
    global _pool, _pool_lock, _blas_lock
    _pool, _pool_lock, _blas_lock = None, threading.Lock(), threading.Lock()
    for held in _HeldWhileOpen.instances:
        held.lock = threading.Lock()


def _tasks():
    """The task queue of the worker threads (started here on first use). A plain
    queue and threads rather than concurrent.futures: lighter to import and to
    submit to, which matters for a cold process and for short passes."""
    global _pool
    with _pool_lock:
        if _pool is None:
            import queue

            tasks = queue.SimpleQueue()
            workers = [threading.Thread(target=_worker, args=(tasks,), name=f"npsam-{i}", daemon=True)
                       for i in range(NUM_THREADS - 1)]
            for w in workers:
                w.start()
            _pool = (tasks, workers)
        return _pool[0]


def _worker(tasks) -> None:
    _in_worker.busy = True
    while True:
        task = tasks.get()
        if task is None:
            return
        fn, start, stop, done = task
        try:
            fn(start, stop)
        except BaseException as e:  # handed to the caller, raised there
            done.put(e)
        else:
            done.put(None)


def parallel_rows(fn: Callable[[int, int], None], n: int, min_rows: int = 1, threads: Optional[int] = None) -> None:
    """Call ``fn(start, stop)`` on contiguous ranges covering rows ``[0, n)``, one
    range per thread (the calling thread takes the first; ``threads`` defaults to
    NUM_THREADS). ``fn`` must write only its own rows. An exception in any range
    is raised here, after every range has finished."""
    parts = min(NUM_THREADS if threads is None else threads, NUM_THREADS, max(1, n // max(1, min_rows)))
    if parts <= 1 or getattr(_in_worker, "busy", False):
        fn(0, n)
        return
    import queue

    tasks, done = _tasks(), queue.SimpleQueue()
    bounds = [n * i // parts for i in range(parts + 1)]
    for i in range(1, parts):
        tasks.put((fn, bounds[i], bounds[i + 1], done))
    error = None
    try:
        _run_in_worker(fn, bounds[0], bounds[1])
    except BaseException as e:
        error = e
    for _ in range(1, parts):
        result = done.get()
        error = error or result
    if error is not None:
        raise error


def parallel_blocks(fn: Callable[[int, int], None], n: int, size: int, threads: Optional[int] = None) -> None:
    """Call ``fn(lo, hi)`` on the blocks [0, size), [size, 2*size), ... covering
    rows ``[0, n)`` (the last ragged), spread over threads as parallel_rows
    spreads rows. The blocks are fixed by ``size``, never by the number of
    threads, so a block's products are the same calls on any number of them."""
    size = max(1, size)

    def work(start, stop):
        for j in range(start, stop):
            fn(j * size, min(n, (j + 1) * size))

    parallel_rows(work, -(-n // size), threads=threads)


def _run_in_worker(fn: Callable[[int, int], None], start: int, stop: int) -> None:
    busy = getattr(_in_worker, "busy", False)
    _in_worker.busy = True
    try:
        fn(start, stop)
    finally:
        _in_worker.busy = busy


# ---------------------------------------------------------------------------
# BLAS threads
# ---------------------------------------------------------------------------
# The fused passes (transformer.py, mask_decoder.py) split rows over our own
# threads, each running its matrix products *and* element-wise work on its rows.
# BLAS must then run single-threaded in each: OpenBLAS's own threads would
# oversubscribe the cores, and after every multi-threaded product they spin for
# a while, taking the core an element-wise thread needs. NumPy has no API for
# this, so single_threaded_blas() calls OpenBLAS's documented
# openblas_set_num_threads through ctypes (what threadpoolctl does), looking
# the library up among those NumPy loaded. Where it is not found (MKL,
# Accelerate), fused passes run on one Python thread and BLAS keeps its threads.
_blas = None  # (set, get) once looked up; False when there is no OpenBLAS to control
_blas_lock = threading.Lock()


def _find_openblas():
    import ctypes
    import itertools

    def loaded():  # Linux: whatever NumPy actually loaded (0.5 ms, where the globs below take 1.2)
        try:
            with open("/proc/self/maps") as f:
                return sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
        except OSError:
            return []

    def shipped():  # elsewhere: the copy NumPy's wheel ships
        import glob

        here = os.path.dirname(np.__file__)
        for pattern in ("*openblas*.so*", "*openblas*.dylib", "*openblas*.dll"):
            for folder in (here + ".libs", os.path.join(here, ".dylibs"), here):
                yield from glob.glob(os.path.join(folder, pattern))

    for path in itertools.chain(loaded(), shipped()):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                               ("openblas", "")):
            set_, get = (getattr(lib, f"{prefix}_{verb}_num_threads{suffix}", None) for verb in ("set", "get"))
            if set_ is not None and get is not None:
                set_.argtypes, set_.restype, get.restype = [ctypes.c_int], None, ctypes.c_int
                return set_, get
    return False


class _HeldWhileOpen:
    """Context manager: a process-wide setting held at ``value`` while any
    ``with`` of it is open, in any thread, and restored to what it was when
    the last one exits. Nests. ``swap(value)`` sets the setting and returns
    the value it had. One instance per setting (single_threaded_blas,
    no_huge_pages); where the setting cannot be made, they give _NotHeld."""

    active = True
    instances = []  # every one made (a forked child renews their locks)

    def __init__(self, swap: Callable, value) -> None:
        self.swap, self.value = swap, value
        self.depth = 0  # open contexts, in all threads
        self.saved = None  # the setting before the first of them
        self.lock = threading.Lock()
        _HeldWhileOpen.instances.append(self)

    def __enter__(self):
        with self.lock:
            if self.depth == 0:
                self.saved = self.swap(self.value)
            self.depth += 1
        return self

    def __exit__(self, *exc):
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                self.swap(self.saved)


class _NotHeld(contextlib.nullcontext):
    """A _HeldWhileOpen for a setting this process cannot make: nothing."""

    active = False


def _swap_blas_threads(n: int) -> int:
    set_, get = _blas
    before = get()
    if before != n:
        set_(n)
    return before


# OpenBLAS on one thread, active whatever NUM_THREADS is, 1 included, so that
# a fused pass makes the same single-threaded BLAS calls on any number of threads.
_single_blas = _HeldWhileOpen(_swap_blas_threads, 1)


def blas_is_single() -> bool:
    """Inside single_threaded_blas (where OpenBLAS was found): row passes may
    spread their matrix products over our threads. Does not depend on
    NUM_THREADS, so neither does the choice of a fused pass over a plain one."""
    return _single_blas.depth > 0


def single_threaded_blas():
    """Context manager: OpenBLAS on one thread inside (see _HeldWhileOpen);
    nothing where no OpenBLAS was found."""
    return _single_blas if blas_controllable() else _NotHeld()


def blas_controllable() -> bool:
    """Whether OpenBLAS's thread count can be set (see single_threaded_blas)."""
    global _blas
    with _blas_lock:
        if _blas is None:
            _blas = _find_openblas()
    return bool(_blas)


def row_threads() -> int:
    """Python threads for a fused pass: NUM_THREADS when BLAS can be made
    single-threaded (see single_threaded_blas), else 1."""
    return NUM_THREADS if blas_controllable() else 1


# ---------------------------------------------------------------------------
# Huge pages
# ---------------------------------------------------------------------------
# NumPy asks Linux for transparent huge pages (madvise) on every array of 4 MB
# or more. Under Linux's usual setting (transparent_hugepage/defrag =
# madvise), a page fault in such an array first compacts memory to find 2 MB
# of it, synchronously, in the faulting thread. Once memory is fragmented (by
# any process that came and went) that is slow: segmenting everything in
# dog.jpg spent 4.1-4.8 s of its 20.6-21.1 s in the kernel, against 0.9-1.2 s
# of 18.7-19.2 s with ordinary pages (NUMPY_MADVISE_HUGEPAGE=0, alternated
# runs). no_huge_pages() turns NumPy's request off while a pass that makes
# many large arrays runs, and back on after: the setting is the process's, so
# arrays other threads make meanwhile get ordinary pages too, which changes
# nothing but where their memory comes from.
def _madvise_switch() -> Optional[Callable[[bool], bool]]:
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    return getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)


_set_madvise = _madvise_switch()
_no_huge_pages = None if _set_madvise is None else _HeldWhileOpen(_set_madvise, False)


def no_huge_pages():
    """Context manager: NumPy's huge-page request off inside (see
    _HeldWhileOpen); nothing on a NumPy without the switch."""
    return _NotHeld() if _no_huge_pages is None else _no_huge_pages


# ---------------------------------------------------------------------------
# Work arrays
# ---------------------------------------------------------------------------
# A fresh multi-megabyte temporary costs a page fault per 4 KB page whenever
# the allocator has handed that memory back to the system, as glibc does with
# the free top of its heap once a call's temporaries are gone: a one-prompt
# decode faulted 2021 pages per call, about 1.5 us each here, and more when
# the host is busy. Hot loops that make the same large temporaries call after
# call (the decoder's passes over image rows and its upscaling, GELU, the
# convolutions' im2col columns and depthwise sums) take them from here
# instead: one set per thread, kept for the thread's life (11.4 MB per
# thread for the float32 decoder; a step reuses an earlier step's array once
# that is read, which spares a cold process's first decode 1200 faults). The
# decode now faults 4.
_scratch = threading.local()


def work_array(arrays: dict, key: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
    """A C-contiguous array of ``shape`` and ``dtype`` kept in ``arrays`` under
    ``key``, contents undefined: the memory the last call with that key got,
    grown (the old array dropped first) when it is too small or of another
    dtype. The caller must be done with it by the next call with that key."""
    dtype = np.dtype(dtype)
    size = math.prod(shape)
    buf = arrays.get(key)
    if buf is None or buf.size < size or buf.dtype != dtype:
        arrays.pop(key, None)
        buf = arrays[key] = np.empty(max(size, 1), dtype)
    return buf[:size].reshape(shape)


def scratch(key: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
    """work_array for this thread, kept for the thread's life: the same key on
    the same thread returns the same memory, so the caller must not hand it out."""
    return work_array(_scratch.__dict__, key, shape, dtype)


class WorkArrays:
    """Work arrays owned by one caller rather than by a thread (the generator's
    batches share theirs: fast/automatic_mask_generator.py): ``get`` is
    work_array on its own set, dropped with it."""

    def __init__(self) -> None:
        self._arrays = {}

    def get(self, key: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
        return work_array(self._arrays, key, shape, dtype)


def image_rows(job: int, per_image: int, rows: int, n: int) -> Tuple[int, int, int]:
    """Job ``job`` of a pass over blocks of ``rows`` rows of every image of ``n``
    rows (``per_image`` = ceil(n / rows) jobs each): (image, lo, hi)."""
    image, lo = divmod(job, per_image)
    lo *= rows
    return image, lo, min(n, lo + rows)


def blocks(start: int, stop: int, size: int):
    """(lo, hi) blocks of at most ``size`` rows covering [start, stop)."""
    for lo in range(start, stop, size):
        yield lo, min(lo + size, stop)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
