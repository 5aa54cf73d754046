"""npsam.dataset and ``npsam everything`` on folders: a folder of three photos
and a corrupt one, with the shipped weights on small photos.

- the COCO file loads in pycocotools and its masks are the per-photo files'
  masks, which are the generator's own records;
- nothing lost, nothing twice: a run killed after its first photo and run
  again gives the uninterrupted run's files; a rerun skips every photo;
- Dask: a local cluster of 2 workers gives the serial run's COCO file, also
  when one worker is killed mid-run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npsam import dataset

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = dict(points_per_side=3, pred_iou_thresh=0.8, stability_score_thresh=0.9)
CLI_OPTIONS = ["--points-per-side", "3", "--pred-iou-thresh", "0.8", "--stability-score-thresh", "0.9"]
GOOD = ["dog.jpg", "groceries.jpg", "truck_left.png"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three small photos (from the example photos) and a corrupt JPEG."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for name in ("dog", "groceries"):
        with Image.open(ROOT / "assets" / "images" / f"{name}.jpg") as im:
            im.thumbnail((160, 160))
            im.save(folder / f"{name}.jpg", quality=95)
    with Image.open(ROOT / "assets" / "images" / "truck.jpg") as im:
        im.crop((0, 300, 900, 1000)).resize((150, 117)).save(folder / "truck_left.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return folder


@pytest.fixture(scope="module")
def serial(photos, tmp_path_factory):
    """The reference: one uninterrupted serial run."""
    out = tmp_path_factory.mktemp("serial")
    summary = dataset.segment_photos([str(photos)], out, OPTIONS)
    return out, summary


def _coco(out: Path) -> dict:
    return json.loads((out / dataset.COCO_FILE).read_text())


def _run_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "npsam", "everything", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600, **kwargs)


# ---------------------------------------------------------------- pieces


@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 40), w=st.integers(1, 40),
       p=st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]))
def test_rle_to_string_matches_pycocotools(seed, h, w, p):
    from pycocotools import mask as mask_utils

    from npsam.utils.amg import mask_to_rle

    masks = np.random.default_rng(seed).random((1, h, w)) < p
    rle = mask_to_rle(masks)[0]
    theirs = mask_utils.frPyObjects(rle, h, w)["counts"].decode()
    assert dataset.rle_to_string(rle["counts"]) == theirs


def test_find_photos(photos, tmp_path):
    names = [p.name for p in dataset.find_photos([str(photos)])]
    assert names == sorted(GOOD + ["broken.jpg"])
    # files, globs and folders together, each photo once
    found = dataset.find_photos([str(photos / "dog.jpg"), str(photos / "*.jpg"), str(photos)])
    assert len(found) == 4
    assert [p.name for p in dataset.find_photos([str(photos / "[bd]*.jpg")])] == ["broken.jpg", "dog.jpg"]
    for bad, message in ((tmp_path / "nope.jpg", "no such file or folder"), (tmp_path / "*.png", "matches no file"),
                         (tmp_path, "holds no photos")):
        with pytest.raises(ValueError, match=message):
            dataset.find_photos([str(bad)])
    with pytest.raises(ValueError, match="unknown generator option"):
        dataset.check_options({"points_per_sid": 3})
    with pytest.raises(ValueError, match="output_mode"):
        dataset.check_options({"output_mode": "binary_mask"})


# ---------------------------------------------------------------- a folder, serially


def test_folder_run_writes_every_photo_and_reports_the_corrupt_one(photos, serial):
    out, summary = serial
    assert sorted(Path(p).name for p in summary.done) == sorted(GOOD)
    assert [Path(p).name for p, _ in summary.failed] == ["broken.jpg"]
    assert "cannot read image" in summary.failed[0][1]
    assert sorted(p.name for p in (out / dataset.ANNOTATIONS).iterdir()) == sorted(
        Path(n).stem + ".json" for n in GOOD)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], "no temporary file left"


def test_coco_file_loads_and_holds_the_per_photo_results(photos, serial):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    from npsam.automatic_mask_generator import SamAutomaticMaskGenerator
    from npsam.io.image_io import load_image
    from npsam.tools.cli import load_model

    out, _ = serial
    coco = COCO(str(out / dataset.COCO_FILE))
    assert len(coco.getImgIds()) == len(GOOD)
    assert len(coco.getAnnIds()) >= 2 * len(GOOD), "the photos should have several masks each"
    for image in coco.loadImgs(coco.getImgIds()):
        per_photo = json.loads((out / dataset.ANNOTATIONS / (Path(image["file_name"]).stem + ".json")).read_text())
        assert per_photo["image"]["width"] == image["width"] and per_photo["image"]["height"] == image["height"]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert len(anns) == len(per_photo["annotations"])
        for ann, mine in zip(anns, per_photo["annotations"]):
            mask = coco.annToMask(ann)  # [H, W] uint8, decoded by pycocotools
            np.testing.assert_array_equal(mask, mask_utils.decode(mine["segmentation"]))
            for key in ("bbox", "area", "predicted_iou", "stability_score", "point_coords", "crop_box"):
                assert ann[key] == mine[key], key
    # and the per-photo file is the generator's records, for one photo
    sam, _ = load_model(None, None)
    records = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **OPTIONS).generate(
        load_image(str(photos / "groceries.jpg")))
    mine = json.loads((out / dataset.ANNOTATIONS / "groceries.json").read_text())["annotations"]
    assert len(mine) == len(records)
    for ann, record in zip(mine, records):
        assert ann["segmentation"] == record["segmentation"]
        for key in ("bbox", "area", "predicted_iou", "stability_score", "point_coords", "crop_box"):
            assert ann[key] == record[key], key


def test_rerun_skips_what_is_done_and_redoes_what_changed(photos, serial, tmp_path):
    out, _ = serial
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = {p.name: p.stat().st_mtime_ns for p in (copy / dataset.ANNOTATIONS).iterdir()}
    summary = dataset.segment_photos([str(photos)], copy, OPTIONS)
    assert len(summary.skipped) == len(GOOD) and not summary.done and len(summary.failed) == 1
    assert before == {p.name: p.stat().st_mtime_ns for p in (copy / dataset.ANNOTATIONS).iterdir()}
    assert _coco(copy) == _coco(out)
    # other options: every photo again
    summary = dataset.segment_photos([str(photos / "dog.jpg")], copy, {**OPTIONS, "pred_iou_thresh": 0.85})
    assert [Path(p).name for p in summary.done] == ["dog.jpg"]


def test_killed_after_the_first_photo_and_resumed(photos, serial, tmp_path):
    out, _ = serial
    resumed = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "npsam", "everything", str(photos), "-o", str(resumed),
                                *CLI_OPTIONS], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    annotations = resumed / dataset.ANNOTATIONS
    while time.monotonic() < deadline and process.poll() is None:
        if annotations.is_dir() and any(p.suffix == ".json" for p in annotations.iterdir()):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_first = sorted(p.name for p in annotations.iterdir() if p.suffix == ".json")
    assert 1 <= len(done_first) < len(GOOD), f"killed too late: {done_first}"
    result = _run_cli(photos, "-o", resumed, *CLI_OPTIONS)
    assert result.returncode == 1, result.stderr  # the corrupt photo
    assert f"{len(GOOD) - len(done_first)} done, {len(done_first)} skipped" in result.stdout
    assert "failed: " in result.stderr and "broken.jpg" in result.stderr
    assert _coco(resumed) == _coco(out)
    for name in (p.name for p in (out / dataset.ANNOTATIONS).iterdir()):
        assert (resumed / dataset.ANNOTATIONS / name).read_bytes() == (out / dataset.ANNOTATIONS / name).read_bytes()


def test_cli_writes_overlays_and_rejects_bad_input(photos, tmp_path):
    result = _run_cli(photos / "dog.jpg", photos / "truck_left.png", "--overlays", "-o", tmp_path / "o", *CLI_OPTIONS)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "o" / dataset.OVERLAYS).iterdir()) == ["dog.png", "truck_left.png"]
    bad = _run_cli(tmp_path / "nothing_here", "-o", tmp_path / "bad")
    assert bad.returncode == 2 and "nothing_here" in bad.stderr and not (tmp_path / "bad").exists()
    both = _run_cli(photos, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1", "-o", tmp_path / "bad")
    assert both.returncode == 2 and "not both" in both.stderr


# ---------------------------------------------------------------- Dask


def test_dask_workers_option_gives_the_serial_coco_file(photos, serial, tmp_path):
    """--workers 2: segment_photos starts and stops its own local cluster."""
    out, _ = serial
    summary = dataset.segment_photos([str(photos)], tmp_path / "dask", OPTIONS, workers=2)
    assert len(summary.done) == len(GOOD) and len(summary.failed) == 1
    assert _coco(tmp_path / "dask") == _coco(out)


def test_dask_worker_killed_mid_run_loses_nothing_and_duplicates_nothing(photos, serial, tmp_path):
    from dask.distributed import Client

    out, _ = serial
    cluster = dataset.local_cluster(2)
    client = Client(cluster)
    killed = []
    try:
        pids = client.run(os.getpid)  # {worker address: pid}

        def progress(done, total):
            # once a photo is done, kill a worker that is segmenting one
            if done >= 1 and not killed:
                busy = [address for address, keys in client.processing().items() if keys]
                if busy:
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    killed.append(busy[0])

        summary = dataset.segment_photos([str(photos)], tmp_path / "dask", OPTIONS, client=client, progress=progress)
    finally:
        client.close()
        cluster.close()
    assert killed, "no worker was killed"
    assert sorted(Path(p).name for p in summary.done) == sorted(GOOD), summary
    assert [Path(p).name for p, _ in summary.failed] == ["broken.jpg"]
    assert _coco(tmp_path / "dask") == _coco(out)
    assert not [p for p in (tmp_path / "dask").rglob("*") if p.name.endswith(".tmp")]


def test_photos_segmented_at_once_in_one_process_give_the_serial_results(photos, serial, tmp_path):
    """A Dask worker with several threads runs several photos at once in one
    process, on the process's one generator: each must come out as in the
    serial run (the generator holds its photo's embedding and work arrays)."""
    import threading

    out, _ = serial
    jobs = [job for job in dataset.plan([str(photos)], tmp_path / "threads", OPTIONS)
            if Path(job.photo).name in GOOD] * 2
    results, errors = {}, []

    def run(i, job):
        try:
            results[i] = dataset.segment_job(job)
        except BaseException as error:  # reported below
            errors.append(error)

    workers = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors, errors
    assert sorted(status for _, status, _ in results.values()) == ["done"] * len(jobs)
    for job in jobs[:len(GOOD)]:
        name = Path(job.name + ".json")
        ours = json.loads((tmp_path / "threads" / dataset.ANNOTATIONS / name).read_text())
        theirs = json.loads((out / dataset.ANNOTATIONS / name).read_text())
        assert ours["annotations"] == theirs["annotations"], job.photo
