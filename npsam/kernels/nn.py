"""The little of ``torch.nn.Module`` that npsam needs.

A module declares its parameters by official leaf name and shape when it is
built, holds its children under their official attribute names, and gets its
arrays from ``load_state_dict``. ``named_modules`` and ``state_dict`` give the
same dotted names as PyTorch, so a state_dict moves between the two unchanged.

Calling a module runs its fast implementation when the fast layer has one
and the switch allows it (:func:`npsam.fast.implementation`), else its
reference ``forward``: the layers below are the reference (plain
``torch.nn.functional`` mathematics, :mod:`npsam.kernels.ops`); their fast
twins are in :mod:`npsam.fast.nn`. While a :func:`npsam.tools.trace.trace`
context is open (which runs the reference path), each call is also recorded
under the module's official path (the equivalent of a forward hook).

Dimension letters (the layers below): B batch, N tokens, C channels in,
O channels out, H/W height/width, K kernel size.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from .. import fast

# Set by npsam.tools.trace while a trace is open; a callable (module, args, kwargs, output).
# It records calls; it never chooses a path (the switch in npsam.fast does).
_hook: Optional[Callable] = None


class WeightsMissingError(ValueError):
    """A module was called whose weights were never loaded (e.g. a decoder-only file)."""


class Module:
    """Base class: declared parameters, named children, tracing hook."""

    def __init__(self) -> None:
        object.__setattr__(self, "_shapes", {})  # leaf name -> declared shape
        object.__setattr__(self, "_optional", set())  # leaves a checkpoint may omit (unused by inference)
        object.__setattr__(self, "_params", {})  # leaf name -> np.ndarray, once loaded
        object.__setattr__(self, "_modules", {})  # attribute name -> child Module
        object.__setattr__(self, "name", "")  # official dotted path, set by set_names()
        object.__setattr__(self, "_parent", None)  # weak reference to the module holding this one

    # -- structure -----------------------------------------------------
    def register_parameter(self, name: str, shape: Tuple[int, ...], optional: bool = False) -> None:
        """Declare a parameter (or persistent buffer) of the official state_dict.

        ``optional`` marks entries inference never reads (e.g. TinyViT's
        classification head), which a checkpoint may leave out."""
        self._shapes[name] = tuple(int(s) for s in shape)
        if optional:
            self._optional.add(name)

    def __setattr__(self, key, value) -> None:
        if isinstance(value, Module):
            self._modules[key] = value
            object.__setattr__(value, "_parent", weakref.ref(self))
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

    def optional_keys(self, prefix: str = "") -> set:
        return {f"{path}.{leaf}" if path else leaf
                for path, module in self.named_modules(prefix) for leaf in module._optional}

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
        return all(set(m._shapes) - m._optional <= set(m._params) for _, m in self.named_modules())

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
        # Values derived from the weights, children before parents (reversed pre-order),
        # then the modules above this one, whose derived values may read these weights.
        for _, module in reversed(list(self.named_modules(prefix))):
            fast.derive(module)
        parent = self._parent() if self._parent is not None else None
        while parent is not None:
            fast.derive(parent)
            parent = parent._parent() if parent._parent is not None else None

    # -- calling -------------------------------------------------------
    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        impl = fast.implementation(self)  # None on the reference path
        out = self.forward(*args, **kwargs) if impl is None else impl(self, *args, **kwargs)
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


# ---------------------------------------------------------------------------
# The torch.nn layers SAM uses, with their official parameter names and layouts.
# Shapes: [..., C] for Linear/LayerNorm; [B, C, H, W] for convolutions.
# ---------------------------------------------------------------------------
from . import ops  # noqa: E402  (after Module so ops stays free of nn)


class Linear(Module):
    """Mirror of nn.Linear: weight (out, in), bias (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_parameter("weight", (out_features, in_features))
        self.has_bias = bias
        if bias:
            self.register_parameter("bias", (out_features,))

    def forward(self, x: np.ndarray) -> np.ndarray:
        return ops.linear(x, self.weight, self.bias if self.has_bias else None)  # [..., in] -> [..., out]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class LayerNorm(Module):
    """Mirror of nn.LayerNorm over the last dimension. NOTE(reference): eps 1e-5
    by default (the TwoWayTransformer); the ViT passes 1e-6."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.normalized_shape, self.eps = normalized_shape, eps
        self.register_parameter("weight", (normalized_shape,))
        self.register_parameter("bias", (normalized_shape,))

    def forward(self, x: np.ndarray) -> np.ndarray:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"({self.normalized_shape},), eps={self.eps}"


class Embedding(Module):
    """Mirror of nn.Embedding; SAM only reads ``.weight`` directly."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_parameter("weight", (num_embeddings, embedding_dim))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Conv2d(Module):
    """Mirror of nn.Conv2d (square kernel, dilation 1): weight (O, C/groups, K, K)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        self.register_parameter("weight", (out_channels, in_channels // groups, kernel_size, kernel_size))
        self.has_bias = bias
        if bias:
            self.register_parameter("bias", (out_channels,))

    def forward(self, x: np.ndarray) -> np.ndarray:
        bias = self.bias if self.has_bias else None
        if self.kernel_size == self.stride and self.padding == 0 and self.groups == 1:
            return ops.conv2d_patchify(x, self.weight, bias)  # [B, C, H, W] -> [B, O, H/K, W/K]
        return ops.conv2d(x, self.weight, bias, self.stride, self.padding, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({self.kernel_size}, {self.kernel_size}), "
                f"stride=({self.stride}, {self.stride})")


class ConvTranspose2d(Module):
    """Mirror of nn.ConvTranspose2d with kernel 2, stride 2 (all SAM uses):
    weight (C_in, C_out, 2, 2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, stride: int = 2) -> None:
        super().__init__()
        assert kernel_size == 2 and stride == 2, "SAM only uses 2x2 stride-2 transposed convolutions"
        self.in_channels, self.out_channels = in_channels, out_channels
        self.register_parameter("weight", (in_channels, out_channels, 2, 2))
        self.register_parameter("bias", (out_channels,))

    def forward(self, x: np.ndarray) -> np.ndarray:
        return ops.conv_transpose2d_2x2(x, self.weight, self.bias)  # [B, C, H, W] -> [B, O, 2H, 2W]

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(2, 2), stride=(2, 2)"


class InPlaceActivation(Module):
    """An element-wise activation that may overwrite its input: ``forward_(x)``."""

    @fast.dispatch
    def forward_(self, x: np.ndarray) -> np.ndarray:
        """``self(x)`` for an x that nothing else holds (a layer's fresh output).
        The reference calls the module (so a trace records it); the fast layer
        writes the result into x (npsam.fast.nn)."""
        return self(x)


class GELU(InPlaceActivation):
    """Mirror of nn.GELU() (exact erf form). ``precise``: see ops.gelu."""

    precise = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        return ops.gelu(x, precise=self.precise)


class ReLU(InPlaceActivation):
    """Mirror of nn.ReLU."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        return ops.relu(x)


class BatchNorm2d(Module):
    """Mirror of nn.BatchNorm2d at inference (eval: the running statistics) over
    C of [B, C, H, W]: weight, bias, running_mean, running_var (C,) and
    num_batches_tracked (an int64 scalar, read by training only).

    NOTE(reference): ATen's CPU kernel folds the statistics per channel first,
    alpha = weight / sqrt(running_var + eps), beta = bias - running_mean * alpha,
    then computes x * alpha + beta (with fused multiply-adds, rounding once where
    this rounds twice: within an ulp).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            self.register_parameter(leaf, (num_features,))
        self.register_parameter("num_batches_tracked", ())

    def forward(self, x: np.ndarray) -> np.ndarray:
        invstd = 1 / np.sqrt(self.running_var + x.dtype.type(self.eps))  # [C]
        alpha = invstd * self.weight  # [C]
        beta = self.bias - self.running_mean * alpha  # [C]
        return x * alpha[:, None, None] + beta[:, None, None]  # [B, C, H, W] -> same

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
