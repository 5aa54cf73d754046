"""The web app of ``npsam serve``: Starlette routes over ``state.Server``.

Every ``/api`` answer is JSON (or a PNG / photo for the image routes); a
refused request is a 4xx with ``{"error": "..."}``. The work runs in worker
threads (at most ``WORKER_THREADS`` at once), so the event loop keeps
answering, for instance the progress polls while a photo is being encoded.

Routes (``{sid}`` a session = one browser tab, ``{pid}`` a photo id):

    GET  /                                   the page (static HTML, CSS, JS shipped in the package)
    GET  /api/config                         limits and defaults
    GET  /api/photos                         the photos: id, name, width, height
    POST /api/photos                         upload a photo (the request body is the file; X-Filename names it)
    GET  /api/photos/{pid}                   one photo, with its embedding's state
    GET  /api/photos/{pid}/image             the photo itself
    POST /api/photos/{pid}/embed             start computing its embedding (poll GET /api/photos/{pid})
    POST /api/sessions                       a new session: {"session": sid}
    GET  /api/sessions/{sid}/photos/{pid}    the tab's state on the photo (points, box, candidates, kept)
    POST .../prompt                          {"point": [x, y, label]} or {"box": [x0, y0, x1, y1]},
                                             optional "new": true (a new object: no mask fed back)
    POST .../undo  .../redo  .../clear       history
    POST .../pick                            {"index": i}: show candidate i
    POST .../keep                            {"label": "..."}: keep the current mask as an object
    POST .../explain                         what SAM looks at for the current prompt (attention heat maps)
    DELETE .../objects/{oid}                 forget a kept object
    GET  .../objects/{oid}.png               a kept object's overlay
    POST .../everything                      {"points_per_side": n}: start the automatic mask generator
    GET  /api/sessions/{sid}/jobs/{jid}      its progress
    GET  .../everything.png                  its masks, one colour each
    POST .../everything/keep                 {"label": "..."}: keep all its masks as objects
    GET  .../mask.png                        export: the current mask, 1-bit PNG at the photo's size
    GET  .../objects.json                    export: the kept objects, COCO JSON with RLE
"""

from __future__ import annotations

import json
from functools import partial
from urllib.parse import unquote
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .state import ApiError, Server

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
# The page loads nothing but this server's files, and images from it, data: and blob: URLs.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'")
WORKER_THREADS = 8  # request threads at once (decoder calls are serialized by a lock anyway)
MAX_JSON_BYTES = 64 * 1024


def create_app(server: Server, allowed_hosts: Optional[Sequence[str]] = None):
    """The Starlette application serving ``server``. ``allowed_hosts``: the Host
    headers accepted (npsam serve gives the loopback names when it listens on
    127.0.0.1, so that a web page cannot reach it through DNS rebinding)."""
    try:
        import anyio
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware
        from starlette.requests import Request
        from starlette.responses import FileResponse, JSONResponse, Response
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles
    except ImportError:
        raise ImportError('npsam serve needs Starlette and uvicorn: pip install "npsam[serve]"') from None

    limiter = anyio.CapacityLimiter(WORKER_THREADS)

    async def run(fn: Callable, *args) -> Any:
        return await anyio.to_thread.run_sync(partial(fn, *args), limiter=limiter)

    async def read_json(request: Request) -> Any:
        body = await _read_body(request, MAX_JSON_BYTES, "request body")
        if not body.strip():
            return {}
        try:
            return json.loads(body)
        except ValueError as error:
            raise ApiError(400, f"request body: expected JSON, got invalid JSON ({error})") from None

    def png(data: bytes, filename: str = "") -> Response:
        headers = {"Cache-Control": "no-store"}
        if filename:
            headers["Content-Disposition"] = f'attachment; filename="{filename}"'
        return Response(data, media_type="image/png", headers=headers)

    def ids(request: Request):
        return request.path_params["sid"], request.path_params["pid"]

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache",
                                                            "Content-Security-Policy": CONTENT_SECURITY_POLICY})

    async def config(request: Request):
        return JSONResponse(server.config())

    async def photos(request: Request):
        if request.method == "POST":
            data = await _read_body(request, server.library.max_upload_bytes, "upload")
            name = unquote(request.headers.get("x-filename", "upload"))
            photo = await run(server.library.add_upload, data, name)
            return JSONResponse(await run(server.photo_record, photo.id), status_code=201)
        await run(server.library.scan)
        return JSONResponse({"photos": server.library.list()})

    async def photo(request: Request):
        return JSONResponse(await run(server.photo_record, request.path_params["pid"]))

    async def photo_image(request: Request):
        data, media_type = await run(lambda: server.library.get(request.path_params["pid"]).browser_bytes())
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    async def embed(request: Request):
        return JSONResponse(await run(server.embed, request.path_params["pid"]), status_code=202)

    async def new_session(request: Request):
        return JSONResponse({"session": server.sessions.create().id}, status_code=201)

    async def view(request: Request):
        return JSONResponse(await run(server.view, *ids(request)))

    def action(method: Callable, with_body: bool = True):
        async def endpoint(request: Request):
            body = await read_json(request) if with_body else None
            args = ids(request) + ((body,) if with_body else ())
            return JSONResponse(await run(method, *args))
        return endpoint

    async def everything(request: Request):
        body = await read_json(request)
        return JSONResponse(await run(server.everything, *ids(request), body), status_code=202)

    async def job(request: Request):
        return JSONResponse(await run(server.job, request.path_params["sid"], request.path_params["jid"]))

    async def everything_png(request: Request):
        return png(await run(server.everything_png, *ids(request)))

    async def object_png(request: Request):
        return png(await run(server.object_png, *ids(request), request.path_params["oid"]))

    async def forget(request: Request):
        return JSONResponse(await run(server.forget, *ids(request), request.path_params["oid"]))

    async def mask_export(request: Request):
        sid, pid = ids(request)
        data = await run(server.mask_png, sid, pid)
        return png(data, _stem(server.library.get(pid).name) + "_mask.png")

    async def coco_export(request: Request):
        sid, pid = ids(request)
        data = await run(server.coco, sid, pid)
        name = _stem(server.library.get(pid).name) + "_objects.json"
        return JSONResponse(data, headers={"Content-Disposition": f'attachment; filename="{name}"',
                                           "Cache-Control": "no-store"})

    async def api_error(request: Request, error: ApiError):
        return JSONResponse({"error": error.message}, status_code=error.status)

    async def http_error(request: Request, error: HTTPException):
        message = error.detail if isinstance(error.detail, str) else "error"
        if error.status_code == 404:
            message = f"not found: {request.url.path[:200]}"
        elif error.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path[:200]}"
        return JSONResponse({"error": message}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    async def server_error(request: Request, error: Exception):
        # a bug, not a bad request: said as JSON too, so that the page can show it
        text = " ".join(str(error).split())[:300] or type(error).__name__
        return JSONResponse({"error": f"internal error ({type(error).__name__}): {text}"}, status_code=500)

    base = "/api/sessions/{sid}/photos/{pid}"
    routes = [
        Route("/", index),
        Route("/api/config", config),
        Route("/api/photos", photos, methods=["GET", "POST"]),
        Route("/api/photos/{pid}", photo),
        Route("/api/photos/{pid}/image", photo_image),
        Route("/api/photos/{pid}/embed", embed, methods=["POST"]),
        Route("/api/sessions", new_session, methods=["POST"]),
        Route(base, view),
        Route(base + "/prompt", action(server.prompt), methods=["POST"]),
        Route(base + "/undo", action(server.undo, False), methods=["POST"]),
        Route(base + "/redo", action(server.redo, False), methods=["POST"]),
        Route(base + "/clear", action(server.clear, False), methods=["POST"]),
        Route(base + "/pick", action(server.pick), methods=["POST"]),
        Route(base + "/keep", action(server.keep), methods=["POST"]),
        Route(base + "/explain", action(server.explain, False), methods=["POST"]),
        Route(base + "/everything", everything, methods=["POST"]),
        Route(base + "/everything.png", everything_png),
        Route(base + "/everything/keep", action(server.keep_everything), methods=["POST"]),
        Route(base + "/objects/{oid:int}.png", object_png),
        Route(base + "/objects/{oid:int}", forget, methods=["DELETE"]),
        Route(base + "/mask.png", mask_export),
        Route(base + "/objects.json", coco_export),
        Route("/api/sessions/{sid}/jobs/{jid}", job),
        Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))] if allowed_hosts else []
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.server = server
    return app


async def _read_body(request, limit: int, what: str) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"{what} is {int(declared):,} bytes; the limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} is more than {limit:,} bytes (the limit)")
        chunks.append(chunk)
    return b"".join(chunks)


def _stem(name: str) -> str:
    stem = Path(name).stem or "photo"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80]
