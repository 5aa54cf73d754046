"""npsam.automatic_mask_generator against the official SamAutomaticMaskGenerator.

A small random-weight SAM (embedding dim 32, 16x16 embedding, 256-pixel input)
whose image encoder returns one fixed embedding, so the image encoder is out
of the comparison. Two tiers:

1. Generator logic alone: npsam's generator drives the *official* predictor
   through a NumPy adapter, so both generators see identical predictions and
   every record must be equal exactly (NMS, filters, crops, RLE, small-region
   clean-up, output modes).
2. The whole pipeline: npsam's generator with npsam's own SamPredictor and
   model, against the official one: same number of masks, segmentation IoU >=
   MASK_IOU, equal boxes, areas, points and crop boxes, close scores.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

import oracle
from tolerances import DECODER_F32, MASK_IOU, assert_close, mask_iou

oracle.segment_anything()
from segment_anything.automatic_mask_generator import SamAutomaticMaskGenerator as OfficialGenerator  # noqa: E402
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402
from segment_anything.predictor import SamPredictor as OfficialPredictor  # noqa: E402

EMBED_DIM, EMBED_SIDE, IMG_SIZE = 32, 16, 256
# With weights drawn like the default init (oracle.randomize_), the random
# model's mask logits are a fraction of a unit with most pixels near 0, so the
# stability score (area above +1 / area above -1) stays below 0.2; scaling the
# hypernetwork outputs gives steep masks whose stability scores spread up to
# ~0.66, so the 0.5 threshold below keeps some masks and drops others.
LOGIT_GAIN = 400.0

# Thresholds low enough that a random-weight model keeps a few dozen masks. Its
# masks are scattered over the whole image (every box is the image), so box NMS
# at 0.7 would keep one: the base settings switch it off (IoU > 1 never holds)
# and the cases below turn it on.
SETTINGS = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.5,
                stability_score_offset=1.0, box_nms_thresh=1.0)


class FixedEncoder(torch.nn.Module):
    """Stands in for the image encoder: every image gets the same embedding."""

    def __init__(self, embedding: torch.Tensor) -> None:
        super().__init__()
        self.img_size = IMG_SIZE
        self.register_buffer("embedding", embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding.expand(x.shape[0], -1, -1, -1)


def _official_sam(seed: int = 0) -> Sam:
    embedding = torch.randn((1, EMBED_DIM, EMBED_SIDE, EMBED_SIDE), generator=torch.Generator().manual_seed(seed + 1))
    sam = Sam(
        image_encoder=FixedEncoder(embedding),
        prompt_encoder=PromptEncoder(embed_dim=EMBED_DIM, image_embedding_size=(EMBED_SIDE, EMBED_SIDE),
                                     input_image_size=(IMG_SIZE, IMG_SIZE), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=64, num_heads=4),
                                 transformer_dim=EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=32),
    )
    oracle.randomize_(sam.prompt_encoder, seed)
    oracle.randomize_(sam.mask_decoder, seed + 2)
    with torch.no_grad():  # logits of a few units, as a trained SAM gives, rather than a fraction of one
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(LOGIT_GAIN)
            mlp.layers[-1].bias.mul_(LOGIT_GAIN)
    return sam.eval()


def _image(h: int = 120, w: int = 170, seed: int = 0) -> np.ndarray:
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


@pytest.fixture
def official_predictor_in_npsam(monkeypatch):
    """npsam's generator, built on the official predictor (tier 1)."""
    monkeypatch.setitem(sys.modules, "npsam.predictor", types.SimpleNamespace(SamPredictor=OfficialPredictorAdapter))
    from npsam.automatic_mask_generator import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator


def _run_official(sam, image, **kwargs):
    with torch.no_grad():
        return OfficialGenerator(sam, **kwargs).generate(image)


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


# ---------------------------------------------------------------- tier 1: generator logic, exact


@pytest.mark.parametrize("case", [
    dict(),
    dict(box_nms_thresh=0.7),
    dict(crop_n_layers=1, points_per_side=4),
    dict(min_mask_region_area=30, output_mode="uncompressed_rle"),
    dict(output_mode="coco_rle", points_per_batch=5, box_nms_thresh=0.3),
    dict(pred_iou_thresh=0.88, stability_score_thresh=0.95),  # the official defaults
])
def test_generator_logic_matches_official_exactly(official_predictor_in_npsam, case):
    sam = _official_sam(seed=0)
    image = _image()
    settings = {**SETTINGS, **case}
    theirs = _run_official(sam, image, **settings)
    calls = []
    ours = official_predictor_in_npsam(sam, progress=lambda done, total: calls.append((done, total)), **settings)
    ours = ours.generate(image)
    _assert_records_equal(ours, theirs, str(case))
    if case == dict():
        assert len(theirs) >= 20, "the settings should keep several masks"
    n_batches = calls[-1][1]
    assert calls == [(i + 1, n_batches) for i in range(n_batches)]


def test_generator_crop_layers_with_explicit_grids(official_predictor_in_npsam):
    sam = _official_sam(seed=3)
    image = _image(90, 64, seed=3)
    rng = np.random.default_rng(0)
    grids = [rng.random((20, 2)), rng.random((6, 2))]
    settings = dict(points_per_side=None, point_grids=grids, crop_n_layers=1, pred_iou_thresh=0.0,
                    stability_score_thresh=0.6, crop_overlap_ratio=0.25, min_mask_region_area=12)
    theirs = _run_official(sam, image, **settings)
    ours = official_predictor_in_npsam(sam, **settings).generate(image)
    _assert_records_equal(ours, theirs, "explicit grids, one crop layer")
    assert len(theirs) > 0


def test_generator_rejects_bad_options(official_predictor_in_npsam):
    sam = _official_sam()
    with pytest.raises(ValueError, match="points_per_side"):
        official_predictor_in_npsam(sam, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        official_predictor_in_npsam(sam, output_mode="png")
    with pytest.raises(ValueError, match="image"):
        official_predictor_in_npsam(sam).generate(np.zeros((4, 4), np.uint8))


# ---------------------------------------------------------------- tier 2: with npsam's predictor


def _npsam_sam(official: Sam):
    """npsam's Sam with the same decoder weights and the same fixed embedding."""
    from npsam.modeling import mask_decoder as md
    from npsam.modeling import prompt_encoder as pe
    from npsam.modeling import sam as sam_mod
    from npsam.modeling import transformer as tr
    from npsam.kernels.nn import Module

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
                                        input_image_size=(IMG_SIZE, IMG_SIZE), mask_in_chans=4),
        mask_decoder=md.MaskDecoder(num_multimask_outputs=3,
                                    transformer=tr.TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=64,
                                                                     num_heads=4),
                                    transformer_dim=EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=32),
    ).set_names()
    state = {k: v for k, v in oracle.state_dict_numpy(official).items() if not k.startswith("image_encoder")}
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("case", [dict(), dict(crop_n_layers=1, points_per_side=4, min_mask_region_area=20)])
def test_generator_matches_official_with_npsam_predictor(case):
    from npsam.automatic_mask_generator import SamAutomaticMaskGenerator

    official = _official_sam(seed=0)
    image = _image()
    settings = {**SETTINGS, **case}
    theirs = _run_official(official, image, **settings)
    ours = SamAutomaticMaskGenerator(_npsam_sam(official), **settings).generate(image)
    assert len(theirs) > 0
    assert len(ours) == len(theirs), f"{len(ours)} masks, official {len(theirs)}"
    for i, (o, t) in enumerate(zip(ours, theirs)):
        assert mask_iou(o["segmentation"], t["segmentation"]) >= MASK_IOU, f"record {i}"
        for key in ("bbox", "area", "point_coords", "crop_box"):
            assert o[key] == t[key], f"record {i} {key}: ours {o[key]!r}, official {t[key]!r}"
        assert_close(o["predicted_iou"], t["predicted_iou"], DECODER_F32, f"record {i} predicted_iou")
        assert_close(o["stability_score"], t["stability_score"], DECODER_F32, f"record {i} stability_score")
