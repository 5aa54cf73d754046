"""Code lines of each reference file against its official twin.

    python scripts/count_lines.py            # a markdown table
    python scripts/count_lines.py --check    # exit 1 if a modeling/ file exceeds 1.2x

Code lines leave out blank lines, comments and docstrings. The official
packages (segment-anything, mobilesam-mirror) are found with
importlib.util.find_spec, which reads no code of theirs.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 1.2  # modeling/ files: at most this many times their official twin's code lines

# npsam file -> (official package, file in it)
PAIRS = {
    "modeling/common.py": ("segment_anything", "modeling/common.py"),
    "modeling/image_encoder.py": ("segment_anything", "modeling/image_encoder.py"),
    "modeling/mask_decoder.py": ("segment_anything", "modeling/mask_decoder.py"),
    "modeling/prompt_encoder.py": ("segment_anything", "modeling/prompt_encoder.py"),
    "modeling/sam.py": ("segment_anything", "modeling/sam.py"),
    "modeling/transformer.py": ("segment_anything", "modeling/transformer.py"),
    "modeling/tiny_vit_sam.py": ("mobile_sam", "modeling/tiny_vit_sam.py"),
    "build_sam.py": ("segment_anything", "build_sam.py"),
    "predictor.py": ("segment_anything", "predictor.py"),
    "automatic_mask_generator.py": ("segment_anything", "automatic_mask_generator.py"),
    "utils/amg.py": ("segment_anything", "utils/amg.py"),
    "utils/transforms.py": ("segment_anything", "utils/transforms.py"),
    "utils/onnx.py": ("segment_anything", "utils/onnx.py"),
}


def code_lines(path: Path) -> int:
    """Lines that are neither blank, nor comments, nor part of a docstring."""
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    return sum(1 for i, line in enumerate(source.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in docstrings)


def official_root(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{package} is not installed: pip install -e '.[test]'")
    return Path(spec.origin).parent


def table() -> list:
    rows = []
    for ours, (package, theirs) in PAIRS.items():
        n, o = code_lines(ROOT / "npsam" / ours), code_lines(official_root(package) / theirs)
        rows.append((ours, f"{package}/{theirs}", n, o, n / o))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 if a modeling/ file exceeds {LIMIT}x")
    args = parser.parse_args()
    rows = table()
    print("| npsam | official | code lines | official | ratio |\n|---|---|---|---|---|")
    for ours, theirs, n, o, r in rows:
        print(f"| `{ours}` | `{theirs}` | {n} | {o} | {r:.2f} |")
    over = [ours for ours, _, _, _, r in rows if ours.startswith("modeling/") and r > LIMIT]
    if args.check and over:
        print(f"over {LIMIT}x: {', '.join(over)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
