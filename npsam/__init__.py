"""npsam: Segment Anything (SAM and MobileSAM) in pure NumPy, reading the official state_dict.

The public names mirror ``segment_anything``::

    import npsam
    sam = npsam.sam_model_registry["vit_b"](checkpoint="sam_vit_b.safetensors")
    predictor = npsam.SamPredictor(sam)

Submodules are imported on first use, so ``import npsam`` costs only NumPy.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "sam_model_registry": "build_sam",
    "build_sam": "build_sam",
    "build_sam_vit_h": "build_sam",
    "build_sam_vit_l": "build_sam",
    "build_sam_vit_b": "build_sam",
    "build_sam_vit_t": "build_sam",
    "SamPredictor": "predictor",
    "SamAutomaticMaskGenerator": "automatic_mask_generator",
    "SamOnnxModel": "utils.onnx",
    "ResizeLongestSide": "utils.transforms",
    "convert": "io.convert",
    "load_image": "io.image_io",
    "reference": "fast",
}
# Submodules that stay importable as attributes of the package (npsam.trace.trace).
_MODULES = {"trace": "tools.trace"}

__all__ = sorted(_LAZY) + sorted(_MODULES) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _MODULES:
        value = import_module(f".{_MODULES[name]}", __name__)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'npsam' has no attribute {name!r}")


def __dir__():
    return __all__
