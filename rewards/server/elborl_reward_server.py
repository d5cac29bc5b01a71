"""A reward server speaking ``elborl-reward/1`` (docs/reward-protocol.md), in one file.

It imports nothing from elborl: copy it into the environment a reward model needs (old torch,
mmdet for GenEval, HPSv2's pinned protobuf) and install only ``fastapi``, ``uvicorn``,
``numpy`` and ``pillow`` (``msgpack`` too for msgpack bodies). ``elborl reward-serve`` runs the
same app around elborl's registered rewards.

A backend is any class with::

    name: str                                   # the reward's name in requests and /v1/info
    range: tuple[float, float] | None = None     # where valid scores lie (None: any finite)
    max_batch: int = 64                          # images per request at most (413 above)
    needs_metadata: bool = False                 # requests must carry per-image metadata
    def load(self, directory: str | None) -> None: ...   # weights from a local directory
    def score(self, images, prompts, metadata):  # uint8 (B, H, W, 3), B str, B dicts or None
        return scores            # B floats (None / NaN: not computable), or (scores, details)

Run: ``ELBORL_REWARD_TOKEN=... python elborl_reward_server.py --backend my_backend.py:MyReward
--weights /models/x --port 18090`` (``--backend builtin:brightness`` is a demo that needs no
weights). It binds 127.0.0.1 unless ``--host`` says otherwise and refuses to start without a
token. Request bodies are never unpickled; images are raw uint8 or PNG, never JPEG.
"""

import argparse
import asyncio
import base64
import hmac
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

PROTOCOL = "elborl-reward/1"
JSON, MSGPACK = "application/json", "application/msgpack"
MAX_BODY_BYTES = 256 * 2**20
log = logging.getLogger("elborl_reward_server")


class ProtocolError(ValueError):
    """A request that breaks the protocol: answered with ``status`` and ``message``."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


# ------------------------------------------------------------------------------- the wire


def encode_images(images: np.ndarray, encoding: str = "raw") -> dict[str, Any]:
    """uint8 (B, H, W, 3) as the protocol's ``images`` object (``raw`` or ``png``; bytes)."""
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
    if encoding == "raw":
        return {"encoding": "raw", "shape": list(images.shape), "dtype": "uint8",
                "data": images.tobytes()}  # fmt: skip
    if encoding == "png":
        from PIL import Image

        data = []
        for img in images:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG", compress_level=1)
            data.append(buf.getvalue())
        return {"encoding": "png", "data": data}
    raise ValueError(f"unknown image encoding {encoding!r}; allowed: raw, png")


def decode_images(obj: Any) -> np.ndarray:
    """The protocol's ``images`` object back to uint8 (B, H, W, 3); ``ProtocolError`` (400)."""
    if not isinstance(obj, dict) or obj.get("encoding") not in ("raw", "png"):
        raise ProtocolError(400, "images: an object with encoding 'raw' or 'png'")
    if obj["encoding"] == "raw":
        shape, data = obj.get("shape"), obj.get("data")
        if obj.get("dtype", "uint8") != "uint8":
            raise ProtocolError(400, "images.dtype: only uint8")
        if not (isinstance(shape, list) and len(shape) == 4 and shape[-1] == 3):
            raise ProtocolError(400, "images.shape: [B, H, W, 3]")
        if not all(isinstance(n, int) and n > 0 for n in shape):
            raise ProtocolError(400, "images.shape: positive integers")
        if not isinstance(data, bytes | bytearray) or len(data) != math.prod(shape):
            raise ProtocolError(400, f"images.data: {math.prod(shape)} bytes for shape {shape}")
        return np.frombuffer(data, dtype=np.uint8).reshape(shape)
    from PIL import Image

    items = obj.get("data")
    if not isinstance(items, list) or not items:
        raise ProtocolError(400, "images.data: a list of PNG files")
    out = []
    for i, item in enumerate(items):
        try:
            img = Image.open(io.BytesIO(item))
            if img.format != "PNG":
                raise ValueError(f"a {img.format} file")
            out.append(np.asarray(img.convert("RGB")))
        except Exception as exc:  # any undecodable image is the client's error
            raise ProtocolError(400, f"images.data[{i}]: not a PNG image ({exc})") from None
    if len({a.shape for a in out}) != 1:
        raise ProtocolError(400, "images.data: every image must have the same size")
    return np.stack(out)


def _b64(obj: Any) -> Any:
    """bytes -> base64 strings throughout (for JSON bodies)."""
    if isinstance(obj, bytes | bytearray):
        return base64.b64encode(obj).decode("ascii")
    if isinstance(obj, dict):
        return {k: _b64(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_b64(v) for v in obj]
    return obj


def dumps(obj: dict[str, Any], content_type: str) -> bytes:
    """A body in ``content_type`` (JSON with base64 bytes, or msgpack with bin)."""
    if content_type == MSGPACK:
        import msgpack

        return bytes(msgpack.packb(obj, use_bin_type=True))
    return json.dumps(_b64(obj), allow_nan=False).encode()


def loads(body: bytes, content_type: str) -> Any:
    """A request or response body; in JSON, ``images.data`` is base64 (decoded here)."""
    if content_type == MSGPACK:
        import msgpack

        return msgpack.unpackb(body, raw=False)
    obj = json.loads(body)
    images = obj.get("images") if isinstance(obj, dict) else None
    if isinstance(images, dict) and "data" in images:
        try:
            data = images["data"]
            images["data"] = (
                [base64.b64decode(d, validate=True) for d in data]
                if isinstance(data, list)
                else base64.b64decode(data, validate=True)
            )
        except (ValueError, TypeError) as exc:
            raise ProtocolError(400, f"images.data: not base64 ({exc})") from None
    return obj


def content_type_of(header: str | None) -> str:
    kind = (header or "").split(";")[0].strip().lower()
    if kind not in (JSON, MSGPACK):
        raise ProtocolError(400, f"Content-Type {kind or 'missing'}: use {JSON} or {MSGPACK}")
    return kind


# ------------------------------------------------------------------------------ the server


def check_request(req: Any, backends: dict[str, Any]) -> tuple[Any, np.ndarray, list[str], Any]:
    """(backend, images, prompts, metadata) of a valid ``/v1/score`` request."""
    if not isinstance(req, dict):
        raise ProtocolError(400, "the body must be an object")
    if req.get("protocol") != PROTOCOL:
        raise ProtocolError(
            400, f"protocol: {req.get('protocol')!r}; this server speaks {PROTOCOL}"
        )
    name = req.get("reward")
    if name is None and len(backends) == 1:
        name = next(iter(backends))
    if name not in backends:
        raise ProtocolError(400, f"reward {name!r} is not served; served: {sorted(backends)}")
    backend = backends[name]
    prompts = req.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ProtocolError(400, "prompts: a list of strings")
    if not prompts:
        raise ProtocolError(400, "prompts: at least one")
    if len(prompts) > int(getattr(backend, "max_batch", 64)):
        raise ProtocolError(413, f"{len(prompts)} images in one request; max_batch is "
                            f"{backend.max_batch}", max_batch=backend.max_batch)  # fmt: skip
    images = decode_images(req.get("images"))
    if len(images) != len(prompts):
        raise ProtocolError(400, f"{len(images)} images for {len(prompts)} prompts; one each")
    metadata = req.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, list)
        or len(metadata) != len(prompts)
        or not all(isinstance(m, dict) for m in metadata)
    ):
        raise ProtocolError(400, "metadata: a list with one object per image")
    if metadata is None and getattr(backend, "needs_metadata", False):
        raise ProtocolError(400, f"reward {name!r} needs metadata (one object per image)")
    return backend, images, prompts, metadata


def run_backend(backend: Any, images: np.ndarray, prompts: list[str], metadata: Any) -> tuple:
    """Scores (floats or None) and details of one batch; ``RuntimeError`` on a bad answer."""
    out = backend.score(images, prompts, metadata)
    scores, details = out if isinstance(out, tuple) else (out, None)
    scores = [None if s is None else float(s) for s in list(scores)]
    if len(scores) != len(prompts):
        raise RuntimeError(f"backend returned {len(scores)} scores for {len(prompts)} images")
    scores = [s if s is not None and math.isfinite(s) else None for s in scores]
    details = [plain(d) for d in details] if details is not None else [{} for _ in scores]
    if len(details) != len(scores):
        raise RuntimeError(f"backend returned {len(details)} details for {len(scores)} images")
    return scores, details


def plain(obj: Any) -> Any:
    """numpy scalars and arrays, tuples: JSON/msgpack-ready Python values."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def reward_info(backend: Any) -> dict[str, Any]:
    rng = getattr(backend, "range", None)
    return {
        "name": backend.name,
        "range": None if rng is None else [float(rng[0]), float(rng[1])],
        "max_batch": int(getattr(backend, "max_batch", 64)),
        "needs_prompts": bool(getattr(backend, "needs_prompts", True)),
        "needs_metadata": bool(getattr(backend, "needs_metadata", False)),
        "version": str(getattr(backend, "version", "")),
    }


def _error_responses() -> dict[str, Any]:
    body = {"content": {JSON: {"schema": {"type": "object", "properties": {
        "protocol": {"type": "string"}, "error": {"type": "string"}}}}}}  # fmt: skip
    meaning = {
        "400": "the request breaks the protocol (the error names the field)",
        "401": "no bearer token",
        "403": "wrong token",
        "413": "body over the limit, or more images than max_batch",
        "429": "busy: retry after Retry-After seconds",
        "500": "the reward backend failed",
        "503": "not ready: retry after Retry-After seconds",
    }
    return {code: {"description": text, **body} for code, text in meaning.items()}


SCORE_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "type": "object",
                    "required": ["protocol", "prompts", "images"],
                    "properties": {
                        "protocol": {"type": "string", "enum": [PROTOCOL]},
                        "request_id": {"type": "string"},
                        "reward": {"type": "string"},
                        "prompts": {"type": "array", "items": {"type": "string"}},
                        "images": {
                            "type": "object",
                            "required": ["encoding", "data"],
                            "properties": {
                                "encoding": {"type": "string", "enum": ["raw", "png"]},
                                "shape": {"type": "array", "items": {"type": "integer"}},
                                "dtype": {"type": "string", "enum": ["uint8"]},
                                "data": {},
                            },
                        },
                        "metadata": {"type": "array", "items": {"type": "object"}},
                        "params": {"type": "object"},
                    },
                }
            },
            MSGPACK: {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {"description": "scores (null: not computable) and details, one per image"},
        **_error_responses(),
    },
}


def error_response(status: int, message: str, **extra: Any) -> Any:
    """A protocol error: JSON ``{"protocol", "error", ...}`` with the status's headers."""
    from fastapi.responses import JSONResponse

    headers = {"Retry-After": "1"} if status in (429, 503) else None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    body = {"protocol": PROTOCOL, "error": message, **extra}
    return JSONResponse(body, status_code=status, headers=headers)


class Scoring:
    """The server's state and request handling: auth, the body limit, the concurrency bound
    (``max_concurrency`` batches scoring, ``max_waiting`` queued, more get 429) and the answer
    cache per ``request_id`` (``cache_size`` answers: a retried request is not rescored)."""

    def __init__(
        self,
        backends: Sequence[Any],
        token: str,
        max_body_bytes: int,
        max_concurrency: int,
        max_waiting: int,
        cache_size: int,
    ):
        if not token:
            raise ValueError("a reward server needs a token (set its environment variable)")
        self.served = {b.name: b for b in backends}
        self.token, self.max_body_bytes = token, max_body_bytes
        self.max_waiting, self.cache_size = max_waiting, cache_size
        self.slots = asyncio.Semaphore(max_concurrency)
        self.waiting = 0
        self.cache: OrderedDict[str, tuple[bytes, str]] = OrderedDict()

    def denied(self, request: Any) -> Any:
        """None for the right bearer token, else the 401 / 403 answer."""
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return error_response(401, "missing bearer token (Authorization: Bearer <token>)")
        if not hmac.compare_digest(header[7:].strip().encode(), self.token.encode()):
            return error_response(403, "wrong token")
        return None

    async def read_body(self, request: Any) -> bytes:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ProtocolError(413, f"body of {declared} bytes; the limit is {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(413, f"body over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def score(self, request: Any) -> Any:
        """``POST /v1/score``."""
        from fastapi.responses import Response

        denied = self.denied(request)
        if denied is not None:
            return denied
        kind = JSON
        try:
            kind = content_type_of(request.headers.get("content-type"))
            req = loads(await self.read_body(request), kind)
            backend, images, prompts, metadata = check_request(req, self.served)
        except ProtocolError as exc:
            return error_response(exc.status, exc.message, **exc.extra)
        except ValueError as exc:  # undecodable JSON / msgpack
            return error_response(400, f"the body is not valid {kind}: {exc}")
        key = f"{backend.name}\0{req.get('request_id') or ''}"
        if req.get("request_id") and key in self.cache:
            body, cached_kind = self.cache[key]
            return Response(body, media_type=cached_kind)
        if self.waiting >= self.max_waiting:
            return error_response(429, f"busy: {self.max_waiting} batches already waiting")
        answer = await self._run(backend, images, prompts, metadata, req.get("request_id"))
        if not isinstance(answer, dict):
            return answer  # an error response
        body = dumps(answer, kind)
        if req.get("request_id"):
            self.cache[key] = (body, kind)
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return Response(body, media_type=kind)

    async def _run(
        self, backend: Any, images: np.ndarray, prompts: list[str], metadata: Any, rid: Any
    ) -> Any:
        """The answer object of one batch (scored in a worker thread), or a 500 response."""
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        start = time.monotonic()
        try:
            scores, details = await asyncio.to_thread(
                run_backend, backend, images, prompts, metadata
            )
        except Exception as exc:  # a backend failure is the server's (500)
            log.exception("reward %s failed on a batch of %d", backend.name, len(prompts))
            msg = f"reward {backend.name!r} failed: {type(exc).__name__}: {exc}"
            return error_response(500, msg)
        finally:
            self.slots.release()
        return {
            "protocol": PROTOCOL,
            "request_id": rid,
            "scores": scores,
            "details": details,
            "model": {"name": backend.name, "version": str(getattr(backend, "version", ""))},
            "seconds": round(time.monotonic() - start, 4),
        }


def create_app(
    backends: Sequence[Any],
    token: str,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_concurrency: int = 1,
    max_waiting: int = 8,
    cache_size: int = 256,
) -> Any:
    """The FastAPI app over loaded ``backends`` (``Scoring`` does the work). ``token``: the
    bearer token every request but ``/v1/health`` carries."""
    from fastapi import FastAPI, Request

    scoring = Scoring(backends, token, max_body_bytes, max_concurrency, max_waiting, cache_size)
    app = FastAPI(title="elborl reward server", version=PROTOCOL, docs_url=None, redoc_url=None)

    @app.api_route("/v1/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, str]:
        return {"status": "ok", "protocol": PROTOCOL}

    @app.get("/v1/info")
    async def info(request: Request) -> Any:
        denied = scoring.denied(request)
        if denied is not None:
            return denied
        return {"protocol": PROTOCOL, "rewards": [reward_info(b) for b in scoring.served.values()]}

    @app.post("/v1/score", openapi_extra=SCORE_OPENAPI)
    async def score(request: Request) -> Any:
        return await scoring.score(request)

    return app


# ----------------------------------------------------------------------------- backends


class Brightness:
    """Demo backend (``builtin:brightness``): the mean pixel value in [0, 1]; no weights."""

    name = "brightness"
    range = (0.0, 1.0)
    max_batch = 64

    def load(self, directory: str | None) -> None:
        return None

    def score(self, images: np.ndarray, prompts: list[str], metadata: Any) -> list[float]:
        return [float(img.mean()) / 255.0 for img in images]


BUILTIN = {"brightness": Brightness}


def load_backend(spec: str, weights: str | None) -> Any:
    """``builtin:NAME``, ``path/to/file.py:Class`` or ``package.module:Class``, loaded."""
    where, _, cls_name = spec.rpartition(":")
    if where == "builtin":
        if cls_name not in BUILTIN:
            raise SystemExit(f"--backend {spec}: built in are {', '.join(BUILTIN)}")
        backend = BUILTIN[cls_name]()
    else:
        if not where or not cls_name:
            raise SystemExit(f"--backend {spec!r}: use FILE.py:Class or module:Class")
        if where.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location("reward_backend", where)
            if module_spec is None or module_spec.loader is None:
                raise SystemExit(f"--backend {spec}: cannot load {where}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        backend = getattr(module, cls_name)()
    backend.load(weights)
    return backend


def read_token(env: str, file: str | None) -> str:
    if file:
        with open(file) as f:
            return f.read().strip()
    token = os.environ.get(env, "")
    if not token:
        raise SystemExit(f"no token: set the environment variable {env} (or pass --token-file)")
    return token


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=f"a reward server speaking {PROTOCOL}")
    p.add_argument("--backend", required=True, action="append", help="builtin:NAME, FILE.py:Class")
    p.add_argument("--weights", help="the backend's weight directory (load(dir))")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=18090)
    p.add_argument("--token-env", default="ELBORL_REWARD_TOKEN")
    p.add_argument("--token-file")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20)
    p.add_argument("--max-concurrency", type=int, default=1)
    args = p.parse_args(argv)
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    token = read_token(args.token_env, args.token_file)
    backends = [load_backend(spec, args.weights) for spec in args.backend]
    app = create_app(
        backends, token, int(args.max_body_mb * 2**20), max_concurrency=args.max_concurrency
    )
    log.info("serving %s on %s:%d", [b.name for b in backends], args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
