"""The little of ``torch.nn.Module`` that npsam needs.

A module declares its parameters by official leaf name and shape when it is
built, holds its children under their official attribute names, and gets its
arrays from ``load_state_dict``. ``named_modules`` and ``state_dict`` give the
same dotted names as PyTorch, so a state_dict moves between the two unchanged.

Calling a module runs ``forward``; while a :func:`npsam.trace.trace` context is
open, the call is also recorded under the module's official path (the
equivalent of a forward hook). When no trace is open the cost is one global
lookup per call.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

# Set by npsam.trace while a trace is open; a callable (module, args, kwargs, output).
_hook: Optional[Callable] = None


class WeightsMissingError(ValueError):
    """A module was called whose weights were never loaded (e.g. a decoder-only file)."""


class Module:
    """Base class: declared parameters, named children, tracing hook."""

    def __init__(self) -> None:
        object.__setattr__(self, "_shapes", {})  # leaf name -> declared shape
        object.__setattr__(self, "_params", {})  # leaf name -> np.ndarray, once loaded
        object.__setattr__(self, "_modules", {})  # attribute name -> child Module
        object.__setattr__(self, "name", "")  # official dotted path, set by set_names()

    # -- structure -----------------------------------------------------
    def register_parameter(self, name: str, shape: Tuple[int, ...]) -> None:
        """Declare a parameter (or buffer) of the official state_dict."""
        self._shapes[name] = tuple(int(s) for s in shape)

    def __setattr__(self, key, value) -> None:
        if isinstance(value, Module):
            self._modules[key] = value
        object.__setattr__(self, key, value)

    def __getattr__(self, key):
        # Only called when normal lookup fails: parameters live in _params.
        shapes = object.__getattribute__(self, "_shapes")
        if key in shapes:
            params = object.__getattribute__(self, "_params")
            if key not in params:
                where = object.__getattribute__(self, "name") or type(self).__name__
                raise WeightsMissingError(
                    f"weights for {where}.{key} are not loaded (expected shape {shapes[key]}); "
                    "load a checkpoint that contains this module"
                )
            return params[key]
        raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")

    def children(self) -> Iterator[Tuple[str, "Module"]]:
        return iter(self._modules.items())

    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, "Module"]]:
        yield prefix, self
        for key, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{key}" if prefix else key)

    def set_names(self, prefix: str = "") -> "Module":
        """Give every module its official dotted path (used by tracing and errors)."""
        for path, module in self.named_modules(prefix):
            object.__setattr__(module, "name", path)
        return self

    def state_dict_shapes(self, prefix: str = "") -> Dict[str, Tuple[int, ...]]:
        """Official key -> shape, for every parameter and buffer of this module tree."""
        out: Dict[str, Tuple[int, ...]] = {}
        for path, module in self.named_modules(prefix):
            for leaf, shape in module._shapes.items():
                out[f"{path}.{leaf}" if path else leaf] = shape
        return out

    def state_dict(self, prefix: str = "") -> Dict[str, np.ndarray]:
        """Official key -> array for every loaded parameter."""
        out: Dict[str, np.ndarray] = {}
        for path, module in self.named_modules(prefix):
            for leaf, arr in module._params.items():
                out[f"{path}.{leaf}" if path else leaf] = arr
        return out

    def num_parameters(self) -> int:
        return sum(int(np.prod(s)) for s in self.state_dict_shapes().values())

    def is_loaded(self) -> bool:
        return all(
            set(m._params) == set(m._shapes) for _, m in self.named_modules()
        )

    # -- weights -------------------------------------------------------
    def load_state_dict(self, state_dict: Dict[str, np.ndarray], dtype=np.float32, prefix: str = "") -> None:
        """Assign arrays by official key. Keys and shapes must already be checked
        (see npsam.weights.check_state_dict); this only casts and stores."""
        for path, module in self.named_modules(prefix):
            for leaf in module._shapes:
                key = f"{path}.{leaf}" if path else leaf
                if key in state_dict:
                    arr = np.asarray(state_dict[key])
                    if arr.dtype.kind == "f":
                        arr = np.ascontiguousarray(arr, dtype=dtype)
                    module._params[leaf] = arr
            module.on_load(dtype)

    def on_load(self, dtype) -> None:
        """Hook for derived, per-load constants (e.g. folded BatchNorm). Default: nothing."""

    # -- calling -------------------------------------------------------
    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        if _hook is not None:
            _hook(self, args, kwargs, out)
        return out

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for key, child in self._modules.items():
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({key}): {child_repr}")
        if len(lines) == 1:
            return lines[0] + ")"
        return "\n".join(lines) + "\n)"


class ModuleList(Module):
    """Mirror of torch.nn.ModuleList: children named "0", "1", ..."""

    def __init__(self, modules: Iterable[Module] = ()) -> None:
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __getitem__(self, i: int) -> Module:
        return self._modules[str(i)]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())


class Sequential(ModuleList):
    """Mirror of torch.nn.Sequential: children called in order; the official
    indexes are kept (e.g. output_upscaling.0/.1/.3 with GELUs at 2 and 4)."""

    def forward(self, x):
        for m in self:
            x = m(x)
        return x


def modules_with_params(root: Module) -> List[Tuple[str, Module]]:
    return [(p, m) for p, m in root.named_modules() if m._shapes]
