"""A trained tiny model, a collection of small photos, and its service on 127.0.0.1 (for
tests/test_service.py and tests/test_page.py)."""

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from conftest import tiny_config
from PIL import Image

from fdh_jax.search.collection import Collection, open_collection
from fdh_jax.serving.load import load_encoder
from fdh_jax.training.train import train_and_evaluate

COLOURS = [(200, 30, 30), (30, 160, 40), (40, 60, 210), (230, 210, 40), (120, 40, 160)]


def write_photos(folder: Path, per_colour: int = 3) -> list[Path]:
    """JPEG photos: a few colours, each with seeded patterns (so codes differ and tie)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for c, colour in enumerate(COLOURS):
        for i in range(per_colour):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (48, 56, 3)), 0, 255)
            pixels[rng.integers(0, 40) :][:, rng.integers(0, 40) :: 7] = 255 - np.array(colour)
            path = folder / f"colour{c}_{i}.jpg"
            Image.fromarray(pixels.astype(np.uint8)).save(path, quality=92)
            paths.append(path)
    return paths


def make_collection(root: Path) -> tuple[Path, list[Path], Collection]:
    """(workdir, photos, the collection of all but the last two photos, labelled by colour)."""
    workdir = root / "run"
    train_and_evaluate(tiny_config(num_steps=2), workdir)
    photos = write_photos(root / "photos")
    collection = open_collection(root / "collection", load_encoder(workdir), create=True)
    kept = photos[:-2]
    collection.add(kept, metadata=[{"label": f"colour {p.stem[6]}"} for p in kept])
    return workdir, photos, collection


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, requests_limit: int = 500) -> Iterator[str]:  # noqa: ANN001
    """Runs `app` with uvicorn on 127.0.0.1 and a free port in a thread; yields its base URL and
    stops it on exit (or after `requests_limit` requests)."""
    import uvicorn  # noqa: PLC0415 (the serve extra, as the tests that use this need it)

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", limit_max_requests=requests_limit
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
