"""docs/walkthrough.md cannot rot: every ```python block runs, in order, in one
namespace (from the repository root), and what it prints must equal the
```text block that follows it, exactly.

`python tests/test_walkthrough.py --update` rewrites the text blocks from a run
(then read the diff before committing it)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "walkthrough.md"
BLOCK = re.compile(r"```(python|text)\n(.*?)```", re.S)


def blocks(text: str):
    """[(python source, expected output or None, span of the text block)]."""
    found = list(BLOCK.finditer(text))
    out = []
    for i, m in enumerate(found):
        if m.group(1) != "python":
            continue
        nxt = found[i + 1] if i + 1 < len(found) and found[i + 1].group(1) == "text" else None
        out.append((m.group(2), nxt.group(2) if nxt else None, nxt.span(2) if nxt else None))
    return out


def run_blocks(text: str):
    namespace = {"__name__": "walkthrough"}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for i, (source, expected, span) in enumerate(blocks(text)):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                exec(compile(source, f"{DOC.name} block {i + 1}", "exec"), namespace)
            yield i, source, expected, span, buf.getvalue()
    finally:
        os.chdir(cwd)


def test_walkthrough_blocks_print_what_the_document_says():
    text = DOC.read_text()
    found = blocks(text)
    assert len(found) >= 6, "the walkthrough lost its code blocks"
    for i, source, expected, _, printed in run_blocks(text):
        assert expected is not None, f"block {i + 1} has no ```text block after it"
        assert printed == expected, (f"block {i + 1} printed:\n{printed}\nbut the document says:\n{expected}")


def test_walkthrough_figures_exist():
    text = DOC.read_text()
    for name in re.findall(r"\]\(([\w-]+\.png)\)", text):
        assert (ROOT / "docs" / name).stat().st_size > 1000, name


def _update() -> None:
    text = DOC.read_text()
    edits = [(span, printed) for _, _, _, span, printed in run_blocks(text) if span]
    for (start, end), printed in reversed(edits):
        text = text[:start] + printed + text[end:]
    DOC.write_text(text)


if __name__ == "__main__":
    if "--update" in sys.argv:
        sys.path.insert(0, str(ROOT))
        _update()
