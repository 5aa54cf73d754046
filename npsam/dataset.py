"""Segment everything over folders of photos: one SA-1B-style file per photo,
one COCO dataset file per run, resumable, in-process or on Dask.

    from npsam.dataset import segment_photos
    summary = segment_photos(["photos/"], "out/", options={"points_per_side": 32})
    summary = segment_photos(["photos/*.jpg"], "out/", workers=4)          # a local Dask cluster
    summary = segment_photos(["photos/"], "out/", scheduler="tcp://host:8786")

Writes, into the output folder:

- ``annotations/<photo>.json`` per photo, as SA-1B: an ``image`` record
  (``image_id``, ``file_name``, ``width``, ``height``) and ``annotations``, the
  official generator's records (``segmentation`` as COCO RLE, ``bbox``,
  ``area``, ``predicted_iou``, ``stability_score``, ``point_coords``,
  ``crop_box``, plus an ``id``), and an ``npsam`` record: the key it was made
  for (the photo's content, the options and the weights), so that a rerun
  skips it;
- ``coco.json`` for the whole run: ``images``, ``annotations`` (category 1,
  ``iscrowd`` 0, the same fields) and ``categories``, which pycocotools loads;
- ``overlays/<photo>.png`` with ``overlays=True``: every mask over the photo.

Nothing lost, nothing twice: each file is written to a temporary name and
renamed, so it is whole or absent; a photo whose annotations file holds its
key is done and skipped; an unreadable photo is reported and skipped; the COCO
file is assembled from the annotations files of the run's photos, in the
order of their paths, so it is the same however the photos were processed
(serially, on any number of workers, over several interrupted runs).

On Dask (``pip install "npsam[dask]"``) every worker loads the model once and
keeps it (one per process, by weights); the photos and the output folder
must be reachable at the same paths from every worker (a local cluster, or
shared storage). A worker that dies mid-photo leaves at most a temporary
file; Dask runs the photo again elsewhere, and its result is written once.
Workers compute what a serial run computes with the same thread settings
(NPSAM_NUM_THREADS and the BLAS's): a local cluster's workers inherit this
process's environment; start a remote cluster's workers with the same.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .io.files import atomic_write

# The official generator's options, with the official defaults. point_grids
# (a list of arrays) is given as a list of [N, 2] lists; output_mode is the
# files' segmentation format.
OPTIONS: Dict[str, Any] = dict(
    points_per_side=32,
    points_per_batch=64,
    pred_iou_thresh=0.88,
    stability_score_thresh=0.95,
    stability_score_offset=1.0,
    box_nms_thresh=0.7,
    crop_n_layers=0,
    crop_nms_thresh=0.7,
    crop_overlap_ratio=512 / 1500,
    crop_n_points_downscale_factor=1,
    point_grids=None,
    min_mask_region_area=0,
    output_mode="coco_rle",
)
OUTPUT_MODES = ("coco_rle", "uncompressed_rle")
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
COCO_FILE = "coco.json"
ANNOTATIONS = "annotations"
OVERLAYS = "overlays"
FORMAT = "npsam-everything-1"  # the annotations files' layout, part of their key


@dataclass
class Summary:
    """What a run did: photos segmented now, skipped (done before), failed (with reasons)."""
    done: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)
    coco: Optional[str] = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class Model:
    """Which weights: checkpoint files (None: the shipped ones) and model type."""
    checkpoint: Optional[Tuple[str, ...]] = None
    model_type: Optional[str] = None


@dataclass(frozen=True)
class Job:
    """One photo to segment: everything a worker needs, small enough to ship."""
    photo: str  # absolute path
    name: str  # file stem of its outputs
    key: str  # sha256 of the photo, the options, the weights and FORMAT
    image_id: int
    out: str  # the output folder, absolute
    options: Tuple[Tuple[str, Any], ...]
    model: Model
    overlay: bool
    memory_limit: Optional[int]


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------
def find_photos(inputs: Sequence[str]) -> List[Path]:
    """Photos named by ``inputs``: files, folders (their photos, not recursing),
    globs (``**`` recurses). Sorted, each once; ValueError for an input that
    names nothing."""
    found = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS]
            if not matches:
                raise ValueError(f"photos: folder {item!r} holds no photos ({', '.join(PHOTO_EXTENSIONS)})")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(item):
            matches = [Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file()]
            if not matches:
                raise ValueError(f"photos: pattern {item!r} matches no file")
        else:
            raise ValueError(f"photos: no such file or folder: {item!r}")
        for p in matches:
            found[str(p.resolve())] = p.resolve()
    return [found[k] for k in sorted(found)]


def check_options(options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The official options with ``options`` applied; ValueError for an unknown name or a bad value."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"options: unknown generator option(s) {unknown}; expected some of {sorted(OPTIONS)}")
    merged = {**OPTIONS, **options}
    if merged["output_mode"] not in OUTPUT_MODES:
        raise ValueError(f"options: output_mode must be one of {OUTPUT_MODES} for files, got {merged['output_mode']!r}")
    if merged["point_grids"] is not None:
        merged["point_grids"] = [np.asarray(g, dtype=np.float64).tolist() for g in merged["point_grids"]]
        merged["points_per_side"] = None
    return merged


def _sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_fingerprint(model: Model) -> Dict[str, Any]:
    from .tools.cli import shipped_weights

    files = list(model.checkpoint) if model.checkpoint else shipped_weights()
    return {"model_type": model.model_type, "weights": [_sha256_file(f) for f in files]}


def _names(photos: Sequence[Path]) -> List[str]:
    """Each photo's output stem: its file stem, or stem-<hash of its path> where stems collide."""
    stems = [p.stem for p in photos]
    return [s if stems.count(s) == 1 else f"{s}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"
            for s, p in zip(stems, photos)]


# ---------------------------------------------------------------------------
# One photo (runs in the worker)
# ---------------------------------------------------------------------------
# A generator holds its photo's embedding and its batches' work arrays, so it
# segments one photo at a time: a Dask worker with several threads (a user's
# cluster) runs several jobs at once in one process, and they take turns on
# it (each generate() already keeps every core busy). Each is kept with the
# lock they take turns on; _GENERATORS_LOCK guards the cache itself.
_GENERATORS: Dict[Tuple[Model, Tuple[Tuple[str, Any], ...], Optional[int]], Tuple[Any, threading.Lock]] = {}
_GENERATORS_LOCK = threading.Lock()


def _generator(job: Job) -> Tuple[Any, threading.Lock]:
    """The generator for this job's weights and options, built once per process,
    and the lock to hold while it runs."""
    key = (job.model, job.options, job.memory_limit)
    with _GENERATORS_LOCK:
        if key not in _GENERATORS:
            _GENERATORS[key] = (_new_generator(job), threading.Lock())
        return _GENERATORS[key]


def _new_generator(job: Job):
    from .automatic_mask_generator import SamAutomaticMaskGenerator
    from .tools.cli import load_model

    sam = None
    for (model, _, _), (other, _) in _GENERATORS.items():  # the model once per process, whatever the options
        if model == job.model:
            sam = other.predictor.model
            break
    if sam is None:
        sam, _ = load_model(job.model.checkpoint, job.model.model_type)
    options = dict(job.options)
    grids = options.pop("point_grids")
    options["point_grids"] = None if grids is None else [np.asarray(g) for g in grids]
    options["output_mode"] = "uncompressed_rle"  # encoded below
    # On a Dask worker the cluster's processes are the parallelism: each photo
    # runs in one process (no worker processes forked from a Dask worker).
    processes = 1 if _on_dask_worker() else None
    return SamAutomaticMaskGenerator(sam, memory_limit=job.memory_limit, processes=processes, **options)


def _on_dask_worker() -> bool:
    """Whether this runs inside a dask.distributed worker (Dask already imported there)."""
    if "distributed" not in sys.modules:
        return False
    try:
        sys.modules["distributed"].get_worker()
    except (ValueError, AttributeError):
        return False
    return True


def segment_job(job: Job) -> Tuple[str, str, str]:
    """Segment one photo and write its files -> (photo, "done" or "failed", reason or "")."""
    from .io.image_io import load_image

    try:
        image = load_image(job.photo)
    except (OSError, ValueError) as error:
        return job.photo, "failed", " ".join(str(error).split())
    generator, lock = _generator(job)
    try:
        with lock:
            records = generator.generate(image)
    except Exception as error:  # e.g. a photo too large for the memory limit: reported, the run goes on
        return job.photo, "failed", f"{type(error).__name__}: {' '.join(str(error).split())}"
    h, w = image.shape[:2]
    coco_rle = dict(job.options)["output_mode"] == "coco_rle"
    annotations = []
    for i, record in enumerate(records):
        rle = record["segmentation"]
        annotations.append({
            "id": i + 1,
            "segmentation": {"size": rle["size"], "counts": rle_to_string(rle["counts"]) if coco_rle else rle["counts"]},
            "bbox": record["bbox"],
            "area": int(record["area"]),
            "predicted_iou": record["predicted_iou"],
            "point_coords": record["point_coords"],
            "stability_score": record["stability_score"],
            "crop_box": record["crop_box"],
        })
    result = {
        "image": {"image_id": job.image_id, "file_name": os.path.basename(job.photo), "width": int(w), "height": int(h)},
        "annotations": annotations,
        "npsam": {"key": job.key, "format": FORMAT, "photo": job.photo, "options": dict(job.options)},
    }
    if job.overlay:
        from .io.image_io import save_png
        from .tools.overlay import overlay_masks
        from .utils.amg import rle_to_mask

        os.makedirs(os.path.join(job.out, OVERLAYS), exist_ok=True)
        overlay = overlay_masks(image, [rle_to_mask(r["segmentation"]) for r in records])
        save_png(os.path.join(job.out, OVERLAYS, job.name + ".png"), overlay)
    write_json(os.path.join(job.out, ANNOTATIONS, job.name + ".json"), result)  # last: it marks the photo done
    return job.photo, "done", ""


def rle_to_string(counts: Sequence[int]) -> str:
    """Mirror of pycocotools' rleToString (maskApi.c): uncompressed COCO RLE
    counts -> the compressed string. Each count, after the third less the
    count two before it, in 5-bit groups (least significant first), a sixth
    bit set while more follow, as ASCII 48 + value."""
    out = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic, as C's on a negative long
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def write_json(path: str, obj: Any) -> None:
    """JSON to a temporary file in the same folder, renamed at the end."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def _read_done(path: str, key: str) -> Optional[Dict[str, Any]]:
    """The annotations file at path if it was made for key, else None."""
    try:
        with open(path, "rb") as f:
            result = json.loads(f.read())
    except (OSError, ValueError):
        return None
    npsam = result.get("npsam") if isinstance(result, dict) else None
    return result if isinstance(npsam, dict) and npsam.get("key") == key else None


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------
def plan(inputs: Sequence[str], out, options: Optional[Dict[str, Any]] = None, checkpoint=None,
         model_type: Optional[str] = None, overlays: bool = False, memory_limit: Optional[int] = None) -> List[Job]:
    """The jobs of a run, one per photo, in the order of their paths."""
    options = check_options(options)
    photos = find_photos(inputs)
    model = Model(tuple(os.path.abspath(f) for f in checkpoint) if checkpoint else None, model_type)
    fingerprint = json.dumps({"options": options, "model": _model_fingerprint(model), "format": FORMAT},
                             sort_keys=True)
    out = os.path.abspath(out)
    frozen = tuple(sorted(options.items(), key=lambda kv: kv[0]))
    frozen = tuple((k, tuple(map(tuple, v)) if k == "point_grids" and v is not None else v) for k, v in frozen)
    jobs = []
    for photo, name in zip(photos, _names(photos)):
        content = _sha256_file(photo) if photo.is_file() else ""
        key = hashlib.sha256((content + fingerprint).encode()).hexdigest()
        jobs.append(Job(str(photo), name, key, int(content[:12] or "0", 16), out, frozen, model, overlays,
                        memory_limit))
    return jobs


def segment_photos(inputs: Sequence[str], out, options: Optional[Dict[str, Any]] = None, *,
                   checkpoint: Optional[Sequence[str]] = None, model_type: Optional[str] = None,
                   overlays: bool = False, memory_limit: Optional[int] = None, workers: Optional[int] = None,
                   scheduler: Optional[str] = None, client=None,
                   progress: Optional[Callable[[int, int], None]] = None) -> Summary:
    """Segment every photo named by ``inputs`` into the folder ``out`` (see the
    module docstring). In this process by default; on a local Dask cluster of
    ``workers`` processes, on the cluster at ``scheduler``, or through a Dask
    ``client`` given. ``progress(done, total)`` is called as photos finish
    (skipped ones count as done at the start). Returns the Summary."""
    start = time.monotonic()
    jobs = plan(inputs, out, options, checkpoint, model_type, overlays, memory_limit)
    os.makedirs(os.path.join(jobs[0].out if jobs else os.path.abspath(out), ANNOTATIONS), exist_ok=True)
    summary = Summary()
    todo = []
    for job in jobs:
        if _read_done(os.path.join(job.out, ANNOTATIONS, job.name + ".json"), job.key) is not None:
            summary.skipped.append(job.photo)
        else:
            todo.append(job)
    total, finished = len(jobs), len(summary.skipped)
    if progress is not None:
        progress(finished, total)

    def record(photo: str, status: str, reason: str) -> None:
        nonlocal finished
        if status == "done":
            summary.done.append(photo)
        else:
            summary.failed.append((photo, reason))
        finished += 1
        if progress is not None:
            progress(finished, total)

    if todo and (workers or scheduler or client is not None):
        _run_on_dask(todo, record, workers, scheduler, client)
    else:
        for job in todo:
            record(*segment_job(job))
    summary.coco = write_coco(jobs, os.path.join(os.path.abspath(out), COCO_FILE))
    summary.seconds = time.monotonic() - start
    return summary


def local_cluster(workers: int):
    """A dask.distributed LocalCluster of ``workers`` processes, one task at a
    time each, whose workers inherit this process's environment.

    NOTE: Dask's nanny sets OMP/MKL/OPENBLAS_NUM_THREADS=1 in its workers;
    here they keep this process's settings, so that they compute what a
    serial run here computes (the BLAS's threads may change the last bits).
    """
    import dask
    from dask.distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": 65536}}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)


def _run_on_dask(jobs: List[Job], record, workers: Optional[int], scheduler: Optional[str], client) -> None:
    try:
        from dask.distributed import Client, as_completed
    except ImportError:
        raise ImportError('--workers and --scheduler need Dask: pip install "npsam[dask]"') from None

    cluster = None
    own_client = client is None
    if client is None:
        if scheduler:
            client = Client(scheduler)
        else:
            cluster = local_cluster(workers)
            client = Client(cluster)
    try:
        futures = {client.submit(segment_job, job, key=f"npsam-everything-{job.key}", pure=False): job
                   for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                record(*future.result())
            except Exception as error:  # e.g. KilledWorker: the photo killed every worker that tried it
                record(job.photo, "failed", f"{type(error).__name__}: {' '.join(str(error).split())}")
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()


def write_coco(jobs: Sequence[Job], path: str) -> str:
    """The run's COCO dataset file from the annotations files of its done photos:
    images 1..N and annotations 1..M in the order of the photos' paths."""
    images, annotations = [], []
    for job in jobs:
        result = _read_done(os.path.join(job.out, ANNOTATIONS, job.name + ".json"), job.key)
        if result is None:
            continue
        image_id = len(images) + 1
        image = result["image"]
        images.append({"id": image_id, "file_name": image["file_name"], "width": image["width"],
                       "height": image["height"], "path": job.photo})
        for ann in result["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                **{k: v for k, v in ann.items() if k != "id"}})
    coco = {
        "info": {"description": "npsam everything: the automatic mask generator's masks", "format": FORMAT},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
    }
    write_json(path, coco)
    return path
