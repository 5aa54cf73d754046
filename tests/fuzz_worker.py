"""One fuzzing worker: reads weight files named on stdin, reports each outcome on stdout.

Run by tests/fuzz_readers.py (never by hand): ``python tests/fuzz_worker.py
REPO GOOD_CHECKPOINT``. The worker caps its own address space
(``resource.setrlimit(RLIMIT_AS)``) and each case's time (``setitimer``), so
that a file that makes a reader allocate gigabytes or loop fails its case
instead of the machine. torch is made unimportable: the readers must not need it.

Protocol, one line each way per case:
    in:  "<reader>\\t<path>"          reader: torch | safetensors | onnx | any
    out: {"outcome": ..., "detail": ...}  (JSON)
Outcomes: "loaded"; "refused" (a CheckpointError); anything else is a
failure: "error" (another exception type reached the caller), "unbounded" (a
CheckpointError caused by MemoryError or RecursionError: the reader tried
before checking), "timeout", "poisoned" (a good float32 checkpoint no longer
reads correctly after the case), "payload ran" (the file $NPSAM_FUZZ_MARKER,
which the malicious pickles' payloads create, exists after the case).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import traceback

ADDRESS_SPACE = int(os.environ.get("NPSAM_FUZZ_ADDRESS_SPACE", 2 << 30))  # bytes
CASE_SECONDS = float(os.environ.get("NPSAM_FUZZ_CASE_SECONDS", 10))
POISON_CHECK_EVERY = 1  # cases between two loads of the good checkpoint


class CaseTimeout(BaseException):
    """Raised by the timer; a BaseException so that no reader's handler catches it."""


def _on_timer(signum, frame):
    raise CaseTimeout()


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def main() -> int:
    repo, good = sys.argv[1], sys.argv[2]
    sys.modules["torch"] = None  # the readers never import torch
    sys.path.insert(0, repo)
    import numpy as np

    from npsam.io import checkpoint, convert, onnx_proto
    from npsam.io.checkpoint import CheckpointError, load_safetensors, load_torch_checkpoint

    expected = load_torch_checkpoint(good)  # read before any hostile file

    def read(reader: str, path: str):
        if reader == "torch":
            return load_torch_checkpoint(path)
        if reader == "safetensors":
            return load_safetensors(path)
        if reader == "onnx":
            # "loaded": the protobuf reader parsed the file. The seed is no SAM
            # export, so the importers' patterns must then refuse it cleanly.
            model = onnx_proto.load_model(path)
            try:
                convert._read_onnx(path)
            except CheckpointError:
                pass
            return model
        if reader == "bomb":  # controls: a reader that allocates without checking, one that loops
            try:
                return bytearray(ADDRESS_SPACE)
            except MemoryError as e:
                raise CheckpointError("control") from e
        if reader == "hang":
            while True:
                pass
        if reader == "payload":
            open(marker, "w").close()
            return None
        return convert.read_state_dict(path)

    def poisoned() -> str:
        got = load_torch_checkpoint(good)
        same = sorted(got) == sorted(expected) and all(
            got[k].dtype == expected[k].dtype and got[k].tobytes() == expected[k].tobytes() for k in expected
        )
        stand_in = checkpoint._SAFE_GLOBALS[("torch", "FloatStorage")]
        if not same or stand_in.name != "FloatStorage" or stand_in.dtype != np.float32:
            return "a good float32 checkpoint reads differently after this case"
        return ""

    marker = os.environ.get("NPSAM_FUZZ_MARKER", "")
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    signal.signal(signal.SIGALRM, _on_timer)
    count = 0
    for line in sys.stdin:
        reader, path = line.rstrip("\n").split("\t", 1)
        outcome, detail = "loaded", ""
        try:
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                read(reader, path)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except CaseTimeout:
            outcome, detail = "timeout", f"more than {CASE_SECONDS} s"
        except CheckpointError as e:
            outcome, detail = "refused", str(e)[:2000]
            for cause in list(_causes(e))[1:]:
                if isinstance(cause, (MemoryError, RecursionError)):
                    outcome, detail = "unbounded", f"{type(cause).__name__} inside: {detail}"
            if len(str(e)) > 20000:
                outcome, detail = "unbounded", f"a message of {len(str(e))} characters"
        except BaseException as e:  # noqa: BLE001 - every other type is the failure we look for
            outcome = "error"
            detail = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-3000:]
        count += 1
        if marker and os.path.exists(marker):
            os.unlink(marker)
            outcome, detail = "payload ran", f"the case created {marker}: code named by the file ran"
        if outcome in ("loaded", "refused") and count % POISON_CHECK_EVERY == 0:
            problem = poisoned()
            if problem:
                outcome, detail = "poisoned", problem
        sys.stdout.write(json.dumps({"outcome": outcome, "detail": detail}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
