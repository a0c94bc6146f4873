"""The HTTP face of a :class:`~terrasam.serve.session.Session`: a FastAPI app and its server.

Every request body is a strict pydantic model (unknown fields refused, coordinates, counts and
text lengths bounded, bodies capped in bytes); errors are JSON ``{"error": ..., "code": ...}``.
Only the one raster given is served: the page and its scripts are a fixed set of files read
at start-up, tiles are addressed by z/x/y integers, exports by a format name, so nothing
from a request is ever used as a path. Requests that change state carry a per-server token
(the page reads it from /api/info), and on a loopback address only requests for a loopback
host name are answered (no DNS rebinding).
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import secrets
import socket
import threading
import time
from typing import Annotated, Literal

import numpy as np

from terrasam.errors import TerrasamError
from terrasam.serve.session import MAX_POINTS, MAX_TEXT, RequestError, Session
from terrasam.serve.tiles import MAX_ZOOM, TILE, _encode_png

try:
    import uvicorn
    from fastapi import FastAPI, HTTPException, Path, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field, model_validator
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:  # pragma: no cover - exercised through require()
    from terrasam.serve import INSTALL_HINT

    raise TerrasamError(INSTALL_HINT) from None

MAX_BODY = 64 * 1024  # bytes of a request body
MAX_KEEP = 4096  # candidates kept in one request
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
TOKEN_HEADER = "x-terrasam-token"
_STATIC = {"index.html": "text/html; charset=utf-8",
           "app.js": "text/javascript; charset=utf-8",
           "app.css": "text/css; charset=utf-8"}
_CSP = ("default-src 'self'; img-src 'self' data: https://tile.openstreetmap.org "
        "https://server.arcgisonline.com; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")

Lon = Annotated[float, Field(ge=-180.0, le=180.0, allow_inf_nan=False)]
Lat = Annotated[float, Field(ge=-90.0, le=90.0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PointIn(_Strict):
    lon: Lon
    lat: Lat
    label: Literal[0, 1] = 1


class BoundsIn(_Strict):
    west: Lon
    south: Lat
    east: Lon
    north: Lat

    @model_validator(mode="after")
    def _ordered(self):
        if not (self.west < self.east and self.south < self.north):
            raise ValueError("bounds need west < east and south < north")
        return self

    def tuple(self) -> tuple[float, float, float, float]:
        return (self.west, self.south, self.east, self.north)


class SegmentIn(_Strict):
    points: list[PointIn] = Field(default_factory=list, max_length=MAX_POINTS)
    box: BoundsIn | None = None


class ViewIn(_Strict):
    bounds: BoundsIn


class TextIn(_Strict):
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    bounds: BoundsIn


class KeepIn(_Strict):
    candidates: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=MAX_KEEP)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or "localhost") is a loopback address."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error(status: int, message: str, code: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, "code": code, **extra}, status_code=status,
                        headers={"Cache-Control": "no-store"})


class _Guard:
    """ASGI middleware: host-name check, body size cap, token on state-changing requests."""

    def __init__(self, app, token: str, loopback: bool):
        self.app = app
        self.token = token
        self.loopback = loopback

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        reply = None
        host = headers.get("host", "")
        name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else \
            host.split(":")[0]
        if self.loopback and name.lower() not in LOOPBACK_NAMES:
            reply = _error(403, f"host {host!r} is not served; open http://127.0.0.1 instead.",
                           "host")
        elif scope["method"] not in ("GET", "HEAD") and not secrets.compare_digest(
                headers.get(TOKEN_HEADER, ""), self.token):
            reply = _error(403, "missing or wrong session token; reload the page.", "token")
        else:
            try:
                length = int(headers.get("content-length", "0") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY:
                reply = _error(413, f"request bodies are limited to {MAX_BODY} bytes.",
                               "too_large")
        if reply is not None:
            return await reply(scope, receive, send)

        seen = 0

        async def capped():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:
                    raise HTTPException(413, f"request bodies are limited to {MAX_BODY} bytes.")
            return message

        return await self.app(scope, capped, send)


def _static_files() -> dict[str, tuple[bytes, str]]:
    """Every file the page may load, read once: name -> (bytes, media type)."""
    from terrasam import viz

    folder = importlib.resources.files("terrasam.serve") / "static"
    files = {name: (folder.joinpath(name).read_bytes(), media) for name, media in _STATIC.items()}
    assets = viz.leaflet_assets()
    if assets is None:
        raise TerrasamError("Leaflet's files were not found; reinstall terrasam "
                            "(it needs django-js-lib-leaflet).")
    js, css = assets
    files["leaflet.js"] = (js.encode("utf-8"), "text/javascript; charset=utf-8")
    files["leaflet.css"] = (css.encode("utf-8"), "text/css; charset=utf-8")
    return files


def create_app(session: Session, *, loopback: bool = True, token: str | None = None):
    """The FastAPI app serving ``session`` (``app.state.token`` is its session token)."""
    token = token or secrets.token_urlsafe(24)
    files = _static_files()
    empty_tile = _encode_png(np.zeros((TILE, TILE, 4), np.uint8))
    app = FastAPI(title="terrasam serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.session = session
    app.state.token = token
    app.add_middleware(_Guard, token=token, loopback=loopback)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return _error(exc.status, str(exc), exc.code)

    @app.exception_handler(TerrasamError)
    async def _terrasam_error(request, exc: TerrasamError):
        return _error(422, str(exc), "invalid")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
                  for e in exc.errors()][:10]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(p for p in first["loc"] if p != "body")
        return _error(422, f"invalid request: {where + ': ' if where else ''}{first['msg']}",
                      "invalid_request", detail=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method", 413: "too_large"}.get(exc.status_code, "http")
        return _error(exc.status_code, str(exc.detail), code)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["Referrer-Policy"] = "no-referrer"
        if request.url.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    def _file(name: str) -> Response:
        data, media = files[name]
        return Response(data, media_type=media, headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    def index():
        return _file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name not in files:
            raise StarletteHTTPException(404, "no such file")
        return _file(name)

    @app.get("/api/info")
    def info():
        return {**session.info(), "token": token}

    @app.get("/api/status")
    def status():
        return session.status()

    @app.get("/tiles/{z}/{x}/{y}.png")
    def tile(z: Annotated[int, Path(ge=0, le=MAX_ZOOM)], x: Annotated[int, Path(ge=0)],
             y: Annotated[int, Path(ge=0)]):
        if x >= (1 << z) or y >= (1 << z):
            raise RequestError(f"tile {z}/{x}/{y} does not exist.", "tile")
        data = session.tiles.render(z, x, y) if z <= session.tiles.max_zoom else None
        return Response(data or empty_tile, media_type="image/png",
                        headers={"Cache-Control": "max-age=3600"})

    # results hold big coordinate lists: JSONResponse dumps them directly (no re-encoding)
    @app.post("/api/segment")
    def segment(body: SegmentIn):
        return JSONResponse(session.segment([(p.lon, p.lat, p.label) for p in body.points],
                                            body.box.tuple() if body.box else None))

    @app.post("/api/everything")
    def everything(body: ViewIn):
        return JSONResponse(session.everything(body.bounds.tuple()))

    @app.post("/api/text")
    def text(body: TextIn):
        return JSONResponse(session.text(body.text, body.bounds.tuple()))

    @app.post("/api/prefetch")
    def prefetch(body: ViewIn):
        return session.prefetch(body.bounds.tuple())

    @app.get("/api/objects")
    def objects():
        return JSONResponse(session.object_features())

    @app.post("/api/objects")
    def keep(body: KeepIn):
        return JSONResponse({"type": "FeatureCollection",
                             "features": session.keep(body.candidates)})

    @app.delete("/api/objects/{object_id}")
    def delete(object_id: Annotated[int, Path(ge=1)]):
        session.delete(object_id)
        return {"deleted": object_id}

    @app.get("/api/export")
    def export(format: Annotated[Literal["gpkg", "geojson", "parquet"], Query()] = "gpkg"):
        data, name, media = session.export(format)
        return Response(data, media_type=media,
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    return app


class Server:
    """uvicorn serving an app on an already bound socket; ``start()`` runs it in a thread
    (tests, notebooks), ``run()`` in this one until Ctrl+C."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8000):
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            sock.close()
            raise TerrasamError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                                "choose another --port.") from None
        sock.listen(64)
        self.socket = sock
        self.host, self.port = host, sock.getsockname()[1]
        shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
        self.url = f"http://{shown}:{self.port}/"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def start(self, timeout: float = 30.0) -> Server:
        self._thread = threading.Thread(target=self.run, name="terrasam-serve", daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        while not self.server.started and time.monotonic() - t0 < timeout:
            time.sleep(0.02)
        if not self.server.started:
            raise TerrasamError("the server did not start.")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def serve(raster, *, host: str = "127.0.0.1", port: int = 8000, allow_remote: bool = False,
          open_browser: bool = False, echo=print, session: Session | None = None,
          **session_options) -> None:
    """Serve ``raster`` until interrupted (see :class:`Session` for ``session_options``).

    A non-loopback ``host`` needs ``allow_remote=True`` (the command line sets it when
    ``--host`` is given explicitly).
    """
    loopback = is_loopback(host)
    if not loopback and not allow_remote:
        raise TerrasamError(f"refusing to serve on {host}, which is not a loopback address; "
                            "pass --host explicitly to share the page on the network.")
    session = session or Session(raster, **session_options)
    try:
        app = create_app(session, loopback=loopback)
        server = Server(app, host, port)
        echo(f"terrasam: serving {session.src.name} with {session.adapter.model_id} at "
             f"{server.url} (Ctrl+C to stop)")
        if not loopback:
            echo(f"terrasam: warning: anyone who can reach {host}:{server.port} can use this "
                 "page and download the objects kept")
        if open_browser:
            import webbrowser

            threading.Timer(0.5, webbrowser.open, args=(server.url,)).start()
        from terrasam.interrupt import stand_down

        stand_down()  # uvicorn shuts down on Ctrl+C in its own time
        server.run()
    finally:
        session.close()


__all__ = ["create_app", "serve", "Server", "is_loopback"]
