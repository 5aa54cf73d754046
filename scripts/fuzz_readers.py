"""Fuzz the weight readers for as long as asked; print the outcome counts per reader.

    python scripts/fuzz_readers.py --cases 10000              # every reader
    python scripts/fuzz_readers.py --cases 100000 --reader onnx --seed 7

The same harness as tests/test_fuzz_readers.py (tests/fuzz_readers.py): for
each reader, hypothesis mutates small valid seed files and a worker process,
capped at --address-space bytes and --case-seconds per file, reads each
mutant. Acceptable outcomes are "loaded" and "refused" (a CheckpointError);
any other is a failure, whose file is kept under --keep (default
fuzz-failures/) for a regression test. Needs the test extras (torch and onnx
write the seeds). Exit status 1 when any case failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from fuzz_readers import GOOD_OUTCOMES, READERS, Worker, failure_message, mutants, write_seeds  # noqa: E402


def fuzz(worker: Worker, family: str, sources, cases: int, random_seed: int, keep: Path) -> int:
    """Run about ``cases`` mutants of one family; returns the number of failures."""
    failures = 0

    @seed(random_seed)
    @settings(max_examples=cases, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=mutants(family, sources))
    def check(data):
        nonlocal failures
        result = worker.run(family, data)
        if result["outcome"] not in GOOD_OUTCOMES:
            failures += 1
            print(failure_message(family, data, result, keep_in=keep), file=sys.stderr)

    check()
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cases", type=int, default=10000, help="mutants per reader (default 10000)")
    parser.add_argument("--reader", choices=READERS, action="append", help="only this reader (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    parser.add_argument("--case-seconds", type=float, default=10.0, help="time limit per file (default 10)")
    parser.add_argument("--address-space", type=int, default=2 << 30, help="worker address-space cap in bytes (2 GiB)")
    parser.add_argument("--keep", type=Path, default=Path("fuzz-failures"), help="folder for failing files")
    args = parser.parse_args(argv)

    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        seeds = write_seeds(Path(folder) / "seeds")
        worker = Worker(seeds["torch_zip"][0], folder, args.case_seconds, args.address_space)
        try:
            for family in args.reader or READERS:
                start = time.perf_counter()
                failures += fuzz(worker, family, [p.read_bytes() for p in seeds[family]], args.cases, args.seed, args.keep)
                counts = worker.counts[family]
                print(f"{family}: {sum(counts.values())} inputs in {time.perf_counter() - start:.0f} s: "
                      + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
        finally:
            worker.close()
    print("all outcomes clean" if not failures else f"{failures} failures (files in {args.keep})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
