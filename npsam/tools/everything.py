"""npsam everything: the automatic mask generator, on one photo or a dataset.

One photo file gives the masks as pictures (mask_000.png ..., overlay.png,
masks.json); folders, globs or several photos give a dataset (npsam.dataset):
an SA-1B-style annotations file per photo and one COCO file for the run,
resumable, in this process or on Dask (--workers, --scheduler).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict

from .cli import (CliError, _check_out_dir, _fraction, _natural, _positive_int, add_model_arguments, load_embedding,
                  load_model, load_photo, write_json, write_outputs)

EXAMPLES = """Examples:
  npsam everything assets/images/dog.jpg -o out/dog_all
  npsam everything assets/images/groceries.jpg --points-per-side 16 --min-mask-region-area 100 -o out/groceries
  npsam embed assets/images/dog.jpg -o dog_emb.npy
  npsam everything assets/images/dog.jpg --embedding dog_emb.npy --pred-iou-thresh 0.8 -o out/dog_loose
  npsam everything photos/ 'more/**/*.jpg' -o out/dataset
  npsam everything photos/ -o out/dataset --workers 4            # a local Dask cluster (npsam[dask])
  npsam everything photos/ -o out/dataset --scheduler tcp://10.0.0.5:8786

One photo file: writes into OUT mask_000.png ... (one per mask, 1-bit, the
photo's size), overlay.png (every mask in its own colour, largest first) and
masks.json (the official records, with segmentation naming the PNG file).

Folders, globs or several photos (or --dataset): writes OUT/annotations/
PHOTO.json per photo (SA-1B style: image, annotations with COCO RLE
segmentation, bbox, area, predicted_iou, stability_score, point_coords,
crop_box), OUT/coco.json for the run (pycocotools loads it) and, with
--overlays, OUT/overlays/PHOTO.png. A rerun skips photos already done (same
photo, options and weights); unreadable photos are reported and skipped, and
the exit status is 1 if any failed.
"""


def add_everything_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photos", nargs="+", metavar="PHOTO", help="photo files, folders of photos, or globs")
    official = parser.add_argument_group("the generator's options (official names and defaults)")
    official.add_argument("--points-per-side", type=_positive_int, default=32, help="grid of N x N points (default 32)")
    official.add_argument("--points-per-batch", type=_positive_int, default=64,
                          help="points per decoder run (default 64)")
    official.add_argument("--pred-iou-thresh", type=float, default=0.88,
                          help="keep masks of predicted IoU above (default 0.88)")
    official.add_argument("--stability-score-thresh", type=float, default=0.95,
                          help="keep masks of stability score above (default 0.95)")
    official.add_argument("--stability-score-offset", type=float, default=1.0,
                          help="logit offset of the stability score (default 1.0)")
    official.add_argument("--box-nms-thresh", type=_fraction, default=0.7, help="box IoU for NMS (default 0.7)")
    official.add_argument("--crop-n-layers", type=_natural, default=0, help="layers of image crops (default 0)")
    official.add_argument("--crop-nms-thresh", type=_fraction, default=0.7,
                          help="box IoU for NMS between crops (default 0.7)")
    official.add_argument("--crop-overlap-ratio", type=_fraction, default=512 / 1500,
                          help="overlap of neighbouring crops (default 512/1500)")
    official.add_argument("--crop-n-points-downscale-factor", type=_positive_int, default=1,
                          help="points per side divided by this in each crop layer (default 1)")
    official.add_argument("--point-grids", metavar="GRIDS.npz",
                          help="explicit point grids instead of --points-per-side: an .npz of [N, 2] arrays in [0, 1], "
                               "one per crop layer (arr_0, arr_1, ...)")
    official.add_argument("--min-mask-region-area", type=_natural, default=0,
                          help="remove islands and holes smaller than this many pixels (default 0: off)")
    official.add_argument("--output-mode", choices=("coco_rle", "uncompressed_rle"), default="coco_rle",
                          help="segmentation format of a dataset's files (default coco_rle)")
    parser.add_argument("--memory-limit", type=float, metavar="GIB", default=1.5,
                        help="bound on the memory of one photo's segmentation, its worker processes' included, "
                             "in GiB (default 1.5)")
    parser.add_argument("--embedding", metavar="EMB.npy",
                        help="image embedding from 'npsam embed' of the same PHOTO: skips the image encoder "
                             "(one photo, --crop-n-layers 0)")
    data = parser.add_argument_group("datasets")
    data.add_argument("--dataset", action="store_true", help="write a dataset even for one photo file")
    data.add_argument("--overlays", action="store_true", help="also write OUT/overlays/PHOTO.png")
    data.add_argument("--workers", type=_positive_int, metavar="N",
                      help="run on a local Dask cluster of N worker processes (npsam[dask])")
    data.add_argument("--scheduler", metavar="tcp://HOST:PORT", help="run on an existing Dask cluster")
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (created)")


def generator_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The official options from the flags."""
    options = dict(
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        stability_score_offset=args.stability_score_offset,
        box_nms_thresh=args.box_nms_thresh,
        crop_n_layers=args.crop_n_layers,
        crop_nms_thresh=args.crop_nms_thresh,
        crop_overlap_ratio=args.crop_overlap_ratio,
        crop_n_points_downscale_factor=args.crop_n_points_downscale_factor,
        min_mask_region_area=args.min_mask_region_area,
    )
    if args.point_grids:
        import numpy as np

        try:
            with np.load(args.point_grids, allow_pickle=False) as grids:
                arrays = [grids[f"arr_{i}"] for i in range(len(grids.files))]
        except (OSError, ValueError, KeyError) as error:
            raise CliError(f"--point-grids {args.point_grids!r}: expected an .npz of [N, 2] arrays arr_0, arr_1, ... "
                           f"({' '.join(str(error).split())})") from None
        if len(arrays) < args.crop_n_layers + 1 or any(a.ndim != 2 or a.shape[1] != 2 for a in arrays):
            raise CliError(f"--point-grids {args.point_grids!r}: expected {args.crop_n_layers + 1} arrays of shape "
                           f"[N, 2], got {[list(a.shape) for a in arrays]}")
        options.update(points_per_side=None, point_grids=arrays)
    return options


def _memory_limit(args: argparse.Namespace) -> int:
    if not args.memory_limit > 0:
        raise CliError(f"--memory-limit: expected a positive number of GiB, got {args.memory_limit}")
    return int(args.memory_limit * 2**30)


def run_everything(args: argparse.Namespace) -> int:
    """npsam everything: one photo's masks as pictures, or a dataset."""
    one_file = len(args.photos) == 1 and os.path.isfile(args.photos[0])
    if args.workers and args.scheduler:
        raise CliError("give --workers N (a local cluster) or --scheduler ADDRESS (an existing one), not both")
    if one_file and not (args.dataset or args.overlays or args.workers or args.scheduler):
        return run_one_photo(args)
    if args.embedding:
        raise CliError("--embedding is for one photo file (without --dataset)")
    return run_dataset(args)


def run_one_photo(args: argparse.Namespace) -> int:
    """The masks of one photo as pictures, masks.json and an overlay."""
    from functools import partial

    from ..automatic_mask_generator import SamAutomaticMaskGenerator
    from ..io.image_io import save_png
    from .overlay import overlay_masks
    from .progress import ProgressBar

    out = _check_out_dir(args.output)
    image = load_photo(args.photos[0])
    if args.embedding and args.crop_n_layers:
        raise CliError("--embedding needs --crop-n-layers 0 (each crop is embedded on its own)")
    embedding = load_embedding(args.embedding) if args.embedding else None
    options = generator_options(args)
    memory_limit = _memory_limit(args)
    parts = ("decoder",) if embedding is not None else ("encoder", "decoder")
    sam, model = load_model(args.checkpoint, args.model_type, parts)
    encoder_bar, mask_bar = ProgressBar("image encoder"), ProgressBar("masks")
    generator = SamAutomaticMaskGenerator(sam, progress=mask_bar, memory_limit=memory_limit, **options)
    generator.check_memory(image.shape[:2])  # before the model runs
    # The generator embeds each crop itself (predictor.set_image): give those
    # calls the encoder's bar, or, with --embedding, the given embedding (one
    # crop: the whole photo).
    if embedding is None:
        generator.predictor.set_image = partial(generator.predictor.set_image, progress=encoder_bar)
    else:
        generator.predictor.set_image = lambda crop: generator.predictor.set_embedding(embedding, crop.shape[:2])
    generator.output_mode = "uncompressed_rle"  # decoded one mask at a time below
    try:
        records = generator.generate(image)
    finally:
        encoder_bar.close()
        mask_bar.close()

    from ..utils.amg import rle_to_mask

    digits = max(3, len(str(len(records) - 1)))
    names = [f"mask_{i:0{digits}d}.png" for i in range(len(records))]
    rles = [r["segmentation"] for r in records]
    overlay = overlay_masks(image, [rle_to_mask(rle) for rle in rles])
    json_options = {k: v for k, v in options.items() if k != "point_grids"}
    if args.point_grids:
        json_options["point_grids"] = os.path.abspath(args.point_grids)
    listing = {
        "image": os.path.abspath(args.photos[0]),
        "image_size": [int(image.shape[0]), int(image.shape[1])],
        "model": model,
        "options": json_options,
        "embedding": os.path.abspath(args.embedding) if args.embedding else None,
        "masks": [{**r, "segmentation": name} for r, name in zip(records, names)],
        "overlay": "overlay.png",
        "files": names + ["overlay.png"],
    }
    writers = {name: (lambda path, rle=rle: save_png(path, rle_to_mask(rle))) for name, rle in zip(names, rles)}
    writers["overlay.png"] = lambda path: save_png(path, overlay)
    writers["masks.json"] = lambda path: write_json(path, listing)
    write_outputs(out, writers, "masks.json")
    print(f"{out}: {len(records)} masks; overlay {out / 'overlay.png'}")
    return 0


class PhotoProgress:
    """``progress(done, total)`` for photos: done/total, photos per minute and
    time left, redrawn on one line of stderr when it is a terminal."""

    def __init__(self, stream=None, enabled=None) -> None:
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) if enabled is None else enabled
        self.start = time.monotonic()
        self.first = None
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if self.first is None:
            self.first = done  # photos skipped as already done
        if not self.enabled:
            return
        minutes = (time.monotonic() - self.start) / 60
        rate = (done - self.first) / minutes if minutes > 0 else 0.0
        left = f"{(total - done) / rate:.1f} min left" if rate > 0 else "time left unknown"
        filled = 30 * done // max(total, 1)
        self.stream.write(f"\rphotos [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} "
                          f"{rate:.1f} photos/min, {left}  ")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def run_dataset(args: argparse.Namespace) -> int:
    """A dataset: annotations per photo, the run's COCO file, a summary."""
    from .. import dataset

    out = _check_out_dir(args.output)
    options = generator_options(args)
    options["output_mode"] = args.output_mode
    bar = PhotoProgress()
    try:
        summary = dataset.segment_photos(args.photos, out, options, checkpoint=args.checkpoint,
                                         model_type=args.model_type, overlays=args.overlays,
                                         memory_limit=_memory_limit(args), workers=args.workers,
                                         scheduler=args.scheduler, progress=bar)
    finally:
        bar.close()
    print(f"{out}: {len(summary.done)} done, {len(summary.skipped)} skipped (done before), "
          f"{len(summary.failed)} failed; {summary.coco} ({summary.seconds:.1f} s)")
    for photo, reason in summary.failed:
        print(f"  failed: {photo}: {reason}", file=sys.stderr)
    return 0 if summary.ok else 1
