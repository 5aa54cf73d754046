"""What ``npsam serve`` keeps and computes, without the web framework.

- ``PhotoLibrary``: the photos the server may show (the files and folders it
  was given, and uploads kept in a private temporary folder), each under an
  opaque id. Nothing else on disk is ever read: requests name photos by id,
  never by path, and a folder's entries are listed only if their real path
  lies inside the folder (a symlink pointing out of it is skipped).
- ``Embeddings``: each photo's image embedding, computed once in a background
  thread with progress, kept in a least-recently-used cache of bounded size.
- ``Sessions``: one per browser tab. A session holds, per photo, the history
  of prompts and their results (undo, redo), the kept objects and the last
  "everything" result. Two tabs never share a session.
- ``Server``: the actions of the API (prompt, undo, redo, clear, pick, keep,
  everything, exports) over those three, with the locks that make them safe.

Threads: the model is not thread-safe (the mask decoder keeps per-image work
between calls). Each cached photo therefore gets its own prompt encoder and
mask decoder (the weights' arrays are shared; only values derived from them
are not: a few MB), so that clicks on two photos do not undo each other's
per-image work. Decoder calls still take turns on one lock, ``decoder_lock``,
"everything" taking it batch by batch: the fast layer's BLAS thread setting
is process-wide, and two decoders running at once can round differently
(1-ulp differences seen with a mask_input), so that an answer would depend on
what else ran. Embeddings are computed one at a time by their own worker
thread, beside the clicks (the UI stays responsive while a photo is encoded).

Dimension letters: H, W photo height and width; C candidate masks (3);
N points.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Formats a browser shows as they are; others are sent re-encoded as PNG.
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
                   "BMP": "image/bmp"}
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # the default upload limit (npsam serve --max-upload-mb)
MAX_PIXELS = 40_000_000  # largest photo accepted (width x height), uploaded or listed
MAX_UPLOADS = 64  # uploads kept; the oldest is forgotten beyond this
MAX_STEPS = 16  # undo levels per photo and tab
MAX_SESSIONS = 32  # tabs remembered; the least recently used is forgotten beyond this
MAX_SESSION_PHOTOS = 4  # photos with prompts per tab
# Logits kept for refining (each prompt's [3, 256, 256] candidates and the
# [1, 256, 256] mask it was given: about 1 MB), over all tabs; beyond this the
# oldest prompts keep only their masks (shown, picked, kept, exported as ever,
# but a click refining one starts without a previous mask).
LOGITS_BUDGET_BYTES = 256 * 1024 * 1024
MAX_LABEL = 100  # characters of an object's label
MAX_KEPT = 255  # kept objects per photo and tab
MAX_POINTS = 64  # points per prompt
EVERYTHING_MAX_SIDE = 64  # largest points_per_side of "everything"
# NOTE(reference): the notebooks' show_mask colour [30, 144, 255] at alpha 0.6.
MASK_RGBA = (30, 144, 255, 153)
EVERYTHING_ALPHA = 140  # per mask of "everything" (the notebooks' show_anns: 0.35; a little more on screen)
HEAT_RGB = (255, 40, 40)  # the attention heat maps' colour (docs/attention.png's)


class ApiError(Exception):
    """A request the server refuses: an HTTP status (4xx) and a message for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _mask_palette(rgba: Sequence[int] = MASK_RGBA) -> np.ndarray:
    return np.array([[0, 0, 0, 0], list(rgba)], dtype=np.uint8)  # [2, 4]: transparent, the mask colour


def mask_png(mask: np.ndarray, rgba: Sequence[int] = MASK_RGBA) -> bytes:
    """[H, W] bool -> a 1-bit palette PNG: transparent outside, ``rgba`` inside."""
    from ...io.image_io import encode_indexed_png

    return encode_indexed_png(mask, _mask_palette(rgba))


def mask_from_png(png: bytes, size: Tuple[int, int]) -> np.ndarray:
    """The [H, W] bool mask of a PNG written by ``mask_png`` (the exact pixels the page shows)."""
    h, w = size
    pos, data = 8, []
    while pos < len(png):
        length = int.from_bytes(png[pos: pos + 4], "big")
        kind = png[pos + 4: pos + 8]
        if kind == b"IDAT":
            data.append(png[pos + 8: pos + 8 + length])
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(b"".join(data)), dtype=np.uint8).reshape(h, -1)  # [H, 1 + row bytes]
    return np.unpackbits(raw[:, 1:], axis=1, count=w).astype(bool)  # filter byte dropped -> [H, W]


# ---------------------------------------------------------------------------
# Photos
# ---------------------------------------------------------------------------
@dataclass
class Photo:
    """A photo the server may show: ``path`` is a real path inside a given
    folder (or the upload folder); ``size`` is (H, W) upright (EXIF applied)."""

    id: str
    name: str
    path: str
    size: Tuple[int, int]
    format: str
    uploaded: bool = False

    def record(self) -> Dict[str, Any]:
        return {"id": self.id, "name": self.name, "width": self.size[1], "height": self.size[0],
                "uploaded": self.uploaded}

    def load(self) -> np.ndarray:
        from ...io.image_io import load_image

        return load_image(self.path)  # -> [H, W, 3] uint8 RGB

    def browser_bytes(self) -> Tuple[bytes, str]:
        """(bytes, media type) to show the photo in a page: the file itself when
        browsers read its format, else a PNG of its pixels."""
        if self.format in BROWSER_FORMATS:
            return Path(self.path).read_bytes(), BROWSER_FORMATS[self.format]
        from ...io.image_io import encode_png

        return encode_png(self.load()), "image/png"


def probe_image(path: str, what: str, decode: bool = False) -> Tuple[Tuple[int, int], str]:
    """((H, W) upright, format) from the file's header, or an ApiError: 415 when
    it is not an image, 413 when it has more than MAX_PIXELS pixels. ``decode``
    also decodes the pixels (uploads: a truncated file is refused at once)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError('npsam serve reads photos with Pillow: pip install "npsam[serve]"') from None
    try:
        with Image.open(path) as img:
            w, h = img.size
            fmt = img.format or ""
            # NOTE(reference): cv2.imread (the notebooks') and load_image turn photos
            # upright by the EXIF Orientation tag; 5..8 swap width and height.
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
            if decode and w * h <= MAX_PIXELS:
                img.load()
    except Exception as error:  # PIL raises many types for bad data
        raise ApiError(415, f"{what} is not an image Pillow can read "
                            f"(expected JPEG, PNG, WebP, BMP, GIF or TIFF): {' '.join(str(error).split())}") from None
    if w * h > MAX_PIXELS:
        raise ApiError(413, f"{what} is {w}x{h} = {w * h:,} pixels; the limit is {MAX_PIXELS:,}")
    if w < 1 or h < 1:
        raise ApiError(415, f"{what} is an empty image ({w}x{h})")
    return (h, w), fmt


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


class PhotoLibrary:
    """The photos of the given files and folders (folders read recursively,
    symlinks leading outside skipped), plus uploads."""

    def __init__(self, roots: Sequence[str], max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
        self.roots: List[Path] = []
        for root in roots:
            path = Path(root)
            if not path.exists():
                raise FileNotFoundError(f"PHOTO_OR_FOLDER: no such file or folder: {root!r}")
            self.roots.append(path.resolve())
        self.max_upload_bytes = max_upload_bytes
        self.upload_dir = Path(tempfile.mkdtemp(prefix="npsam-serve-uploads-"))
        self._photos: "OrderedDict[str, Photo]" = OrderedDict()
        self._uploads: "OrderedDict[str, Photo]" = OrderedDict()
        self._lock = threading.Lock()
        self.scan()

    def close(self) -> None:
        shutil.rmtree(self.upload_dir, ignore_errors=True)

    def _candidates(self):
        for root in self.roots:
            if root.is_file():
                yield root, root.name
                continue
            for folder, dirs, files in os.walk(root):  # followlinks=False: no walking out through a symlink
                dirs.sort()
                for name in sorted(files):
                    if not name.lower().endswith(IMAGE_SUFFIXES) or name.startswith("."):
                        continue
                    real = Path(folder, name).resolve()
                    if _inside(real, root) and real.is_file():
                        yield real, str(Path(folder, name).relative_to(root))

    def scan(self) -> None:
        """(Re)list the given files and folders; unreadable files are left out."""
        found: "OrderedDict[str, Photo]" = OrderedDict()
        for real, name in self._candidates():
            pid = "f" + hashlib.sha256(str(real).encode("utf-8")).hexdigest()[:16]
            known = self._photos.get(pid)
            if known is not None:
                found[pid] = known
                continue
            try:
                size, fmt = probe_image(str(real), name)
            except ApiError:
                continue
            found[pid] = Photo(pid, name, str(real), size, fmt)
        with self._lock:
            self._photos = found

    def list(self) -> List[Dict[str, Any]]:
        with self._lock:
            return [p.record() for p in list(self._photos.values()) + list(self._uploads.values())]

    def get(self, pid: str) -> Photo:
        with self._lock:
            photo = self._photos.get(pid) or self._uploads.get(pid)
        if photo is None:
            raise ApiError(404, f"unknown photo id {pid[:80]!r} (GET /api/photos lists them)")
        return photo

    def add_upload(self, data: bytes, name: str) -> Photo:
        """Keep an uploaded file (already checked against the size limit) as a
        photo: 415 if it is not an image, 413 if it has too many pixels."""
        if len(data) > self.max_upload_bytes:
            raise ApiError(413, f"upload is {len(data):,} bytes; the limit is {self.max_upload_bytes:,}")
        if not data:
            raise ApiError(415, "upload is empty; expected the bytes of a photo (JPEG, PNG, ...)")
        digest = hashlib.sha256(data).hexdigest()
        pid = "u" + digest[:16]
        with self._lock:
            if pid in self._uploads:
                self._uploads.move_to_end(pid)
                return self._uploads[pid]
        name = "".join(c for c in os.path.basename(name or "") if c.isprintable())[:100] or "upload"
        fd, tmp = tempfile.mkstemp(dir=self.upload_dir, prefix=".upload.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            size, fmt = probe_image(tmp, f"upload {name!r}", decode=True)
        except BaseException:
            os.unlink(tmp)
            raise
        path = self.upload_dir / pid
        os.replace(tmp, path)
        photo = Photo(pid, name, str(path), size, fmt, uploaded=True)
        with self._lock:
            self._uploads[pid] = photo
            while len(self._uploads) > MAX_UPLOADS:
                _, old = self._uploads.popitem(last=False)
                Path(old.path).unlink(missing_ok=True)
        return photo


# ---------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------
@dataclass
class Embedding:
    """One photo's embedding, or its computation in progress."""

    state: str = "encoding"  # "encoding", "ready" or "error"
    done: int = 0
    total: int = 0
    seconds: float = 0.0
    error: str = ""
    predictor: Any = None  # a SamPredictor on the photo's own decoder, holding the embedding, once ready

    def status(self) -> Dict[str, Any]:
        out = {"state": self.state, "done": self.done, "total": self.total, "seconds": round(self.seconds, 3)}
        if self.error:
            out["error"] = self.error
        return out


class Embeddings:
    """Image embeddings, computed in one background thread, at most ``capacity``
    kept (the least recently used dropped first). ``make_decoder()`` builds the
    prompt encoder and mask decoder each photo gets (a decoder-only Sam)."""

    def __init__(self, sam, capacity: int, make_decoder: Callable[[], Any]) -> None:
        from ...predictor import SamPredictor

        if capacity < 1:
            raise ValueError(f"capacity: expected at least 1 photo, got {capacity}")
        self.sam = sam
        self.make_decoder = make_decoder
        self.capacity = capacity
        self._encoder = SamPredictor(sam)
        self._entries: "OrderedDict[str, Embedding]" = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="npsam-encoder")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def request(self, photo: Photo) -> Embedding:
        """The photo's entry; starts computing it unless it is kept or on its way."""
        with self._lock:
            entry = self._entries.get(photo.id)
            if entry is not None and entry.state != "error":
                self._entries.move_to_end(photo.id)
                return entry
            entry = Embedding()
            self._entries[photo.id] = entry
        self._executor.submit(self._encode, photo, entry)
        return entry

    def status(self, pid: str) -> Dict[str, Any]:
        with self._lock:
            entry = self._entries.get(pid)
        return {"state": "absent", "done": 0, "total": 0, "seconds": 0.0} if entry is None else entry.status()

    def ready(self, pid: str) -> Embedding:
        with self._lock:
            entry = self._entries.get(pid)
            if entry is not None and entry.state == "ready":
                self._entries.move_to_end(pid)
                return entry
        state = "absent (or dropped from the cache)" if entry is None else entry.state
        raise ApiError(409, f"photo {pid!r} is not encoded yet ({state}); POST /api/photos/{pid}/embed, "
                            "then wait for its state to be 'ready'")

    def _encode(self, photo: Photo, entry: Embedding) -> None:
        from ...predictor import SamPredictor

        start = time.monotonic()

        def progress(done: int, total: int) -> None:
            entry.done, entry.total = int(done), int(total)
            entry.seconds = time.monotonic() - start

        try:
            image = photo.load()  # [H, W, 3]
            self._encoder.set_image(image, progress=progress)
            features = self._encoder.get_image_embedding()  # [1, 256, 64, 64]
            self._encoder.reset_image()
            predictor = SamPredictor(self.make_decoder())
            predictor.set_embedding(features, image.shape[:2])
            # Read-only: the decoder then knows the array cannot have changed
            # between two clicks and keeps its per-image work.
            predictor.features.flags.writeable = False
            entry.predictor = predictor
            entry.seconds = time.monotonic() - start
            entry.state = "ready"
        except Exception as error:  # reported to the page through the status
            entry.error = " ".join(str(error).split()) or type(error).__name__
            entry.state = "error"
        with self._lock:
            ready = [pid for pid, e in self._entries.items() if e.state == "ready"]
            for pid in ready[: max(len(ready) - self.capacity, 0)]:
                del self._entries[pid]


# ---------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------
@dataclass
class Step:
    """One state of a photo's prompt: the points and box so far and the
    candidates they gave. An empty step (no points, no box) is a cleared prompt."""

    points: List[List[float]] = field(default_factory=list)  # [N, 3]: x, y, label
    box: Optional[List[float]] = None
    scores: List[float] = field(default_factory=list)  # [C]
    low_res: Optional[np.ndarray] = None  # [C, 256, 256] logits, fed back as mask_input
    pngs: List[bytes] = field(default_factory=list)  # [C] mask PNGs, what the page shows
    chosen: int = 0
    mask_input: Optional[np.ndarray] = None  # [1, 256, 256]: the previous step's logits fed back, if any
    used_mask_input: bool = False
    logits_dropped: bool = False  # by LogitsBudget: masks only

    @property
    def has_mask(self) -> bool:
        return bool(self.pngs)


@dataclass
class Kept:
    """A kept object: its mask as an uncompressed RLE (a few kB, where the
    [H, W] mask would take H*W bytes), with area and XYWH bbox."""

    id: int
    label: str
    rle: Dict[str, Any]  # {"size": [H, W], "counts": [...]}, column-major, as mask_to_rle_pytorch
    area: int
    bbox: List[int]
    score: float
    points: List[List[float]]
    box: Optional[List[float]]
    png: bytes
    color: Tuple[int, int, int]

    @classmethod
    def of_mask(cls, oid: int, label: str, mask: np.ndarray, score: float, points, box) -> "Kept":
        from ...utils.amg import mask_to_rle_pytorch

        color = tuple(int(c) for c in _object_color(oid))
        rle = mask_to_rle_pytorch(mask[None])[0]  # [1, H, W] -> uncompressed RLE
        return cls(oid, label, rle, int(np.count_nonzero(mask)), mask_bbox(mask), float(score), points, box,
                   mask_png(mask, color + (150,)), color)

    def record(self) -> Dict[str, Any]:
        return {"id": self.id, "label": self.label, "area": self.area, "bbox": self.bbox, "score": self.score,
                "color": "#%02x%02x%02x" % self.color}


def mask_bbox(mask: np.ndarray) -> List[int]:
    """XYWH box of a [H, W] bool mask, as amg.batched_mask_to_box then box_xyxy_to_xywh give it."""
    from ...utils.amg import batched_mask_to_box, box_xyxy_to_xywh

    return [int(v) for v in box_xyxy_to_xywh(batched_mask_to_box(mask[None])[0])]


@dataclass
class PhotoState:
    """A tab's work on one photo."""

    steps: List[Step] = field(default_factory=list)
    pos: int = -1  # index of the current step; -1 before the first prompt
    kept: List[Kept] = field(default_factory=list)
    next_id: int = 1
    everything: Optional[Dict[str, Any]] = None  # {"count", "png", "records", "serial"}

    def current(self) -> Optional[Step]:
        return self.steps[self.pos] if self.pos >= 0 else None

    def push(self, step: Step) -> None:
        """Make ``step`` the current one; the redo steps are dropped, and the oldest beyond MAX_STEPS."""
        del self.steps[self.pos + 1:]
        self.steps.append(step)
        if len(self.steps) > MAX_STEPS:
            del self.steps[: len(self.steps) - MAX_STEPS]
        self.pos = len(self.steps) - 1


@dataclass
class Session:
    id: str
    photos: "OrderedDict[str, PhotoState]" = field(default_factory=OrderedDict)
    lock: threading.RLock = field(default_factory=threading.RLock)  # one action at a time per tab
    jobs: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def photo(self, pid: str) -> PhotoState:
        with self.lock:
            state = self.photos.get(pid)
            if state is None:
                state = self.photos[pid] = PhotoState()
                while len(self.photos) > MAX_SESSION_PHOTOS:
                    self.photos.popitem(last=False)
            self.photos.move_to_end(pid)
            return state


class Sessions:
    def __init__(self, capacity: int = MAX_SESSIONS) -> None:
        self.capacity = capacity
        self._sessions: "OrderedDict[str, Session]" = OrderedDict()
        self._lock = threading.Lock()

    def create(self) -> Session:
        session = Session(secrets.token_urlsafe(12))
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > self.capacity:
                self._sessions.popitem(last=False)
        return session

    def get(self, sid: str) -> Session:
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None:
                self._sessions.move_to_end(sid)
        if session is None:
            raise ApiError(404, f"unknown session id {sid[:80]!r} (sessions are forgotten when the server "
                                "restarts or after the least recently used of many tabs): reload the page")
        return session


# ---------------------------------------------------------------------------
# Checking requests
# ---------------------------------------------------------------------------
def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ApiError(400, f"{what}: expected a finite number, got {value!r:.60}")
    return float(value)


def check_point(value: Any, size: Tuple[int, int]) -> List[float]:
    """[x, y, label] in photo pixels, label 1 (foreground) or 0 (background)."""
    if not isinstance(value, list) or len(value) != 3:
        raise ApiError(400, f"point: expected [x, y, label] with label 1 (foreground) or 0 (background), "
                            f"got {value!r:.80}")
    x, y = _number(value[0], "point x"), _number(value[1], "point y")
    if value[2] not in (0, 1) or isinstance(value[2], bool):
        raise ApiError(400, f"point label: expected 1 (foreground) or 0 (background), got {value[2]!r:.40}")
    h, w = size
    if not (0 <= x <= w and 0 <= y <= h):
        raise ApiError(422, f"point ({x:g}, {y:g}) is outside the photo (x in [0, {w}], y in [0, {h}] for {w}x{h})")
    return [x, y, int(value[2])]


def check_box(value: Any, size: Tuple[int, int]) -> List[float]:
    """[x0, y0, x1, y1] in photo pixels with x0 <= x1, y0 <= y1."""
    if not isinstance(value, list) or len(value) != 4:
        raise ApiError(400, f"box: expected [x0, y0, x1, y1], got {value!r:.80}")
    x0, y0, x1, y1 = (_number(v, "box") for v in value)
    if x1 < x0 or y1 < y0:
        raise ApiError(400, f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}]: expected x0 <= x1 and y0 <= y1")
    h, w = size
    if not (0 <= x0 and x1 <= w and 0 <= y0 and y1 <= h):
        raise ApiError(422, f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is outside the photo "
                            f"(x in [0, {w}], y in [0, {h}] for {w}x{h})")
    return [x0, y0, x1, y1]


def _check_keys(body: Any, allowed: Sequence[str], what: str) -> Dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"{what}: expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(400, f"{what}: unknown field(s) {', '.join(map(repr, unknown))[:200]}; "
                            f"expected {', '.join(allowed)}")
    return body


# ---------------------------------------------------------------------------
# The actions
# ---------------------------------------------------------------------------
class LogitsBudget:
    """Bounds the memory of the steps' logits over all tabs: the least recently
    made steps lose theirs first."""

    def __init__(self, limit: int = LOGITS_BUDGET_BYTES) -> None:
        self.limit = limit
        self.used = 0
        self._steps: "OrderedDict[int, Step]" = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _size(step: Step) -> int:
        return sum(a.nbytes for a in (step.low_res, step.mask_input) if a is not None)

    def add(self, step: Step) -> None:
        with self._lock:
            self._steps[id(step)] = step
            self.used += self._size(step)
            while self.used > self.limit and len(self._steps) > 1:
                _, old = self._steps.popitem(last=False)
                self.used -= self._size(old)
                old.low_res = old.mask_input = None
                old.logits_dropped = True


class Server:
    """The API's actions. ``sam`` needs an image encoder; ``make_decoder()``
    builds a prompt encoder + mask decoder on the same weights (a decoder-only
    Sam): one per cached photo, one for "everything"."""

    def __init__(self, sam, make_decoder: Callable[[], Any], library: PhotoLibrary, cache_size: int = 8,
                 points_per_side: int = 32, model: Optional[Dict[str, Any]] = None) -> None:
        if not sam.has_image_encoder:
            raise ValueError("npsam serve needs an image encoder: --checkpoint must include the encoder's weights")
        self.sam = sam
        self.everything_sam = make_decoder()
        self.library = library
        self.embeddings = Embeddings(sam, cache_size, make_decoder)
        self.logits = LogitsBudget()
        self.decoder_lock = threading.Lock()
        self.sessions = Sessions()
        self.points_per_side = points_per_side
        self.model = model or {}
        self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="npsam-everything")

    def close(self) -> None:
        self.embeddings.close()
        self._jobs.shutdown(wait=False, cancel_futures=True)
        self.library.close()

    def config(self) -> Dict[str, Any]:
        return {"max_upload_bytes": self.library.max_upload_bytes, "max_pixels": MAX_PIXELS,
                "points_per_side": self.points_per_side, "everything_max_side": EVERYTHING_MAX_SIDE,
                "undo_levels": MAX_STEPS, "cache_size": self.embeddings.capacity, "model": self.model}

    # -- photos ---------------------------------------------------------------
    def photo_record(self, pid: str) -> Dict[str, Any]:
        photo = self.library.get(pid)
        return {**photo.record(), "embedding": self.embeddings.status(pid)}

    def embed(self, pid: str) -> Dict[str, Any]:
        photo = self.library.get(pid)
        self.embeddings.request(photo)
        return {**photo.record(), "embedding": self.embeddings.status(pid)}

    # -- a tab's state ----------------------------------------------------------
    def _open(self, sid: str, pid: str) -> Tuple[Session, Photo, PhotoState]:
        session = self.sessions.get(sid)
        photo = self.library.get(pid)
        return session, photo, session.photo(pid)

    def view(self, sid: str, pid: str, state: Optional[PhotoState] = None) -> Dict[str, Any]:
        """What the page shows for a photo: the current step, its candidates, kept objects."""
        if state is None:
            session, photo, state = self._open(sid, pid)
        base = f"/api/sessions/{sid}/photos/{pid}"
        step = state.current() or Step()
        return {
            "photo": pid,
            "step": state.pos + 1,
            "steps": len(state.steps),
            "can_undo": state.pos >= 0,
            "can_redo": state.pos < len(state.steps) - 1,
            "points": step.points,
            "box": step.box,
            "candidates": [{"score": s, "png": data_url(p)} for s, p in zip(step.scores, step.pngs)],
            "chosen": step.chosen if step.has_mask else None,
            "mask_input": step.used_mask_input,
            "kept": [{**k.record(), "png": f"{base}/objects/{k.id}.png"} for k in state.kept],
            "everything": None if state.everything is None else
            {"count": state.everything["count"], "png": f"{base}/everything.png?n={state.everything['serial']}"},
        }

    def prompt(self, sid: str, pid: str, body: Any) -> Dict[str, Any]:
        """Add a point or set the box, then decode: the previous step's chosen
        candidate goes back in as mask_input (unless ``new``)."""
        body = _check_keys(body, ("point", "box", "new"), "prompt")
        if ("point" in body) == ("box" in body):
            raise ApiError(400, "prompt: expected exactly one of point [x, y, label] or box [x0, y0, x1, y1]")
        session, photo, state = self._open(sid, pid)
        entry = self.embeddings.ready(pid)
        size = entry.predictor.original_size
        point = check_point(body["point"], size) if "point" in body else None
        box = check_box(body["box"], size) if "box" in body else None
        with session.lock:
            previous = None if body.get("new") else state.current()
            points = list(previous.points) if previous is not None else []
            if point is not None:
                if len(points) >= MAX_POINTS:
                    raise ApiError(422, f"prompt: at most {MAX_POINTS} points per object; keep it or clear")
                points.append(point)
            if box is None and previous is not None:
                box = previous.box
            # NOTE(reference): as the official notebooks refine a mask: the low-res
            # logits of the mask shown go back in as mask_input with the new prompt.
            mask_input = None
            if previous is not None and previous.has_mask and previous.low_res is not None:
                mask_input = previous.low_res[previous.chosen][None]  # [C, 256, 256] -> [1, 256, 256]
            step = self._decode(entry, points, box, mask_input)
            self.logits.add(step)
            state.push(step)
            return self.view(sid, pid, state)

    def _arrays(self, points, box):
        coords = np.array([[p[0], p[1]] for p in points], dtype=np.float64).reshape(-1, 2) if points else None  # [N, 2]
        labels = np.array([p[2] for p in points], dtype=np.int64) if points else None  # [N]
        return coords, labels, (None if box is None else np.array(box, dtype=np.float64))  # [4]

    def _decode(self, entry: Embedding, points, box, mask_input) -> Step:
        coords, labels, box_array = self._arrays(points, box)
        with self.decoder_lock:
            masks, scores, low_res = entry.predictor.predict(coords, labels, box_array, mask_input,
                                                             multimask_output=True)  # [C, H, W], [C], [C, 256, 256]
        pngs = [mask_png(m) for m in masks]
        return Step(points=points, box=box, scores=[float(s) for s in scores], low_res=low_res, pngs=pngs,
                    chosen=int(np.argmax(scores)), mask_input=mask_input, used_mask_input=mask_input is not None)

    def explain(self, sid: str, pid: str) -> Dict[str, Any]:
        """What SAM looks at: the current step's prompt again (same points, box
        and mask_input) on the reference path, traced; each token-to-image
        attention's weights for the output tokens, as heat maps over the photo.
        The masks shown stay the ones the prompt gave (the fast path's)."""
        from ...io.image_io import encode_png
        from ..attention import OUTPUT_TOKENS, attention_heat, decoder_attention
        from ..trace import trace

        session, _photo, state = self._open(sid, pid)
        entry = self.embeddings.ready(pid)
        with session.lock:
            step = state.current()
            if step is None or not step.has_mask:
                raise ApiError(409, "explain: no prompt yet; click on the photo first")
            mask_input = step.mask_input  # read before the budget may drop it
            if step.logits_dropped or (step.used_mask_input and mask_input is None):
                raise ApiError(409, "explain: this prompt is too old to run again (its logits were dropped "
                                    "to bound memory); click again")
        coords, labels, box_array = self._arrays(step.points, step.box)
        decoder = entry.predictor.model.mask_decoder  # the photo's own
        with self.decoder_lock:
            with trace(decoder, inputs=True, select=lambda name: "attn_token_to_image" in name) as recorded:
                entry.predictor.predict(coords, labels, box_array, mask_input, multimask_output=True)
            layers = decoder_attention(decoder, recorded)  # [(name, [1, T, HW])]
        grid = self.sam.prompt_encoder.image_embedding_size  # (64, 64)
        h, w = entry.predictor.input_size  # the photo in the 1024 frame
        patch = self.sam.image_encoder.img_size // grid[0]  # input pixels per embedding cell (16)
        rows, cols = -(-h // patch), -(-w // patch)  # cells covering the photo; the rest is padding
        out_layers = []
        for name, attn in layers:
            maps = []
            for token in range(len(OUTPUT_TOKENS)):
                heat = attention_heat(attn[0, token], grid)[:rows, :cols]  # [64, 64] -> [rows, cols]
                rgba = np.zeros((rows, cols, 4), dtype=np.uint8)
                rgba[..., :3] = HEAT_RGB
                rgba[..., 3] = np.rint(200 * heat).astype(np.uint8)
                maps.append(data_url(encode_png(rgba)))
            out_layers.append({"name": name.split("transformer.", 1)[-1], "maps": maps})
        # The cells' extent in photo pixels (the last row/column may reach past the photo).
        scale = entry.predictor.original_size[1] / w
        return {"explain": {"tokens": list(OUTPUT_TOKENS), "layers": out_layers,
                            "extent": [cols * patch * scale, rows * patch * entry.predictor.original_size[0] / h],
                            "candidates": [{"token": i + 1, "score": s} for i, s in enumerate(step.scores)]}}

    def undo(self, sid: str, pid: str) -> Dict[str, Any]:
        session, _photo, state = self._open(sid, pid)
        with session.lock:
            if state.pos < 0:
                raise ApiError(409, "undo: nothing to undo")
            state.pos -= 1
            return self.view(sid, pid, state)

    def redo(self, sid: str, pid: str) -> Dict[str, Any]:
        session, _photo, state = self._open(sid, pid)
        with session.lock:
            if state.pos >= len(state.steps) - 1:
                raise ApiError(409, "redo: nothing to redo")
            state.pos += 1
            return self.view(sid, pid, state)

    def clear(self, sid: str, pid: str) -> Dict[str, Any]:
        """An empty prompt, as a step of its own (undo brings the prompt back)."""
        session, _photo, state = self._open(sid, pid)
        with session.lock:
            current = state.current()
            if current is not None and (current.points or current.box is not None):
                state.push(Step())
            return self.view(sid, pid, state)

    def pick(self, sid: str, pid: str, body: Any) -> Dict[str, Any]:
        body = _check_keys(body, ("index",), "pick")
        session, _photo, state = self._open(sid, pid)
        with session.lock:
            step = state.current()
            if step is None or not step.has_mask:
                raise ApiError(409, "pick: no candidates yet; click on the photo first")
            index = body.get("index")
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(step.pngs):
                raise ApiError(400, f"pick: expected index 0..{len(step.pngs) - 1}, got {index!r:.40}")
            step.chosen = index
            return self.view(sid, pid, state)

    def keep(self, sid: str, pid: str, body: Any) -> Dict[str, Any]:
        """Keep the current mask as an object with a label, and start the next one."""
        body = _check_keys(body, ("label",), "keep")
        label = body.get("label", "object")
        if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL:
            raise ApiError(400, f"keep: expected a label of 1 to {MAX_LABEL} characters, got {label!r:.60}")
        session, photo, state = self._open(sid, pid)
        with session.lock:
            step = state.current()
            if step is None or not step.has_mask:
                raise ApiError(409, "keep: no mask to keep; click on the photo first")
            self._check_room(state, 1)
            mask = mask_from_png(step.pngs[step.chosen], photo.size)
            state.kept.append(Kept.of_mask(state.next_id, label.strip(), mask, step.scores[step.chosen],
                                           step.points, step.box))
            state.next_id += 1
            state.push(Step())
            return self.view(sid, pid, state)

    def keep_everything(self, sid: str, pid: str, body: Any) -> Dict[str, Any]:
        """Keep every mask of the last "everything" run as objects (label
        "everything" unless given), e.g. to export them as COCO JSON."""
        from ...utils.amg import rle_to_mask

        body = _check_keys(body, ("label",), "keep everything")
        label = body.get("label", "everything")
        if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL:
            raise ApiError(400, f"keep everything: expected a label of 1 to {MAX_LABEL} characters, got {label!r:.60}")
        session, _photo, state = self._open(sid, pid)
        with session.lock:
            if state.everything is None:
                raise ApiError(409, "keep everything: run 'everything' on this photo first")
            records = state.everything["records"]
            self._check_room(state, len(records))
            for r in records:  # the generator's point is a foreground click
                point = [float(v) for v in r["point_coords"][0]] + [1]
                state.kept.append(Kept.of_mask(state.next_id, label.strip(), rle_to_mask(r["segmentation"]),
                                               r["predicted_iou"], [point], None))
                state.next_id += 1
            return self.view(sid, pid, state)

    @staticmethod
    def _check_room(state: PhotoState, more: int) -> None:
        if len(state.kept) + more > MAX_KEPT:
            raise ApiError(422, f"keep: at most {MAX_KEPT} objects per photo; {len(state.kept)} kept, "
                                f"{more} more asked (export and forget some first)")

    def forget(self, sid: str, pid: str, oid: int) -> Dict[str, Any]:
        session, _photo, state = self._open(sid, pid)
        with session.lock:
            kept = [k for k in state.kept if k.id != oid]
            if len(kept) == len(state.kept):
                raise ApiError(404, f"unknown object id {oid} for this photo")
            state.kept = kept
            return self.view(sid, pid, state)

    # -- exports --------------------------------------------------------------
    def current_mask(self, sid: str, pid: str) -> Tuple[np.ndarray, Photo]:
        session, photo, state = self._open(sid, pid)
        with session.lock:
            step = state.current()
            if step is None or not step.has_mask:
                raise ApiError(404, "no current mask: click on the photo (or undo back to a mask) first")
            return mask_from_png(step.pngs[step.chosen], photo.size), photo

    def mask_png(self, sid: str, pid: str) -> bytes:
        """The current mask as ``npsam segment`` writes mask_N.png: 1-bit grayscale, the photo's size."""
        from ...io.image_io import encode_png

        mask, _photo = self.current_mask(sid, pid)
        return encode_png(mask)

    def object_png(self, sid: str, pid: str, oid: int) -> bytes:
        session, _photo, state = self._open(sid, pid)
        for k in state.kept:
            if k.id == oid:
                return k.png
        raise ApiError(404, f"unknown object id {oid} for this photo")

    def coco(self, sid: str, pid: str) -> Dict[str, Any]:
        """The kept objects as a COCO dataset of one image: segmentation as COCO
        RLE (compressed when pycocotools is installed, else uncompressed counts;
        pycocotools reads both), bbox XYWH, area, one category per label."""
        session, photo, state = self._open(sid, pid)
        with session.lock:
            kept = list(state.kept)
        try:
            from ...utils.amg import coco_encode_rle
            import pycocotools  # noqa: F401
        except ImportError:
            coco_encode_rle = None
        labels = sorted({k.label for k in kept})
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(labels)]
        ids = {name: i + 1 for i, name in enumerate(labels)}
        annotations = []
        for n, k in enumerate(kept, 1):
            annotations.append({
                "id": n, "image_id": 1, "category_id": ids[k.label],
                "segmentation": coco_encode_rle(k.rle) if coco_encode_rle is not None else k.rle,
                "area": k.area, "bbox": k.bbox, "iscrowd": 0,
                "predicted_iou": k.score, "point_coords": [p[:2] for p in k.points],
                "point_labels": [p[2] for p in k.points], "box": k.box,
            })
        h, w = photo.size
        return {"info": {"description": "objects kept in npsam serve", "date_created": time.strftime("%Y-%m-%d")},
                "images": [{"id": 1, "file_name": photo.name, "width": w, "height": h}],
                "annotations": annotations, "categories": categories}

    # -- everything -------------------------------------------------------------
    def everything(self, sid: str, pid: str, body: Any) -> Dict[str, Any]:
        """Start the automatic mask generator on the photo (one job at a time,
        in the background); the page polls the job."""
        body = _check_keys(body if body is not None else {}, ("points_per_side",), "everything")
        side = body.get("points_per_side", self.points_per_side)
        if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= EVERYTHING_MAX_SIDE:
            raise ApiError(400, f"everything: expected points_per_side 1..{EVERYTHING_MAX_SIDE}, got {side!r:.40}")
        session, photo, state = self._open(sid, pid)
        entry = self.embeddings.ready(pid)
        job = {"id": secrets.token_urlsafe(8), "photo": pid, "state": "queued", "done": 0, "total": 0,
               "points_per_side": side, "count": None, "error": "", "seconds": 0.0}
        with session.lock:
            session.jobs[job["id"]] = job
            while len(session.jobs) > 16:
                session.jobs.pop(next(iter(session.jobs)))
        self._jobs.submit(self._run_everything, session, photo, state, entry, job)
        return dict(job)

    def job(self, sid: str, jid: str) -> Dict[str, Any]:
        session = self.sessions.get(sid)
        job = session.jobs.get(jid)
        if job is None:
            raise ApiError(404, f"unknown job id {jid[:40]!r} for this session")
        return dict(job)

    def _run_everything(self, session: Session, photo: Photo, state: PhotoState, entry: Embedding,
                        job: Dict[str, Any]) -> None:
        from ...automatic_mask_generator import SamAutomaticMaskGenerator
        from ...io.image_io import encode_indexed_png
        from ...utils.amg import rle_to_mask
        from ..overlay import mask_colors

        start = time.monotonic()

        def progress(done: int, total: int) -> None:
            job["done"], job["total"] = int(done), int(total)
            job["seconds"] = round(time.monotonic() - start, 3)

        try:
            job["state"] = "running"
            generator = SamAutomaticMaskGenerator(self.everything_sam, points_per_side=job["points_per_side"],
                                                  output_mode="uncompressed_rle", progress=progress)
            features = entry.predictor.features
            # The photo's embedding is already computed: the generator's one crop
            # (crop_n_layers=0, the whole photo) takes it instead of set_image.
            generator.predictor.set_image = lambda crop: generator.predictor.set_embedding(features, crop.shape[:2])
            batch = generator._process_batch  # the decoder's batch (the fast layer's twin, or predict_batch)

            def locked_batch(*args, **kwargs):  # a click waits for one batch at most
                with self.decoder_lock:
                    return batch(*args, **kwargs)

            generator._process_batch = locked_batch
            records = generator.generate(photo.load())
            # One palette PNG: each pixel names the smallest mask covering it
            # (masks drawn largest first, as overlay_masks and show_anns do).
            order = sorted(range(len(records)), key=lambda i: -records[i]["area"])[:255]
            index = np.zeros(photo.size, dtype=np.uint8)  # [H, W], 0 = no mask
            for rank, i in enumerate(order, 1):
                index[rle_to_mask(records[i]["segmentation"])] = rank
            palette = np.zeros((len(order) + 1, 4), dtype=np.uint8)  # [1 + M, 4]
            palette[1:, :3] = mask_colors(len(order)) if order else np.zeros((0, 3))
            palette[1:, 3] = EVERYTHING_ALPHA
            png = encode_indexed_png(index, palette)
            with session.lock:
                serial = (state.everything or {}).get("serial", 0) + 1
                state.everything = {"count": len(records), "png": png, "records": records, "serial": serial}
            job["count"] = len(records)
            job["state"] = "done"
        except Exception as error:
            job["error"] = " ".join(str(error).split()) or type(error).__name__
            job["state"] = "error"
        job["seconds"] = round(time.monotonic() - start, 3)

    def everything_png(self, sid: str, pid: str) -> bytes:
        session, _photo, state = self._open(sid, pid)
        if state.everything is None:
            raise ApiError(404, "no 'everything' result for this photo yet")
        return state.everything["png"]


def _object_color(n: int) -> Tuple[int, int, int]:
    """Kept object n's colour (n = 1, 2, ...): overlay_masks' colours from the
    third on (its second is a blue, too close to the current mask's)."""
    from ..overlay import mask_colors

    return mask_colors(n + 2)[n + 1]
