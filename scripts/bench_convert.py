"""Time the converter on a torch-saved ViT-B checkpoint: seconds and peak RSS.

Each measured run is its own process (no torch in the converter's). Its peak
RSS is VmHWM from /proc/self/status, read as it exits: unlike getrusage's
ru_maxrss, VmHWM starts afresh at exec, so the (large) parent that forked it
does not count. For scale, the same file read by
``torch.load(weights_only=True)`` is measured the same way.

    python scripts/bench_convert.py [--model vit_b] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Written at exit to the file named by $BENCH_HWM: the process's peak RSS (kB).
REPORT_HWM = (
    "import atexit, os\n"
    "def _hwm():\n"
    "    line = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
    "    open(os.environ['BENCH_HWM'], 'w').write(line.split()[1])\n"
    "atexit.register(_hwm)\n"
)
CONVERT = REPORT_HWM + (
    "import sys\n"
    "sys.modules['torch'] = None\n"
    f"sys.path.insert(0, {REPO!r})\n"
    "from npsam.io.convert import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
TORCH_LOAD = REPORT_HWM + "import sys, torch\ntorch.load(sys.argv[1], weights_only=True)\n"


def measure(code: str, *argv: str) -> tuple:
    """(wall seconds, peak RSS in MiB) of `python -c code argv` in a fresh process."""
    with tempfile.NamedTemporaryFile(suffix=".hwm") as hwm:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, *argv], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "BENCH_HWM": hwm.name})
        seconds = time.perf_counter() - start
        return seconds, int(open(hwm.name).read()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", default=None, help="folder for the checkpoint (default: a temporary one)")
    args = parser.parse_args()

    sys.path.insert(0, os.path.join(REPO, "tests"))
    import oracle
    import torch

    folder = args.keep or tempfile.mkdtemp(prefix="bench_convert_")
    src = os.path.join(folder, f"sam_{args.model}.pth")
    if not os.path.exists(src):
        model = oracle.segment_anything().build_sam.sam_model_registry[args.model]()
        torch.save(model.state_dict(), src)
        del model
    size = os.path.getsize(src) / 2**20
    print(f"{src}: {size:.0f} MiB")
    for name, code, argv in [
        ("npsam convert (no torch)", CONVERT, [src, os.path.join(folder, f"sam_{args.model}.safetensors")]),
        ("torch.load weights_only", TORCH_LOAD, [src]),
    ]:
        runs = [measure(code, *argv) for _ in range(args.repeat)]
        seconds = sorted(r[0] for r in runs)[len(runs) // 2]
        rss = max(r[1] for r in runs)
        print(f"{name:28s} median {seconds:6.2f} s   peak RSS {rss:7.0f} MiB")


if __name__ == "__main__":
    main()
