"""Segment everything: npsam against the official PyTorch generator, and
folder throughput serial against Dask.

    python scripts/bench_everything.py                       # dog.jpg and truck.jpg, 32x32 points; folders
    python scripts/bench_everything.py --photos dog.jpg --points-per-side 16 --no-folders
    python scripts/bench_everything.py --rounds 3 --no-folders  # each photo 3 times, engines alternated

Each engine runs in its own process (so they never share the two cores or the
peak-memory figure): npsam's SamAutomaticMaskGenerator on the shipped MobileSAM
weights, and the official segment_anything SamAutomaticMaskGenerator on the
official MobileSAM modules (mobile_sam) loaded with the same weights, the same
options. Reported per photo: wall time of generate() (the image encoder
included, the model's loading not), peak RSS (VmHWM, plus the largest of its
worker processes': npsam forks one on small photos), mask count, and the
agreement of the records (same count, each record's mask IoU, boxes, points,
crop boxes; largest predicted_iou and stability_score differences).

With --rounds N each photo runs N times per engine, the engines alternating
which goes first from round to round (so neither always follows the other's
600 MB-4 GB process); every round's row is printed, then the medians and the
ratio of the medians. One round's ratio reads the machine as much as the code:
the official generator's own time moved by a third between runs here.

Folders: npsam.dataset.segment_photos on a folder of copies of the three
example photos, serially and on a local Dask cluster (--workers), each in its
own process: photos per minute.

Needs the test extra (torch, segment-anything, mobilesam-mirror, pycocotools)
and npsam[dask]. The official generator imports torchvision for its NMS; as
in the tests, a stand-in for torchvision.ops.boxes (pure torch) is installed.
Like scripts/bench.py, the children run with OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE unset, so that OpenBLAS picks its kernel for this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = ("dog.jpg", "truck.jpg")


def peak_rss_mb() -> float:
    """This process's peak RSS plus the largest of its children's (npsam's worker
    processes): an upper bound of the two together, the pages they share counted twice."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 + children
    return float("nan")


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.path.join(ROOT, "tests")
    return env


def run_engine(engine: str, photo: str, points_per_side: int, out: str) -> None:
    """In this (child) process: one generator on one photo; records (COCO RLE) and figures to ``out``."""
    sys.path.insert(0, ROOT)
    import numpy as np

    from npsam.build_sam import read_state_dict
    from npsam.io.image_io import load_image
    from npsam.tools.cli import load_model, shipped_weights

    image = load_image(os.path.join(ROOT, "assets", "images", photo))
    options = dict(points_per_side=points_per_side, output_mode="coco_rle")
    if engine == "npsam":
        from npsam.automatic_mask_generator import SamAutomaticMaskGenerator

        sam, _ = load_model(None, None)
        generator = SamAutomaticMaskGenerator(sam, **options)
        start = time.perf_counter()
        records = generator.generate(image)
        seconds = time.perf_counter() - start
    else:
        import torch

        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import oracle
        from npsam.tools.crosscheck import build_official

        oracle.segment_anything()  # the official package with the torchvision stand-in
        from segment_anything.automatic_mask_generator import SamAutomaticMaskGenerator
        from segment_anything.modeling import Sam

        state = read_state_dict(shipped_weights())
        root, _ = build_official("mobile_sam", state, "vit_t", np.float32)
        sam = Sam(image_encoder=root.image_encoder, prompt_encoder=root.prompt_encoder,
                  mask_decoder=root.mask_decoder).eval()
        generator = SamAutomaticMaskGenerator(sam, **options)
        with torch.no_grad():
            start = time.perf_counter()
            records = generator.generate(image)
            seconds = time.perf_counter() - start
    for r in records:
        r["point_coords"] = [[float(v) for v in p] for p in r["point_coords"]]
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "records": records}, f)


def agreement(ours: list, theirs: list) -> dict:
    from pycocotools import mask as mask_utils

    import numpy as np

    result = {"same_count": len(ours) == len(theirs), "min_mask_iou": None, "same_boxes_points_crops": None,
              "max_iou_pred_diff": None, "max_stability_diff": None}
    if not result["same_count"] or not ours:
        return result
    ious, same = [], True
    for o, t in zip(ours, theirs):
        a, b = mask_utils.decode(o["segmentation"]).astype(bool), mask_utils.decode(t["segmentation"]).astype(bool)
        union = np.logical_or(a, b).sum()
        ious.append(float(np.logical_and(a, b).sum() / union) if union else 1.0)
        same &= all(o[k] == t[k] for k in ("bbox", "point_coords", "crop_box"))
    result.update(min_mask_iou=min(ious), same_boxes_points_crops=same,
                  max_iou_pred_diff=max(abs(o["predicted_iou"] - t["predicted_iou"]) for o, t in zip(ours, theirs)),
                  max_stability_diff=max(abs(o["stability_score"] - t["stability_score"])
                                         for o, t in zip(ours, theirs)))
    return result


def run_folder(folder: str, out: str, workers: int, points_per_side: int, result: str) -> None:
    """In this (child) process: segment_photos on the folder; photos per minute to ``result``."""
    sys.path.insert(0, ROOT)
    from npsam.dataset import segment_photos

    start = time.perf_counter()
    summary = segment_photos([folder], out, {"points_per_side": points_per_side}, workers=workers or None)
    seconds = time.perf_counter() - start
    with open(result, "w") as f:
        json.dump({"seconds": seconds, "photos": len(summary.done), "failed": summary.failed,
                   "photos_per_min": 60 * len(summary.done) / seconds}, f)


def child(args: list) -> None:
    subprocess.run([sys.executable, os.path.abspath(__file__), *args], check=True, env=child_env(), cwd=ROOT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", nargs="+", default=list(PHOTOS))
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--folder-photos", type=int, default=6, help="photos in the folder runs (default 6)")
    parser.add_argument("--folder-points-per-side", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-folders", action="store_true")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each engine per photo (default 1)")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--photo", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine:
        run_engine(args.engine, args.photo, args.points_per_side, args.out)
        return 0
    if args.folder:
        run_folder(args.folder, args.out + ".dir", args.workers, args.folder_points_per_side, args.out)
        return 0

    work = tempfile.mkdtemp(prefix="bench_everything.")
    try:
        print(f"# Segment everything, {args.points_per_side}x{args.points_per_side} points, official defaults "
              f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores)\n")
        print("| photo | engine | time (s) | peak RSS (MB) | masks | npsam / PyTorch time | agreement |")
        print("|---|---|---|---|---|---|---|")
        for photo in args.photos:
            seconds = {"npsam": [], "torch": []}
            for r in range(args.rounds):
                figures = {}
                for engine in ("npsam", "torch") if r % 2 == 0 else ("torch", "npsam"):
                    out = os.path.join(work, f"{engine}_{photo}.json")
                    child(["--engine", engine, "--photo", photo, "--points-per-side", str(args.points_per_side),
                           "--out", out])
                    with open(out) as f:
                        figures[engine] = json.load(f)
                    seconds[engine].append(figures[engine]["seconds"])
                agree = agreement(figures["npsam"]["records"], figures["torch"]["records"])
                ratio = figures["npsam"]["seconds"] / figures["torch"]["seconds"]
                label = photo if args.rounds == 1 else f"{photo}, round {r + 1}"
                for engine in ("npsam", "torch"):
                    f = figures[engine]
                    print(f"| {label} | {engine} | {f['seconds']:.1f} | {f['peak_rss_mb']:.0f} | {len(f['records'])} | "
                          + (f"{ratio:.3f} | {json.dumps(agree)} |" if engine == "npsam" else " | |"), flush=True)
            if args.rounds > 1:
                med = {e: statistics.median(v) for e, v in seconds.items()}
                print(f"| **{photo}, median of {args.rounds}** | npsam / torch | {med['npsam']:.1f} / "
                      f"{med['torch']:.1f} | | | **{med['npsam'] / med['torch']:.3f}** | |", flush=True)
        if not args.no_folders:
            folder = os.path.join(work, "photos")
            os.makedirs(folder)
            names = ("dog.jpg", "groceries.jpg", "truck.jpg")
            for i in range(args.folder_photos):
                name = names[i % len(names)]
                shutil.copy(os.path.join(ROOT, "assets", "images", name), os.path.join(folder, f"{i:03d}_{name}"))
            print(f"\n# Folder of {args.folder_photos} photos, {args.folder_points_per_side}x"
                  f"{args.folder_points_per_side} points\n")
            print("| run | photos | time (s) | photos/min |")
            print("|---|---|---|---|")
            for workers in (0, args.workers):
                out = os.path.join(work, f"folder_{workers}.json")
                child(["--folder", folder, "--out", out, "--workers", str(workers),
                       "--folder-points-per-side", str(args.folder_points_per_side)])
                with open(out) as f:
                    r = json.load(f)
                label = "serial" if not workers else f"Dask, {workers} local workers"
                print(f"| {label} | {r['photos']} | {r['seconds']:.1f} | {r['photos_per_min']:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
