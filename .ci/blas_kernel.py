"""The OpenBLAS kernel NumPy runs here, and another one this CPU can run.

    python .ci/blas_kernel.py current   # the kernel OpenBLAS picked (threadpoolctl), or nothing
    python .ci/blas_kernel.py other     # another OPENBLAS_CORETYPE this CPU supports, or nothing

.ci/run runs the kernel and fast-path tests a second time under the other
one: on some kernels (Haswell's) a product's last bits depend on how it is
cut into calls and threads, on others (SkylakeX's) they do not, so a
bit-for-bit claim that holds on one kernel can fail on the other.
"""

from __future__ import annotations

import platform
import sys

# Families of x86-64 OpenBLAS kernels, newest first: (name to ask for, names
# OpenBLAS reports for that family, CPU flags it needs)
FAMILIES = [
    ("SkylakeX", {"skylakex", "cooperlake", "sapphirerapids"}, {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}),
    ("Haswell", {"haswell", "zen"}, {"avx2", "fma"}),
    ("Sandybridge", {"sandybridge"}, {"avx"}),
    ("Nehalem", {"nehalem", "core2", "penryn", "dunnington", "atom"}, {"ssse3"}),
]


def current() -> str:
    import numpy  # noqa: F401  loads OpenBLAS
    from threadpoolctl import threadpool_info

    for lib in threadpool_info():
        if lib.get("internal_api") == "openblas":
            return lib.get("architecture") or ""
    return ""


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def other() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ""
    picked = current().lower()
    if not picked:
        return ""
    flags = cpu_flags()
    for name, reported, needs in FAMILIES:
        if picked not in reported and needs <= flags:
            return name
    return ""


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("current", "other"):
        sys.exit(__doc__)
    print(current() if sys.argv[1] == "current" else other())
