"""``npsam serve``: click to segment in the browser, and see what SAM looks at.

    npsam serve assets/images            # then open the address it prints

A local web app (Starlette + uvicorn: ``pip install "npsam[serve]"``) over
the photos of the given files and folders, or uploaded ones. The page is
static HTML, CSS and JavaScript shipped in ``static/``: no build step,
nothing fetched from the network. ``state.py`` holds the model work and the
state of each tab, ``app.py`` the routes. See docs/serve.md.

Importing this package is cheap (argparse only); Starlette, uvicorn and the
model code are imported when the server starts.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from typing import List, Optional, Sequence, Tuple

EXAMPLES = """Examples:
  npsam serve assets/images                   # every photo of the folder; open http://127.0.0.1:8000/
  npsam serve assets/images/truck.jpg --port 8080
  npsam serve photos/ --cache-size 4 --max-upload-mb 10
  npsam serve photos/ --host 0.0.0.0          # reachable from other machines (no login: trusted networks only)

In the page: left click adds a foreground point, right click (or shift-click)
a background point, a drag draws a box. Uploads are limited to --max-upload-mb
megabytes and 40 million pixels.
"""


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import _positive_int, add_model_arguments

    parser.add_argument("photos", nargs="*", metavar="PHOTO_OR_FOLDER",
                        help="photos and folders of photos to offer (folders are read recursively); "
                             "with none, only uploads")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--cache-size", type=_positive_int, default=8,
                        help="image embeddings kept, least recently used dropped first (default 8, 4 MB each)")
    parser.add_argument("--max-upload-mb", type=_positive_int, default=20, help="largest upload in MB (default 20)")
    parser.add_argument("--points-per-side", type=_positive_int, default=32,
                        help="the 'everything' button's default grid of N x N points (default 32)")
    add_model_arguments(parser)


def build_server(photos: Sequence[str], checkpoint: Optional[Sequence[str]] = None, model_type: Optional[str] = None,
                 cache_size: int = 8, max_upload_bytes: int = 20 * 1024 * 1024, points_per_side: int = 32):
    """A ``state.Server``: the model (loaded once), the maker of decoder-only
    copies sharing its weights (one per cached photo, one for "everything"),
    the photo library."""
    from ...build_sam import sam_model_registry
    from ..cli import CliError, load_model
    from .state import PhotoLibrary, Server

    sam, model = load_model(checkpoint, model_type)
    if not sam.has_image_encoder:
        raise CliError("npsam serve needs an image encoder: --checkpoint must include the encoder's weights")
    decoder_only = {k: v for k, v in sam.state_dict().items() if not k.startswith("image_encoder.")}

    def make_decoder():  # the same weight arrays; its own derived values and per-image work
        return sam_model_registry[model["model_type"]](checkpoint=decoder_only)

    library = PhotoLibrary(photos, max_upload_bytes)
    return Server(sam, make_decoder, library, cache_size, points_per_side, model)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error})") from None
    sock.listen(128)
    return sock


def allowed_hosts(host: str) -> Optional[List[str]]:
    """The Host headers to accept: the loopback names when listening on a
    loopback address (no DNS rebinding from a web page), else any."""
    from .app import LOOPBACK_HOSTS

    return LOOPBACK_HOSTS if host in LOOPBACK_HOSTS else None


def start_in_thread(server, host: str = "127.0.0.1", port: int = 0) -> Tuple[str, "object", threading.Thread]:
    """Run the app on a background thread: (url, uvicorn server, thread). Stop
    it with ``uv.should_exit = True; thread.join()`` (tests, scripts/load_serve.py)."""
    import uvicorn

    from .app import create_app

    sock = bind(host, port)
    config = uvicorn.Config(create_app(server, allowed_hosts(host)), log_level="warning", timeout_graceful_shutdown=2)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True, name="npsam-serve")
    thread.start()
    while not uv.started and thread.is_alive():
        time.sleep(0.02)
    if not uv.started:
        raise RuntimeError("npsam serve: the server did not start")
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{actual}/", uv, thread


def run_serve(args: argparse.Namespace) -> int:
    """npsam serve: start the web app and print its address."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise ImportError('npsam serve needs Starlette and uvicorn: pip install "npsam[serve]"') from None
    from .app import create_app

    sock = bind(args.host, args.port)  # first: a port in use is said before the model loads
    try:
        server = build_server(args.photos, args.checkpoint, args.model_type, args.cache_size,
                              args.max_upload_mb * 1024 * 1024, args.points_per_side)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    count = len(server.library.list())
    print(f"npsam serve: {count} photo{'s' if count != 1 else ''}; open http://{shown}:{port}/ (Ctrl+C to stop)",
          flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"npsam serve: listening on {args.host}: anyone who can reach this machine can use the app "
              "and read the photos it serves (there is no login)", file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(server, allowed_hosts(args.host)), log_level="warning",
                            timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        server.close()
    return 0


__all__: List[str] = ["EXAMPLES", "add_serve_arguments", "run_serve", "build_server", "start_in_thread"]
