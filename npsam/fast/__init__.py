"""The fast layer, and the one switch that chooses it.

npsam keeps two implementations of SAM side by side:

- the **reference** (``npsam.modeling``, ``npsam.kernels``): each module's
  ``forward`` computes what the official PyTorch ``forward`` computes, in the
  official order of operations and association of products;
- the **fast layer** (this package): functions that compute the same outputs by
  a faster route (fused passes over row blocks, worker threads, reassociated
  products, per-image caches). Each one is registered against the reference
  method it replaces with :func:`implements`, and says in its docstring why its
  result is equal (bit for bit) or within the tolerances (a different association).

The fast layer is the default. The switch::

    with npsam.reference():
        masks, scores, logits = predictor.predict(...)   # every module runs its reference forward

is the only thing that chooses between them, and it is read in one place:
:func:`implementation`, which ``Module.__call__`` asks before running
``forward``, and so do the few other reference methods with a fast twin
(``MaskDecoder.predict_masks``, ``PromptEncoder.get_dense_pe``, the in-place
``forward_`` of activations), marked with :func:`dispatch`. The switch is a
context variable, so it holds for the thread (or asyncio task) that set it and for
nothing else; tracing (:mod:`npsam.tools.trace`) sets it for its duration.

Values derived from the weights (transposed weights, centred upscaling
weights, positional tables, folded BatchNorm) are computed by one mechanism:
a function registered with :func:`derives` for a reference class runs when a
module of that class has loaded its weights, children before parents, and its
result (a NamedTuple) is kept as ``module.derived``. Loading weights again
computes it again (into a submodule alone: for the modules above it too); a
module whose weights are absent (a decoder-only checkpoint's image encoder)
gets ``derived = None``.

Where things are: ``ops`` (fast kernels), ``threads`` (worker threads, BLAS
threads, work arrays), and one file per reference file with fast twins:
``nn`` (the torch.nn layers), ``common``, ``transformer``, ``mask_decoder``,
``prompt_encoder``, ``transforms`` (the image resize, through Pillow).
"""

from __future__ import annotations

import contextvars
import functools
import importlib
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional, Tuple

_REFERENCE: contextvars.ContextVar[bool] = contextvars.ContextVar("npsam_reference", default=False)

# The modules of this package that register implementations; imported on the
# first call that asks for one, so that importing the reference costs nothing more.
IMPLEMENTATION_MODULES: Tuple[str, ...] = ("nn", "common", "transformer", "mask_decoder", "prompt_encoder",
                                          "image_encoder", "tiny_vit_sam", "automatic_mask_generator", "transforms",
                                          "sam")

_IMPLEMENTATIONS: Dict[Tuple[type, str], Callable] = {}
_DERIVERS: Dict[type, Callable] = {}
_loaded = False


@contextmanager
def reference(enabled: bool = True) -> Iterator[None]:
    """Run the reference modules (``enabled=True``) or the fast layer
    (``enabled=False``) inside the block, in this thread or task only."""
    token = _REFERENCE.set(bool(enabled))
    try:
        yield
    finally:
        _REFERENCE.reset(token)


def using_reference() -> bool:
    """True inside ``with npsam.reference():``."""
    return _REFERENCE.get()


def implements(cls: type, method: str = "forward") -> Callable[[Callable], Callable]:
    """Register ``fn(self, *args, **kwargs)`` as the fast implementation of
    ``cls.method`` (the reference class itself, not its subclasses)."""
    def register(fn: Callable) -> Callable:
        key = (cls, method)
        if key in _IMPLEMENTATIONS and _IMPLEMENTATIONS[key] is not fn:
            raise ValueError(f"{cls.__qualname__}.{method} has a fast implementation already: "
                             f"{_IMPLEMENTATIONS[key].__module__}.{_IMPLEMENTATIONS[key].__qualname__}")
        _IMPLEMENTATIONS[key] = fn
        fn.replaces = f"{cls.__module__}.{cls.__qualname__}.{method}"
        return fn
    return register


def derives(cls: type) -> Callable[[Callable], Callable]:
    """Register ``fn(module) -> NamedTuple``, run once a ``cls`` module has its
    weights (see :func:`derive`)."""
    def register(fn: Callable) -> Callable:
        if cls in _DERIVERS and _DERIVERS[cls] is not fn:
            raise ValueError(f"{cls.__qualname__} has a deriver already: {_DERIVERS[cls].__qualname__}")
        _DERIVERS[cls] = fn
        return fn
    return register


def _load() -> None:
    global _loaded
    if not _loaded:
        for name in IMPLEMENTATION_MODULES:
            importlib.import_module(f"{__name__}.{name}")
        _loaded = True


def implementation(obj: object, method: str = "forward") -> Optional[Callable]:
    """The fast function for ``type(obj).method``, or None: on the reference
    path (``with npsam.reference():``), when the fast layer has none, or when
    ``obj`` has no derived values because its weights are absent (the
    reference then says which weights are missing)."""
    if _REFERENCE.get():
        return None
    if not _loaded:
        _load()
    if type(obj) in _DERIVERS and obj.__dict__.get("derived") is None:
        return None  # never loaded, or loaded without these weights
    return _IMPLEMENTATIONS.get((type(obj), method))


def dispatch(method: Callable) -> Callable:
    """Decorator for a reference method other than ``forward`` that has a fast
    twin (registered with ``implements(Class, "method")``): calling it runs the
    twin unless the switch says reference. ``method.reference`` is the plain one."""
    name = method.__name__

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        impl = implementation(self, name)
        return method(self, *args, **kwargs) if impl is None else impl(self, *args, **kwargs)

    call.reference = method
    return call


def derive(module: object) -> None:
    """Compute ``module.derived`` from its loaded weights, if its class has a
    deriver (called by ``Module.load_state_dict``, children before parents);
    None while the module's weights are not all loaded."""
    if not _loaded:
        _load()
    fn = _DERIVERS.get(type(module))
    if fn is not None:
        object.__setattr__(module, "derived", fn(module) if module.is_loaded() else None)
