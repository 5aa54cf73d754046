"""The README's Python blocks run as written, in order, in one namespace, from the
repository root (as a reader would paste them), and print what they should."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PYTHON = re.compile(r"```python\n(.*?)```", re.S)


def test_readme_python_blocks_run_as_written():
    blocks = PYTHON.findall(README.read_text())
    assert len(blocks) >= 3, "the README's Python section lost its examples"
    namespace = {"__name__": "readme"}
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for i, source in enumerate(blocks, 1):
            with contextlib.redirect_stdout(out):
                exec(compile(source, f"README.md python block {i}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    printed = out.getvalue().splitlines()
    # block 1: the truck's window, three masks at photo size
    assert printed[0].startswith("(3, 1200, 1800) [")
    # block 3: the reference path agrees with the fast one, and the trace names the official path
    assert printed[1] == "True"
    assert printed[2] == "(1, 7, 256)"
    assert namespace["low_res"].shape == (1, 3, 256, 256)


def test_readme_commands_and_links_exist():
    text = README.read_text()
    assert len(text.splitlines()) < 200, "the README is for a five-minute read: keep it under 200 lines"
    for link in re.findall(r"\[[^\]\n]+\]\(([^)\s#]+)\)", text):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
    assert 'pip install -e ".[test]" && python -m pytest' in text
    assert (ROOT / ".ci" / "run").read_text().count('pip install -e ".[test]" && python -m pytest') == 1
