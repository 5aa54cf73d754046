"""Every intermediate of an official module tree against npsam's reference path.

The official side registers a forward hook on every module (named by
``named_modules()``); npsam's side runs under :func:`npsam.trace.trace`, which
runs the reference path and records each module call under the same dotted
name. Each call present in both is compared, in call order, and the test
fails at the first one that differs, naming it and printing ours and theirs.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import numpy as np
import torch

from tolerances import assert_close

import npsam
from npsam.tools.trace import trace


def official_outputs(module: torch.nn.Module, run: Callable[[], object],
                     prefix: str = "") -> Dict[str, List[np.ndarray]]:
    """Run ``run()`` with a forward hook on every submodule of ``module``:
    prefix + name (``name#k`` for the k-th repeated call) -> the output's arrays."""
    captured: Dict[str, List[np.ndarray]] = {}
    counts: Dict[str, int] = {}

    def make_hook(name):
        def hook(_module, _args, output):
            call = counts.get(name, 0)
            counts[name] = call + 1
            outs = output if isinstance(output, (tuple, list)) else (output,)
            captured[name if call == 0 else f"{name}#{call}"] = [
                o.detach().numpy().copy() for o in outs if isinstance(o, torch.Tensor)]
        return hook

    handles = [m.register_forward_hook(make_hook((prefix + name) if name else prefix.rstrip(".")))
               for name, m in module.named_modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return captured


def compare_intermediates(theirs: Dict[str, List[np.ndarray]], ours_root, run: Callable[[], object],
                          tol: float, what: str) -> Dict[str, float]:
    """Trace ``run()`` on npsam's reference path and compare every traced call
    with the official call of the same name, which must exist (npsam keeps the
    official module tree). Returns name -> scaled error."""
    assert not npsam.fast.using_reference(), "the trace itself must choose the reference path"
    with trace(ours_root) as t:
        run()
    unmatched = [r.key for r in t if r.key not in theirs]
    assert not unmatched, f"{what}: traced calls with no official twin: {unmatched[:8]}"
    errors = {}
    for record in t:
        arrays = record.arrays()
        assert len(arrays) == len(theirs[record.key]), f"{what}: {record.key} returns {len(arrays)} arrays"
        for i, (o, e) in enumerate(zip(arrays, theirs[record.key])):
            errors[record.key] = max(errors.get(record.key, 0.0),
                                     assert_close(o, e, tol, f"{what}: {record.key}[{i}] ({record.type})"))
    assert errors, f"{what}: nothing traced"
    return errors
