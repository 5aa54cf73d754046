"""The package is whole when installed: a wheel (what `pip install .` builds)
carries every subpackage and the shipped weights, and an npsam installed from it
segments a photo with nothing else (no repository checkout beside it)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out)], check=True, capture_output=True, text=True)
    (found,) = out.glob("npsam-*.whl")
    return found


def test_wheel_carries_every_subpackage_and_the_weights(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in sorted(p.relative_to(ROOT) for p in (ROOT / "npsam").rglob("__init__.py")):
        assert str(package) in names, f"{package} is missing from the wheel"
    for weights in sorted((ROOT / "npsam" / "weights").glob("*.safetensors")):
        name = str(weights.relative_to(ROOT))
        assert name in names, f"{name} is missing from the wheel"
        with zipfile.ZipFile(wheel).open(name) as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(weights.read_bytes()).digest()
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)


def test_installed_wheel_segments_a_photo_on_its_own(wheel, tmp_path):
    """Unpacked as pip would install it, run from an empty folder: the shipped
    weights are found inside the package, not in a checkout."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    photo = ROOT / "assets" / "images" / "truck.jpg"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NPSAM_WEIGHTS")}
    env["PYTHONPATH"] = str(site)
    code = ("import sys, npsam.tools.cli as cli; assert cli.__file__.startswith(sys.argv[1]), cli.__file__; "
            "sys.exit(cli.main(['segment', sys.argv[2], '--point', '500,375', '-o', 'out']))")
    proc = subprocess.run([sys.executable, "-c", code, str(site), str(photo)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (work / "out" / "overlay.png").stat().st_size > 0
    assert (work / "out" / "result.json").is_file()
