"""Fuzzing the weight readers: mutated seed files, each read in a capped worker process.

Used by tests/test_fuzz_readers.py (briefly, fixed seed, in CI) and by
scripts/fuzz_readers.py (as long as asked). For each reader (torch zip,
legacy torch pickle, safetensors, ONNX) a few small valid seed files are
written; hypothesis draws a seed and a list of mutations (bit flips, bytes
and little-endian integers set to boundary values such as 2**31 or 2**63,
insertions, deletions, truncation, copies of one span over another), applied
to the whole file or, structure-aware, to one member of a zip (written again
with right checksums) or to a safetensors header (its bytes or its JSON
values, the length prefix fixed); a fifth family is random pickle opcode
streams naming dangerous and allowed globals (in a torch.save zip). The
mutated file is read by a worker process (tests/fuzz_worker.py) whose
address space and per-case time are capped. The only acceptable outcomes are
"loaded" and "refused" (a CheckpointError).

The worker stays up across cases (one process start per few thousand cases);
a worker that dies (a crash, the address-space cap hit outside Python) is
reported as the case's failure and replaced.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "fuzz_worker.py"
READERS = ("torch_zip", "torch_legacy", "safetensors", "onnx", "pickle")
# The worker's reader for each family ("torch" reads zip and legacy files alike;
# "pickle": malicious pickles in a torch.save zip).
WORKER_READER = {"torch_zip": "torch", "torch_legacy": "torch", "safetensors": "safetensors", "onnx": "onnx",
                 "pickle": "torch"}
GOOD_OUTCOMES = ("loaded", "refused")

# Values a length, count, size or index in a file might be set to.
BOUNDARY = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 2**31 - 1, 2**31,
            2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


# --------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------

def _torch_seed_tensors():
    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "w": base,
        "t": base.t(),  # a view sharing w's storage
        "h": torch.randn(5, generator=g).half(),
        "bf": torch.randn(2, 3, generator=g).bfloat16(),
        "bf0": torch.tensor(1.5, dtype=torch.bfloat16),  # 0-d bfloat16
        "d": torch.randn(2, generator=g).double(),
        "n": torch.tensor(7, dtype=torch.int64),
        "e": torch.zeros(0, 3),
    }


def write_seeds(folder) -> Dict[str, List[Path]]:
    """Small valid files for each reader (torch and onnx are needed to write them)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from npsam.io.checkpoint import save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seeds: Dict[str, List[Path]] = {r: [] for r in READERS}
    seeds["pickle"].append(folder / "plain_zip.pth")  # unused: pickles are generated whole
    tensors = _torch_seed_tensors()
    for name, obj in {"plain": tensors, "wrapped": {"model": collections.OrderedDict(tensors), "epoch": 3}}.items():
        for legacy in (False, True):
            path = folder / f"{name}_{'legacy' if legacy else 'zip'}.pth"
            torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
            seeds["torch_legacy" if legacy else "torch_zip"].append(path)
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((4, 6)).astype(np.float32), "h": np.arange(5, dtype=np.float16),
              "d": rng.standard_normal(2), "n": np.array(7, np.int64), "e": np.zeros((0, 3), np.float32)}
    path = folder / "npsam.safetensors"
    save_safetensors(path, arrays, {"format": "npsam", "model_type": "decoder"})
    seeds["safetensors"].append(path)
    from safetensors.torch import save_file

    path = folder / "library.safetensors"
    save_file({"bf": torch.randn(3, 2).bfloat16(), "bf0": torch.tensor(2.5, dtype=torch.bfloat16),
               "b": torch.tensor([True, False])}, str(path), {"a": "b"})
    seeds["safetensors"].append(path)
    path = folder / "model.onnx"
    path.write_bytes(onnx_seed())
    seeds["onnx"].append(path)
    return seeds


def onnx_seed() -> bytes:
    """A small ONNX model with what the SamOnnxModel importer looks for: the
    has_mask_input input, a Linear as MatMul + Add with a named bias, a
    LayerNorm2d-like Sub/Div/Mul/Add after a Conv, a Constant node, an Expand
    of a token table into a Concat, an If with two subgraphs, attributes of
    every kind, tensors stored as raw_data and as typed fields."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f32 = lambda *shape: np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(f32(8, 4), "onnx::MatMul_1"),
        numpy_helper.from_array(f32(4), "mask_decoder.transformer.layers.0.mlp.lin1.bias"),
        numpy_helper.from_array(f32(4, 1, 1), "onnx::Mul_2"),
        numpy_helper.from_array(f32(4, 1, 1), "onnx::Add_3"),
        numpy_helper.from_array(f32(4, 3, 1, 1), "mask_decoder.output_upscaling.0.weight"),
        numpy_helper.from_array(f32(1, 5, 8), "onnx::Expand_4"),
        helper.make_tensor("typed", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),
        helper.make_tensor("typed16", TensorProto.FLOAT16, [2], np.array([1, 2], np.float16).view(np.uint16).tolist()),
        helper.make_tensor("ints", TensorProto.INT64, [3], [1, -2, 2**40]),
    ]
    branch = lambda name: helper.make_graph(  # noqa: E731
        [helper.make_node("Identity", ["x"], [f"{name}_out"], name=f"/{name}/Identity")], name, [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("MatMul", ["tokens", "onnx::MatMul_1"], ["mm"], name="/transformer/layers.0/mlp/lin1/MatMul"),
        helper.make_node("Add", ["mm", "mask_decoder.transformer.layers.0.mlp.lin1.bias"], ["lin"],
                         name="/transformer/layers.0/mlp/lin1/Add"),
        helper.make_node("Conv", ["image", "mask_decoder.output_upscaling.0.weight"], ["conv"], name="/conv/Conv",
                         kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0], group=1),
        helper.make_node("Sub", ["conv", "conv"], ["sub"], name="/ln/Sub"),
        helper.make_node("Div", ["sub", "conv"], ["div"], name="/ln/Div"),
        helper.make_node("Mul", ["div", "onnx::Mul_2"], ["mul"], name="/ln/Mul"),
        helper.make_node("Add", ["mul", "onnx::Add_3"], ["ln"], name="/ln/Add"),
        helper.make_node("Constant", [], ["c"], name="/Constant", value=numpy_helper.from_array(f32(2, 2), "c")),
        helper.make_node("Expand", ["onnx::Expand_4", "shape"], ["exp"], name="/Expand"),
        helper.make_node("Concat", ["exp", "tokens"], ["cat"], name="/Concat", axis=1),
        helper.make_node("Sub", ["one", "has_mask_input"], ["not_mask"], name="/Sub"),
        helper.make_node("If", ["cond"], ["branch"], name="/If", then_branch=branch("then"), else_branch=branch("else")),
        helper.make_node("Custom", ["lin"], ["custom"], name="/Custom", domain="npsam.test", f=1.5, i=-3, s="text",
                         floats=[1.0, 2.5], ints=[1, 2, 3], strings=["a", "b"],
                         t=numpy_helper.from_array(f32(2), "t"), tensors=[numpy_helper.from_array(f32(1), "u")]),
    ]
    graph = helper.make_graph(
        nodes, "seed",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("tokens", "image", "has_mask_input")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("lin", "ln", "cat", "branch")],
        initializer=inits,
    )
    model = helper.make_model(graph, producer_name="npsam-fuzz", opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="k", value="v")
    return model.SerializeToString()


# --------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------

_position = st.floats(0, 1, exclude_max=True)  # a fraction of the file's length


def mutations(max_size: int = 6):
    """Lists of mutation operations, each independent of the seed's length."""
    op = st.one_of(
        st.tuples(st.just("flip"), _position, st.integers(0, 7)),
        st.tuples(st.just("byte"), _position, st.integers(0, 255)),
        st.tuples(st.just("int"), _position, st.sampled_from([1, 2, 4, 8]),
                  st.one_of(st.sampled_from(BOUNDARY), st.integers(0, 2**64 - 1)), st.booleans()),
        st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), _position, st.integers(1, 64)),
        st.tuples(st.just("truncate"), _position),
        st.tuples(st.just("copy"), _position, _position, st.integers(1, 256)),
    )
    return st.lists(op, min_size=1, max_size=max_size)


def mutate(data: bytes, ops) -> bytes:
    """Apply mutation operations (from :func:`mutations`) to a file's bytes."""
    buf = bytearray(data)
    for op in ops:
        if not buf:
            break
        pos = int(op[1] * len(buf))
        kind = op[0]
        if kind == "flip":
            buf[pos] ^= 1 << op[2]
        elif kind == "byte":
            buf[pos] = op[2]
        elif kind == "int":
            width, value, big = op[2], op[3], op[4]
            raw = (value % (1 << (8 * width))).to_bytes(width, "big" if big else "little")
            buf[pos:pos + width] = raw
        elif kind == "insert":
            buf[pos:pos] = op[2]
        elif kind == "delete":
            del buf[pos:pos + op[2]]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "copy":
            src, n = int(op[2] * len(buf)), op[3]
            buf[pos:pos + n] = buf[src:src + n]
    return bytes(buf)


# Structure-aware mutations: a zip's checksums and a safetensors header's
# length prefix are fixed after the mutation, so that the mutant reaches the
# unpickler or the header parser instead of stopping at a CRC or length check.

def _rezip(data: bytes, member_ops) -> bytes:
    """Mutate one member of a zip (chosen by fraction) and write the zip again, checksums right."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = [(info.filename, z.read(info.filename)) for info in z.infolist()]
    which, ops = member_ops
    pkl = [i for i, (name, _) in enumerate(members) if name.endswith("data.pkl")]
    index = pkl[0] if which < 0.6 and pkl else int(which * len(members)) % len(members)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for i, (name, content) in enumerate(members):
            z.writestr(name, mutate(content, ops) if i == index else content)
    return out.getvalue()


def _reheader(data: bytes, ops) -> bytes:
    """Mutate a safetensors header's bytes; the length prefix follows."""
    n = int.from_bytes(data[:8], "little")
    header = mutate(data[8:8 + n], ops)
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


_json_values = st.one_of(
    st.sampled_from(BOUNDARY), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.none(), st.booleans(),
    st.sampled_from(["F32", "BF16", "F16", "I64", "BOOL", "F8_E4M3", "", "\x1b[2J\x00", "x" * 300]),
    st.lists(st.sampled_from(BOUNDARY), max_size=5), st.just([[[[1]]]]), st.just({"a": "b"}), st.just({}),
)


def _rejson(data: bytes, edits) -> bytes:
    """Replace values in a safetensors header's JSON (chosen by fraction), then write it back."""
    import json

    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])

    def slots(node, out):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            out.append((node, key))
            slots(value, out)
        return out

    for where, value in edits:
        places = slots(header, [])
        if places:
            node, key = places[int(where * len(places))]
            node[key] = copy.deepcopy(value)  # (st.just values are shared between draws)
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + data[8 + n:]


@st.composite
def mutants(draw, family: str, sources) -> bytes:
    """One mutated file of a family: raw bytes, or structure-aware for zips and safetensors."""
    source = draw(st.sampled_from(sources))
    if family == "pickle":
        return draw(hostile_pickles())
    if family == "torch_zip" and draw(st.booleans()):
        return _rezip(source, (draw(_position), draw(mutations())))
    if family == "safetensors":
        target = draw(st.sampled_from(["file", "header", "json"]))
        if target == "header":
            return _reheader(source, draw(mutations()))
        if target == "json":
            return _rejson(source, draw(st.lists(st.tuples(_position, _json_values), min_size=1, max_size=3)))
    return mutate(source, draw(mutations()))


# --------------------------------------------------------------------------
# Malicious pickles: random opcode streams that name dangerous and allowed
# globals, call them (REDUCE, NEWOBJ, OBJ, INST), BUILD on them, reach the
# memo and the extension registry. A payload creates MARKER if it ever runs.
# --------------------------------------------------------------------------

MARKER_ENV = "NPSAM_FUZZ_MARKER"
MARKER = Path(tempfile.gettempdir()) / f"npsam-fuzz-payload-ran-{os.getpid()}"  # the worker checks it after each case
DANGEROUS = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
             ("__builtin__", "eval"), ("builtins", "getattr"), ("builtins", "setattr"), ("builtins", "__import__"),
             ("subprocess", "call"), ("functools", "partial"), ("operator", "attrgetter"), ("copyreg", "_reconstructor"),
             ("builtins", "object"), ("torch", "load"), ("npsam.io.checkpoint", "_SAFE_GLOBALS"),
             ("numpy", "load"), ("pickle", "loads")]
ALLOWED = [("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"), ("torch", "FloatStorage"),
           ("torch", "BFloat16Storage"), ("collections", "OrderedDict"), ("torch.cuda", "HalfStorage")]


def _unicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def hostile_pickles():
    marker = str(MARKER)
    payloads = [f"touch {marker}", f"open({marker!r}, 'w').close()", "name", "BFloat16Storage", "storage", "0", "cpu"]
    glob = st.sampled_from(DANGEROUS + ALLOWED)
    op = st.one_of(
        glob.map(lambda g: b"c" + f"{g[0]}\n{g[1]}\n".encode()),
        glob.map(lambda g: _unicode(g[0]) + _unicode(g[1]) + b"\x93"),  # STACK_GLOBAL
        glob.map(lambda g: b"(" + b"i" + f"{g[0]}\n{g[1]}\n".encode()),  # INST
        st.sampled_from(payloads).map(_unicode),
        st.integers(-(2**31), 2**31 - 1).map(lambda v: b"J" + v.to_bytes(4, "little", signed=True)),
        st.integers(0, 255).map(lambda v: b"K" + bytes([v])),
        st.integers(0, 8).map(lambda v: b"q" + bytes([v])),  # BINPUT
        st.integers(0, 8).map(lambda v: b"h" + bytes([v])),  # BINGET
        st.integers(0, 255).map(lambda v: b"\x82" + bytes([v])),  # EXT1
        st.sampled_from([b"(", b"t", b"\x85", b"\x86", b"\x87", b"}", b"]", b")", b"a", b"e", b"s", b"u", b"R", b"b",
                         b"\x81", b"\x92", b"o", b"Q", b"N", b"\x88", b"\x89", b"0", b"2", b"1", b"\x94", b"l", b"d"]),
    )
    return st.lists(op, min_size=1, max_size=24).map(lambda ops: b"\x80\x04" + b"".join(ops) + b".").map(_in_zip)


def _in_zip(pkl: bytes) -> bytes:
    """A pickle as the data.pkl of a torch.save zip with one 48-byte storage "0"."""
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", bytes(48))
    return out.getvalue()


# --------------------------------------------------------------------------
# The worker pool (one worker)
# --------------------------------------------------------------------------

class Worker:
    """A fuzz_worker.py process, restarted when it dies; ``run`` reads one file."""

    def __init__(self, good_checkpoint, folder, case_seconds: float = 10.0, address_space: int = 2 << 30) -> None:
        self.good = str(good_checkpoint)
        self.folder = Path(folder)
        self.case_seconds = case_seconds
        self.env = dict(os.environ, NPSAM_FUZZ_CASE_SECONDS=str(case_seconds), NPSAM_FUZZ_ADDRESS_SPACE=str(address_space),
                        OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO))
        self.env[MARKER_ENV] = str(MARKER)
        self.counts: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.process = None
        self.serial = 0

    def _start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), str(REPO), self.good], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=self.env, text=True, bufsize=1,
        )

    def close(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def run(self, family: str, data: bytes) -> dict:
        """{"outcome", "detail"} for one file's bytes, read by the family's reader."""
        if self.process is None or self.process.poll() is not None:
            self._start()
        self.serial += 1
        path = self.folder / f"case{self.serial % 2}{Path(family).suffix}"
        path.write_bytes(data)
        self.process.stdin.write(f"{WORKER_READER.get(family, family)}\t{path}\n")
        self.process.stdin.flush()
        # The worker's own timer stops a case after case_seconds; this is the
        # backstop for a worker stuck outside Python (or starting up).
        ready, _, _ = select.select([self.process.stdout], [], [], self.case_seconds + 60)
        line = self.process.stdout.readline() if ready else ""
        if line:
            result = json.loads(line)
        else:
            self.process.kill()
            code = self.process.wait()
            self.process = None
            result = {"outcome": "crash" if ready else "timeout", "detail": f"worker died or hung (status {code})"}
        self.counts[family][result["outcome"]] += 1
        return result


def failure_message(family: str, data: bytes, result: dict, keep_in=None) -> str:
    """What to print for a bad outcome; the file is kept for a regression test."""
    where = ""
    if keep_in is not None:
        keep_in = Path(keep_in)
        keep_in.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=keep_in, prefix=f"{family}-", suffix=".bin")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        where = f" (file kept as {name})"
    return f"{family}: {len(data)}-byte mutant -> {result['outcome']}{where}\n{result['detail']}"
