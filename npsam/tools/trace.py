"""Trace every intermediate value of an npsam model, named by the official module path.

    with npsam.tools.trace.trace(sam) as t:
        masks, iou = sam.mask_decoder(...)
    t["mask_decoder.transformer.layers.0.cross_attn_token_to_image"].output   # [B, T, C]
    for r in t: print(r.name, r.in_shapes, r.out_shapes)

This is the equivalent of registering a forward hook on every module of the
official PyTorch model: ``npsam.kernels.nn.Module.__call__`` calls ``npsam.kernels.nn._hook``
after ``forward``, and the names are the same dotted paths that
``torch.nn.Module.named_modules()`` gives, because npsam keeps the official
module tree (Linear, LayerNorm, Sequential children, activation modules such
as ``mask_decoder.output_upscaling.2``, the GELU). When no trace is open the
hook is ``None`` and calling a module costs one global lookup more.

A trace runs the reference path (``with npsam.reference():`` for its
duration, in this thread): every module computes its official ``forward``
through ``__call__``, so every intermediate is the official one, in the
official association, and nothing needs patching.

NOTE(reference): official code calls some methods directly rather than
through ``__call__`` (``pe_layer.forward_with_coords``, ``predict_masks``);
torch hooks do not see those either, so both traces hold the same modules.

Dimension letters: none; this file records shapes, it does not change them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .. import fast
from ..kernels import nn


@dataclass
class Record:
    """One module call: its official path, class, input shapes (positional
    and keyword) and output.

    ``output`` is a copy (an array, or a tuple of arrays/other values), taken
    when the call returned, so later in-place updates do not change it.
    ``call`` counts earlier calls of the same module within the trace (0 for
    the first); ``key`` is ``name`` for the first call and ``name#k`` after.
    """

    name: str
    type: str
    in_shapes: Tuple[Any, ...]
    output: Any
    call: int = 0
    in_kw_shapes: Dict[str, Any] = field(default_factory=dict)
    inputs: Optional[Tuple[Any, ...]] = None  # copies of the array arguments, with trace(inputs=True)

    @property
    def key(self) -> str:
        return self.name if self.call == 0 else f"{self.name}#{self.call}"

    @property
    def out_shapes(self) -> Any:
        return shape_of(self.output)

    def arrays(self) -> List[np.ndarray]:
        """The output's arrays in order (one for a plain module, more for tuples)."""
        return [a for a in _flatten(self.output) if isinstance(a, np.ndarray)]


@dataclass
class Trace:
    """The records of one ``trace`` context, in call order (post-order: a
    module is recorded after its children, as torch forward hooks fire)."""

    records: List[Record] = field(default_factory=list)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: str) -> Record:
        for r in self.records:
            if r.key == key:
                return r
        raise KeyError(f"no traced call named {key!r}; traced: {', '.join(r.key for r in self.records[:8])}"
                       + (" ..." if len(self.records) > 8 else ""))

    def __contains__(self, key: str) -> bool:
        return any(r.key == key for r in self.records)

    def names(self) -> List[str]:
        return [r.key for r in self.records]

    def outputs(self) -> Dict[str, Any]:
        """key -> output, in call order."""
        return {r.key: r.output for r in self.records}


def shape_of(value: Any) -> Any:
    """Shapes of a call's argument or output: arrays -> tuple of ints, tuples
    and lists -> tuples of shapes, None/bool/int -> the value itself."""
    if isinstance(value, np.ndarray):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(shape_of(v) for v in value)
    if isinstance(value, (type(None), bool, int, float, str)):
        return value
    return type(value).__name__


def _flatten(value: Any) -> List[Any]:
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _flatten(v)]
    return [value]


def _copy(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return np.array(value, copy=True)  # also materialises broadcast views
    if isinstance(value, (tuple, list)):
        return tuple(_copy(v) for v in value)
    return value


@contextmanager
def trace(root: nn.Module, *, copy: bool = True, inputs: bool = False,
          select: Optional[Callable[[str], bool]] = None) -> Iterator[Trace]:
    """Record every call of ``root`` or of a module under it while the context is open.

    Re-entrant: an enclosing trace (or any other hook) keeps receiving calls,
    and the previous hook is restored on exit, even on error. Modules outside
    ``root``'s tree are not recorded here. ``copy=False`` keeps references to
    the outputs instead of copies (cheaper, but in-place updates show through).
    ``inputs=True`` also keeps copies of each call's array arguments (positional,
    then keyword, in call order). ``select(name)`` chooses which modules to
    record (e.g. skip the image encoder's large inner activations).
    """
    if not isinstance(root, nn.Module):
        raise ValueError(f"root: expected an npsam.kernels.nn.Module, got {type(root).__name__}")
    if not any(m.name for _, m in root.named_modules()):
        root.set_names()  # a tree built by hand: name it from this root
    members = {id(m) for _, m in root.named_modules()}
    result = Trace()
    counts: Dict[str, int] = {}
    previous: Optional[Any] = nn._hook

    def hook(module, args, kwargs, output):
        if id(module) in members and (select is None or select(module.name)):
            name = module.name
            call = counts.get(name, 0)
            counts[name] = call + 1
            result.records.append(Record(
                name, type(module).__name__, tuple(shape_of(a) for a in args),
                _copy(output) if copy else output, call, {k: shape_of(v) for k, v in kwargs.items()},
                _copy(tuple(args) + tuple(kwargs.values())) if inputs else None))
        if previous is not None:
            previous(module, args, kwargs, output)

    nn._hook = hook
    try:
        with fast.reference():  # a trace records the reference modules' own calls
            yield result
    finally:
        nn._hook = previous

