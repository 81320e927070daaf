"""`--mode=serve`: a collection's search service, a JSON API and a web page (FastAPI on uvicorn).

    python -m fdh_jax.main --mode=serve --collection=C [--workdir=W] [--host=127.0.0.1]
        [--port=8080] [--token=T]

The API (JSON; every error is a 4xx with `{"error": "one message"}`; README "Serve a
collection" has curl examples, `/docs` the OpenAPI page):

    GET    /api/health                       {"status": "ok", "items": N}
    GET    /api/stats                        size, model identity, code lengths, segments
    POST   /api/search                       multipart: photo, k (10), bits (the longest)
    GET    /api/similar?id=ID&k=10&bits=K    search by an item of the collection
    POST   /api/items                        multipart: photo, id, metadata (JSON object); token
    DELETE /api/items?id=ID                  token
    GET    /api/items?id=ID                  the item: id, name, label, metadata
    GET    /api/thumbnail?id=ID              a JPEG of at most 192 pixels a side
    GET    /                                 the page: drop a photo, see its nearest items

**Throughput.** Photos are decoded in worker threads as they arrive; encoding goes through one
`EncodeBatcher`, which collects the photos that arrive within a short window (or while the
previous batch encodes) and encodes them in one call on its own thread, off the event loop.
Searches and changes run in threads too, and the collection's lock makes a search see every
change whole or not at all.

**Safety.** The server binds 127.0.0.1 unless told otherwise; adding and removing need the token
(`--token` or `$FDH_JAX_TOKEN`, sent as `Authorization: Bearer T`) whenever one is set, and a
server on a non-loopback host refuses to start without one. Bodies are capped (`max_body_bytes`),
photos are decoded with the folder reader's checks (`fdh_jax.data.decode`: pixel count before
decoding, truncated files refused), and thumbnails are read only from the paths of items of the
collection: nothing from a request reaches the file system. An added photo is written (fsynced)
under `C/uploads/` and committed to the collection before the 2xx response.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import io
import json
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from fdh_jax.common.atomic_files import fsync_directory, write_bytes_atomically
from fdh_jax.data.decode import BadImageError, decode_image
from fdh_jax.search.collection import Collection, UnknownIdError
from fdh_jax.search.segments import CollectionError

PAGE = Path(__file__).with_name("page.html")
UPLOADS = "uploads"
MAX_BODY_BYTES = 20 << 20  # a 20 MiB upload is far above any photo a phone takes
THUMBNAIL_PIXELS = 192
_THUMBNAILS_KEPT = 2048


class RequestError(Exception):
    """A bad request: its HTTP status and one message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class EncodeBatcher:
    """Encodes photos arriving from many requests in shared batches, off the event loop.

    `await encode(prepared)` -> `{"K": int8 [K]}` for a photo through `encoder.prepare` (done
    in the request's worker thread, beside the decoding). A batch is started by the first photo
    waiting; it takes the photos that arrive within `window` seconds (and all that queued up
    while the previous batches were encoding), and runs `encoder.encode_prepared` on a thread
    of its own: no input pipeline per call. `in_flight` calls run at once (XLA's CPU client
    runs two concurrently faster than one after the other, as `fdh_jax.encoding.map_source`
    does), so a batch gathered while a slot is free is split in two halves. A call takes at
    most `max_batch` photos, in a batch of one of a few sizes (`batch_size`: each compiles
    once, at `warm_up`).
    """

    def __init__(
        self,
        encoder: Any,
        window: float = 0.004,
        max_batch: int = 16,
        in_flight: int = 2,
    ):
        self.encoder, self.window = encoder, window
        self.max_batch = max(1, int(max_batch))
        self.in_flight = in_flight
        self.executor = concurrent.futures.ThreadPoolExecutor(
            in_flight, thread_name_prefix="encode"
        )
        self.batches = 0
        self.encoded = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def encode(self, prepared: np.ndarray) -> dict[str, np.ndarray]:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((prepared, future))
        return await future

    async def _collect(self, limit: int) -> list[tuple[np.ndarray, asyncio.Future]]:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window
        while len(batch) < limit:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        """Whenever a slot is free, collects a batch and starts it; with more slots free, the
        batch (up to `max_batch` per free slot) is split over them."""
        free = asyncio.Semaphore(self.in_flight)
        running: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        while True:
            await free.acquire()
            slots = 1
            while slots < self.in_flight and not free.locked():
                await free.acquire()
                slots += 1
            batch = await self._collect(self.max_batch * slots)
            parts = min(slots, len(batch))
            for _ in range(slots - parts):  # slots the batch does not need
                free.release()
            size = -(-len(batch) // parts)
            for start in range(0, len(batch), size):
                task = loop.create_task(self._encode_batch(batch[start : start + size], free))
                running.add(task)
                task.add_done_callback(running.discard)

    async def _encode_batch(self, batch: list, free: asyncio.Semaphore) -> None:
        inputs = [prepared for prepared, _ in batch]
        try:
            loop = asyncio.get_running_loop()
            codes = await loop.run_in_executor(self.executor, self._encode, inputs)
        except Exception as error:  # noqa: BLE001 (handed to each waiting request)
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        finally:
            free.release()
        self.batches += 1
        self.encoded += len(batch)
        for row, (_, future) in enumerate(batch):
            if not future.done():
                future.set_result({k: v[row] for k, v in codes.items()})

    def batch_size(self, count: int) -> int:
        """The model's batch for `count` photos: `count` itself up to 4, else the next multiple
        of 4 (XLA:CPU computes in chunks of 4, `fdh_jax.parallel.map_in_chunks_on_cpu`): at
        most 3 padded images per call, and `max_batch / 4 + 3` sizes to compile."""
        return count if count <= 4 else min(-(-count // 4) * 4, max(self.max_batch, 4))

    def _encode(self, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        count = len(inputs)
        batch = np.stack(inputs + inputs[:1] * (self.batch_size(count) - count))
        return {k: v[:count] for k, v in self.encoder.encode_prepared(batch).items()}

    def warm_up(self) -> None:
        """Compiles the encoder for every batch size `batch_size` can pick (once, at start)."""
        size = int(self.encoder.preprocessing["image_size"])
        prepared = np.zeros((size, size, 3), np.uint8)
        for count in sorted({self.batch_size(n) for n in range(1, self.max_batch + 1)}):
            self._encode([prepared] * count)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 (by its Content-Length at
    once, else when the streamed bytes pass it), before any of it is parsed."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise RequestError(413, _too_large_message(self.limit))
            return message

        try:
            await self.app(scope, limited_receive, send)
        except RequestError as error:
            await _error_response(error.status, str(error))(scope, receive, send)


def _too_large_message(limit: int) -> str:
    return f"the request body is over the limit of {limit:,} bytes"


def _too_large(limit: int) -> JSONResponse:
    return _error_response(413, _too_large_message(limit))


def _error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _decode_upload(data: bytes, name: str) -> np.ndarray:
    """An uploaded photo's pixels; `RequestError` 413 for a decompression bomb, 415 otherwise."""
    try:
        return decode_image(data, name=name or "the upload")
    except BadImageError as error:
        status = 413 if "decompression bomb" in error.reason else 415
        raise RequestError(status, f"{error.path}: not a readable photo ({error.reason})") from None


def _prepared_upload(encoder: Any, data: bytes, name: str) -> np.ndarray:
    """An uploaded photo decoded (`_decode_upload`) and through `encoder.prepare`."""
    return encoder.prepare(_decode_upload(data, name))


def _positive_int(value: Any, name: str, limit: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise RequestError(400, f"{name} must be an integer, got {value!r}") from None
    if not 1 <= number <= limit:
        raise RequestError(400, f"{name} must be between 1 and {limit}, got {number}")
    return number


class Service:
    """What the routes share: the collection, its encoder's batcher, the token, thumbnails."""

    def __init__(self, collection: Collection, token: str | None, batcher: EncodeBatcher):
        self.collection, self.token, self.batcher = collection, token, batcher
        self.uploads = collection.directory / UPLOADS
        self._thumbnails: OrderedDict[tuple, bytes] = OrderedDict()
        self._thumbnail_lock = threading.Lock()

    def check_token(self, request: Request) -> None:
        """401 unless the request carries the token (when one is set)."""
        if not self.token:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), self.token):
            raise RequestError(401, "adding and removing need the token: Authorization: Bearer T")

    def bits(self, value: Any) -> int:
        if value in (None, ""):
            return max(self.collection.bits)
        bits = _positive_int(value, "bits", 4096)
        if bits not in self.collection.bits:
            raise RequestError(400, f"bits={bits}: the collection holds {self.collection.bits}")
        return bits

    def hits(self, results: Any) -> list[dict]:
        """The first query's results as JSON rows."""
        return [
            self.describe(item_id, int(distance))
            for item_id, distance in zip(results.ids[0], results.distances[0], strict=True)
        ]

    def describe(self, item_id: str, distance: int | None = None) -> dict:
        item = self.collection.get(item_id, codes=False)
        row = {
            "id": item.id,
            "name": item.metadata.get("filename")
            or (Path(item.path).name if item.path else item.id),
            "label": self.label(item),
            "metadata": item.metadata,
            "thumbnail": f"/api/thumbnail?id={quote(item.id, safe='')}",
        }
        return row if distance is None else row | {"distance": distance}

    def label(self, item: Any) -> str | None:
        """The item's label for people: its metadata's "label", else its class name."""
        if isinstance(item.metadata.get("label"), str):
            return item.metadata["label"]
        names = getattr(self.collection.encoder, "class_names", [])
        return names[item.label] if 0 <= item.label < len(names) else None

    def thumbnail(self, item_id: str) -> bytes:
        """A JPEG of the item's photo (read from the collection's own path), cached."""
        item = self.collection.get(item_id)
        if not item.path:
            raise RequestError(404, f"item {item_id!r} has no photo file")
        key = (item.id, item.seq)
        with self._thumbnail_lock:
            if key in self._thumbnails:
                self._thumbnails.move_to_end(key)
                return self._thumbnails[key]
        try:
            image = Image.fromarray(decode_image(item.path))
        except BadImageError as error:
            raise RequestError(404, f"the photo of item {item_id!r} is unreadable now: "
                               f"{error.reason}") from None  # fmt: skip
        image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        with self._thumbnail_lock:
            self._thumbnails[key] = buffer.getvalue()
            while len(self._thumbnails) > _THUMBNAILS_KEPT:
                self._thumbnails.popitem(last=False)
        return buffer.getvalue()

    def store_upload(self, data: bytes, name: str) -> Path:
        """Writes an added photo under `uploads/` (by content hash, fsynced) before its commit."""
        suffix = Path(name).suffix.lower() if Path(name).suffix.lower() in _SUFFIXES else ".jpg"
        path = self.uploads / f"{hashlib.sha256(data).hexdigest()[:40]}{suffix}"
        self.uploads.mkdir(exist_ok=True)
        if not path.exists():
            write_bytes_atomically(path, data)
            fsync_directory(self.uploads)
        return path


_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _add_search_routes(app: FastAPI, service: Service) -> None:
    @app.post("/api/search")
    async def search(
        photo: UploadFile = File(...),  # noqa: B008 (FastAPI's declaration)
        k: str = Form("10"),
        bits: str = Form(""),
    ) -> JSONResponse:
        """The k items nearest to an uploaded photo (exact, ties by insertion order)."""
        k_value, length = _positive_int(k, "k", 1000), service.bits(bits)
        data = await photo.read()
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(
            None, _prepared_upload, service.collection.encoder, data, photo.filename or ""
        )
        codes = await service.batcher.encode(prepared)
        query = codes[str(length)][None, :]
        results = await loop.run_in_executor(
            None, lambda: service.collection.search(codes=query, k=k_value, bits=length)
        )
        # A JSONResponse skips FastAPI's validation of a returned dict: plain JSON types here.
        return JSONResponse({"bits": length, "results": service.hits(results)})

    @app.get("/api/similar")
    async def similar(id: str, k: str = "10", bits: str = "") -> JSONResponse:  # noqa: A002
        """The k items nearest to an item of the collection (itself first, unless ties)."""
        k_value, length = _positive_int(k, "k", 1000), service.bits(bits)
        results = await asyncio.get_running_loop().run_in_executor(
            None, lambda: service.collection.search(ids=[id], k=k_value, bits=length)
        )
        return JSONResponse({"bits": length, "query": id, "results": service.hits(results)})


def _add_item_routes(app: FastAPI, service: Service) -> None:
    @app.post("/api/items", status_code=201)
    async def add(
        request: Request,
        photo: UploadFile = File(...),  # noqa: B008
        id: str = Form(""),  # noqa: A002
        metadata: str = Form("{}"),
    ) -> dict:
        """Adds a photo (committed before the response); an existing id is replaced."""
        service.check_token(request)
        try:
            meta = json.loads(metadata or "{}")
        except ValueError:
            raise RequestError(400, "metadata must be a JSON object") from None
        if not isinstance(meta, dict):
            raise RequestError(400, "metadata must be a JSON object")
        data = await photo.read()
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(
            None, _prepared_upload, service.collection.encoder, data, photo.filename or ""
        )
        codes = await service.batcher.encode(prepared)

        def commit() -> str:
            path = service.store_upload(data, photo.filename or "")
            added = service.collection.add(
                codes={int(k): v[None, :] for k, v in codes.items()},
                ids=[id] if id else None,
                paths=[str(path)],
                metadata=[meta | {"filename": photo.filename or ""}],
            )
            return added.ids[0]

        item_id = await loop.run_in_executor(None, commit)
        return {"id": item_id, "items": len(service.collection)}

    @app.delete("/api/items")
    async def remove(request: Request, id: str) -> dict:  # noqa: A002
        """Removes an item (committed before the response)."""
        service.check_token(request)
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: service.collection.remove([id])
        )
        return {"removed": id, "items": len(service.collection)}

    @app.get("/api/items")
    async def item(id: str) -> dict:  # noqa: A002
        """An item's id, file name, label and metadata."""
        return service.describe(id)

    @app.get("/api/thumbnail")
    async def thumbnail(id: str) -> Response:  # noqa: A002
        """A small JPEG of an item's photo."""
        data = await asyncio.get_running_loop().run_in_executor(None, service.thumbnail, id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=60"})


def _add_info_routes(app: FastAPI, service: Service) -> None:
    @app.get("/api/health")
    async def health() -> dict:
        """Whether the service answers, and the collection's size."""
        return {"status": "ok", "items": len(service.collection)}

    @app.get("/api/stats")
    async def stats() -> dict:
        """The collection: size, code lengths, model identity, segments."""
        return service.collection.stats() | {
            "encoded_batches": service.batcher.batches,
            "encoded_photos": service.batcher.encoded,
            "token_required": bool(service.token),
        }

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        """The web page (plain HTML and JavaScript, served from the package)."""
        return PAGE.read_text(encoding="utf-8")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError) -> JSONResponse:
        return _error_response(error.status, str(error))

    @app.exception_handler(UnknownIdError)
    async def unknown_id(_: Request, error: UnknownIdError) -> JSONResponse:
        return _error_response(404, str(error))

    @app.exception_handler(CollectionError)
    async def collection_error(_: Request, error: CollectionError) -> JSONResponse:
        return _error_response(400, str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
            for e in error.errors()
        ]
        return _error_response(422, "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(error.status_code, str(error.detail))


def create_app(
    collection: Collection,
    *,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    batcher: EncodeBatcher | None = None,
) -> Any:
    """The ASGI app serving `collection` (opened with its encoder): the routes of the module
    docstring behind the body-size limit. Run it with uvicorn (`serve`)."""
    if collection.encoder is None:
        raise ValueError("the collection must be opened with its encoder to serve photo search")
    service = Service(collection, token, batcher or EncodeBatcher(collection.encoder))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        service.batcher.close()

    app = FastAPI(title="fdh_jax collection", version="1", docs_url="/docs", lifespan=lifespan)
    app.state.service = service
    _add_search_routes(app, service)
    _add_item_routes(app, service)
    _add_info_routes(app, service)
    _add_error_handlers(app)
    return _BodyLimit(app, max_body_bytes)


def serve(collection: Collection, host: str, port: int, token: str | None) -> None:
    """Runs the service until SIGTERM or SIGINT, which finish the requests in flight first
    (`collection_modes.check_start` has checked the host and token). uvicorn is imported here:
    building the app (`create_app`, the tests) does not need it."""
    import uvicorn  # noqa: PLC0415 (the serve extra: imported only when serving)

    app = create_app(collection, token=token)
    batcher = app.app.state.service.batcher
    print(f"Compiling the encoder for batches of 1 to {batcher.max_batch} photos", flush=True)
    batcher.warm_up()
    print(
        f"Serving {collection.directory} ({len(collection)} items) on http://{host}:{port}/",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
