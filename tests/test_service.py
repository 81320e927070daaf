"""The search service through a real uvicorn on 127.0.0.1 (fdh_jax/serving/service.py).

Search by photo equals `Collection.search` for the same photo; adds and removes show in the next
search; every bad request gets a 4xx with one message and the next good request succeeds; a
server SIGKILLed while clients add photos keeps every add it answered with a 2xx.
"""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import psutil
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from conftest import REPO  # noqa: E402
from PIL import Image  # noqa: E402
from served_collection import free_port, make_collection, running  # noqa: E402

from fdh_jax.search.collection import open_collection  # noqa: E402
from fdh_jax.serving.service import create_app  # noqa: E402

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    workdir, photos, collection = make_collection(root)
    return root, workdir, photos, collection


def _png_bomb() -> bytes:
    """A valid PNG header declaring 40,000 x 40,000 pixels (refused before any decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _search(client, url, photo: Path, k=5, bits=""):  # noqa: ANN001
    with open(photo, "rb") as f:
        return client.post(f"{url}/api/search", files={"photo": (photo.name, f)},
                           data={"k": str(k), "bits": str(bits)})  # fmt: skip


def test_search_add_remove_match_the_collection(setup):
    root, _, photos, collection = setup
    with running(create_app(collection, token=TOKEN)) as url, httpx.Client(timeout=60) as client:
        assert client.get(f"{url}/api/health").json() == {"status": "ok", "items": 13}
        stats = client.get(f"{url}/api/stats").json()
        assert stats["bits"] == [8, 12] and stats["encoder"] == json.loads(
            json.dumps(collection.identity)
        )
        for photo in photos[:3]:
            for bits in (8, 12):
                answer = _search(client, url, photo, k=6, bits=bits).json()
                expected = collection.search([photo], k=6, bits=bits)
                assert [hit["id"] for hit in answer["results"]] == expected.ids[0]
                assert [hit["distance"] for hit in answer["results"]] == list(expected.distances[0])
        new = photos[-1]
        with open(new, "rb") as f:
            added = client.post(f"{url}/api/items", files={"photo": (new.name, f)},
                                data={"id": "new-photo", "metadata": '{"label": "mine"}'},
                                headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        assert added.status_code == 201, added.text
        assert added.json() == {"id": "new-photo", "items": 14}
        found = _search(client, url, new, k=14).json()["results"]  # ties come in insertion order
        assert {"new-photo": 0}.items() <= {h["id"]: h["distance"] for h in found}.items()
        item = client.get(f"{url}/api/items", params={"id": "new-photo"}).json()
        assert item["label"] == "mine" and item["metadata"]["filename"] == new.name
        thumbnail = client.get(f"{url}/api/thumbnail", params={"id": "new-photo"})
        assert thumbnail.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 192
        similar = client.get(f"{url}/api/similar", params={"id": "new-photo", "k": 4}).json()
        assert [h["id"] for h in similar["results"]] == collection.search(
            ids=["new-photo"], k=4
        ).ids[0]

        gone = client.delete(f"{url}/api/items", params={"id": "new-photo"},
                             headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        assert gone.status_code == 200 and gone.json()["items"] == 13
        after = _search(client, url, new, k=13).json()["results"]
        assert "new-photo" not in [hit["id"] for hit in after] and len(after) == 13
    assert "new-photo" not in open_collection(root / "collection")


def _bad_requests(photo: Path, tmp: Path) -> list[tuple[str, dict, int, str]]:
    """(what, request keywords for client.request, expected status, a word of the message)."""
    jpeg = photo.read_bytes()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    return [
        ("not an image", dict(method="POST", url="/api/search",
                              files={"photo": ("notes.txt", b"just some text")}), 415, "photo"),
        ("HTML named .jpg", dict(method="POST", url="/api/search",
                                 files={"photo": ("x.jpg", b"<html><body>hi</body></html>")}),
         415, "not a readable photo"),
        ("truncated JPEG", dict(method="POST", url="/api/search",
                                files={"photo": ("cut.jpg", jpeg[: len(jpeg) // 2])}),
         415, "cut.jpg"),
        ("PNG bomb", dict(method="POST", url="/api/search",
                          files={"photo": ("bomb.png", _png_bomb())}), 413, "decompression bomb"),
        ("over-size body", dict(method="POST", url="/api/search",
                                files={"photo": ("big.jpg", b"\xff" * 300_000)}), 413, "limit"),
        ("missing field", dict(method="POST", url="/api/search", data={"k": "3"}), 422, "photo"),
        ("bad k", dict(method="POST", url="/api/search", data={"k": "many"},
                       files={"photo": ("a.jpg", jpeg)}), 400, "k must be"),
        ("unknown id", dict(method="GET", url="/api/similar", params={"id": "nope"}), 404, "nope"),
        ("unknown thumbnail", dict(method="GET", url="/api/thumbnail", params={"id": "../x"}),
         404, "no item"),
        ("no token", dict(method="DELETE", url="/api/items", params={"id": "x"}), 401, "token"),
        ("wrong token", dict(method="POST", url="/api/items", files={"photo": ("a.jpg", jpeg)},
                             headers={"Authorization": "Bearer guess"}), 401, "token"),
        ("unknown id to remove", dict(method="DELETE", url="/api/items", params={"id": "nope"},
                                      headers=auth), 404, "nope"),
        ("metadata not JSON", dict(method="POST", url="/api/items", headers=auth,
                                   files={"photo": ("a.jpg", jpeg)}, data={"metadata": "{oops"}),
         400, "metadata"),
    ]  # fmt: skip


def test_bad_requests_get_one_4xx_message_and_the_server_goes_on(setup, tmp_path):
    _, _, photos, collection = setup
    app = create_app(collection, token=TOKEN, max_body_bytes=200_000)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for what, request, status, word in _bad_requests(photos[0], tmp_path):
            response = client.request(**request)
            assert response.status_code == status, (what, response.text)
            body = response.json()
            assert list(body) == ["error"] and word in body["error"], (what, body)
            good = _search(client, "", photos[1], k=2)
            assert good.status_code == 200 and len(good.json()["results"]) == 2, what
    assert len(collection) == 13


def test_concurrent_searches_are_batched(setup):
    _, _, photos, collection = setup
    app = create_app(collection)
    service = app.app.state.service
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        expected = {p: collection.search([p], k=4).ids[0] for p in photos[:6]}
        results, threads = {}, []
        for p in photos[:6] * 3:
            thread = threading.Thread(target=lambda p=p: results.setdefault(
                (p, threading.get_ident()), _search(client, "", p, k=4).json()))  # fmt: skip
            threads.append(thread)
            thread.start()
        for thread in threads:
            thread.join()
    assert len(results) == 18
    for (photo, _), answer in results.items():
        assert [hit["id"] for hit in answer["results"]] == expected[photo]
    assert service.batcher.encoded >= 18 and service.batcher.batches < service.batcher.encoded


def _serve(collection_dir: Path, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fdh_jax.main", "--mode=serve", f"--collection={collection_dir}",
         f"--port={port}", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip


def _wait_healthy(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("the server did not become healthy")


def _client_ports(process: subprocess.Popen, port: int) -> set[int]:
    """The remote ports of the connections the server process has accepted on `port`."""
    connections = psutil.Process(process.pid).net_connections(kind="tcp")
    return {
        c.raddr.port
        for c in connections
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port and c.raddr
    }


def _wait_accepted(process: subprocess.Popen, port: int, before: set[int]) -> None:
    """Wait until the server holds a connection it did not hold before (a fixed sleep is a race
    under load: the request may not have connected when the listener closes)."""
    deadline = time.monotonic() + 60
    while not _client_ports(process, port) - before:
        assert time.monotonic() < deadline, "the request never reached the server"
        time.sleep(0.01)


def test_sigkill_loses_no_acknowledged_add_and_sigterm_exits(setup, tmp_path):
    root, _, photos, _ = setup
    directory = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(root / "collection"), str(directory)], check=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _serve(directory, port)
    _wait_healthy(url, server)
    acknowledged, stop = [], threading.Event()

    def client(worker: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as session:
            for n in range(200):
                if stop.is_set():
                    return
                photo = photos[(worker + n) % len(photos)]
                try:
                    files = {"photo": (photo.name, photo.read_bytes())}
                    response = session.post(
                        "/api/items", data={"id": f"w{worker}-{n}"}, files=files
                    )
                except httpx.TransportError:
                    return
                if response.status_code == 201:
                    acknowledged.append(f"w{worker}-{n}")

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    while len(acknowledged) < 12:
        time.sleep(0.05)
    server.send_signal(signal.SIGKILL)
    stop.set()
    for thread in threads:
        thread.join()
    server.communicate()
    reopened = open_collection(directory)
    missing = [i for i in acknowledged if i not in reopened]
    assert acknowledged and missing == [], missing

    again = _serve(directory, port)
    _wait_healthy(url, again)
    assert httpx.get(f"{url}/api/health").json()["items"] == len(reopened)
    answers, before = [], _client_ports(again, port)
    in_flight = threading.Thread(
        target=lambda: answers.append(_search(httpx.Client(timeout=60), url, photos[0], k=3))
    )
    in_flight.start()
    _wait_accepted(again, port, before)  # SIGTERM lets the accepted request finish, then exits
    again.send_signal(signal.SIGTERM)
    in_flight.join()
    assert answers[0].status_code == 200 and len(answers[0].json()["results"]) == 3
    assert again.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal


def test_a_public_host_needs_a_token(setup):
    root, _, _, _ = setup
    refused = subprocess.run(
        [sys.executable, "-m", "fdh_jax.main", "--mode=serve",
         f"--collection={root / 'collection'}", "--host=0.0.0.0", f"--port={free_port()}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "FDH_JAX_TOKEN"},
    )  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "set a token" in refused.stderr
