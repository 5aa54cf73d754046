"""Fuzzing the weight readers in CI: mutated seed files, each read by a capped worker.

Each reader (torch zip, legacy torch pickle, safetensors, ONNX) reads
hypothesis-mutated copies of small valid files in a worker process whose
address space (2 GB) and per-case time (10 s) are capped; every outcome must
be "loaded" or a CheckpointError: never another exception type, a
MemoryError or RecursionError behind the CheckpointError (a size that was not
checked before it was used), a timeout, a crash, or a good checkpoint read
differently afterwards, or a malicious pickle's payload that ran. Here a fixed seed and NPSAM_FUZZ_EXAMPLES examples per
reader (default 150); for a longer run: python scripts/fuzz_readers.py --cases 10000.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings

from fuzz_readers import GOOD_OUTCOMES, READERS, Worker, failure_message, mutants, write_seeds

EXAMPLES = int(os.environ.get("NPSAM_FUZZ_EXAMPLES", 150))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return write_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


@pytest.fixture(scope="module")
def worker(seeds, tmp_path_factory):
    worker = Worker(seeds["torch_zip"][0], tmp_path_factory.mktemp("fuzz_cases"))
    yield worker
    worker.close()


def test_seeds_load(worker, seeds):
    """Control: every unmutated seed loads (so that the mutants start from valid files)."""
    for family, paths in seeds.items():
        for path in paths:
            result = worker.run(family, path.read_bytes())
            assert result["outcome"] == "loaded", failure_message(family, path.read_bytes(), result)


def test_the_worker_catches_what_it_must(worker):
    """Control: the worker reports a reader that allocates beyond its cap, one that
    loops, and a file whose payload ran."""
    result = worker.run("bomb", b"")
    assert result["outcome"] == "unbounded", result
    result = worker.run("hang", b"")
    assert result["outcome"] == "timeout", result
    result = worker.run("payload", b"")
    assert result["outcome"] == "payload ran", result


@pytest.mark.parametrize("family", READERS)
def test_mutated_files_load_or_are_refused(worker, seeds, family):
    sources = [p.read_bytes() for p in seeds[family]]

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(data=mutants(family, sources))
    def check(data):
        result = worker.run(family, data)
        assert result["outcome"] in GOOD_OUTCOMES, failure_message(family, data, result)

    check()
    counts = worker.counts[family]
    assert sum(counts.values()) >= EXAMPLES
    # The mutants reach past the first check: some load, most are refused
    # (random opcode streams are refused, or load something that is no state_dict).
    assert counts["refused"] > 0 and (counts["loaded"] > 0 or family == "pickle"), dict(counts)
