"""Load on the search service: requests/s and latency at 1, 8 and 32 concurrent clients, against
the encoder's own batch throughput on the same photos.

  python benchmarks/serve_load.py --workdir=W --root=../shared/data/cub100 --requests=2000

Builds a collection of the cub100 database photos (`split.csv`'s train split, labelled by
species) with the model `W` (or takes `--collection`), starts `python -m fdh_jax.main
--mode=serve` on 127.0.0.1 and a free port, and from this process sends `--requests` search
requests (multipart uploads of query photos, k = 10) from each number of concurrent clients in
`--clients`, after a warm-up. Prints requests/s and p50 / p99 latency per level. Then stops the
server (SIGTERM) and, in this process, times `Encoder.encode_images` on the same photo files in
large batches: the throughput the service is measured against (the issue's bar: at 32 clients at
least 0.8x). Check the load (printed) first: run it on a quiet machine. `--screenshot=PNG`
first photographs the page (Debian's chromium, headless, via Selenium) with the results of a
query photo: `docs/serve_page.png`.
"""

import argparse
import asyncio
import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from fdh_jax.search.collection import open_collection
from fdh_jax.serving.load import load_encoder

REPO = Path(__file__).resolve().parents[1]


def _photos(root: Path, split: str) -> list[Path]:
    with open(root / "split.csv") as f:
        return sorted(root / row["path"] for row in csv.DictReader(f) if row["split"] == split)


def _build(directory: Path, workdir: str, root: Path) -> None:
    encoder = load_encoder(workdir)
    collection = open_collection(directory, encoder, create=True)
    photos = _photos(root, "train")
    began = time.perf_counter()
    collection.add(photos, metadata=[{"label": p.parent.name.replace("_", " ")} for p in photos])
    print(f"collection of {len(collection)} photos built in {time.perf_counter() - began:.1f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(collection: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "fdh_jax.main", "--mode=serve", f"--collection={collection}"]
    server = subprocess.Popen([*command, f"--port={port}"], cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit("the server exited before answering")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.25)
    server.kill()
    sys.exit("the server did not answer within 300 s")


def _request(port: int, name: str, data: bytes) -> bytes:
    """A complete HTTP/1.1 search request (multipart: the photo and k = 10), encoded once: the
    load clients only write bytes and read answers, so they take little of the CPU the server
    shares with them."""
    boundary = "fdhjaxload"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n10\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="photo"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _answer(reader: asyncio.StreamReader) -> bytes:
    """One response's body (Content-Length framed); raises unless the status is 200."""
    status = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await reader.readexactly(length)
    if b" 200 " not in status:
        raise RuntimeError(f"{status.decode().strip()}: {body[:300]!r}")
    return body


async def _load(port: int, requests: list[bytes], total: int, clients: int) -> tuple:
    """Sends `total` searches from `clients` concurrent keep-alive connections, each waiting for
    its answer before the next request -> (seconds, latencies)."""
    latencies, sent = [], 0

    async def client() -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while sent < total:
                request = requests[sent % len(requests)]
                sent += 1
                began = time.perf_counter()
                writer.write(request)
                await _answer(reader)
                latencies.append(time.perf_counter() - began)
        finally:
            writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - began, np.array(latencies)


def _screenshot(url: str, photo: Path, out: str) -> None:
    """The page with the results of `photo`, as a PNG at `out`."""
    from selenium import webdriver  # noqa: PLC0415 (only for --screenshot)
    from selenium.webdriver.common.by import By  # noqa: PLC0415
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,900"):
        options.add_argument(argument)
    service = webdriver.ChromeService("/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(url + "/")
        WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-items")
        )
        driver.find_element(By.ID, "photo").send_keys(str(photo.resolve()))
        WebDriverWait(driver, 120).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "results"
        )
        driver.execute_script(
            "return Promise.all([...document.images].map(i => i.complete ? 0 :"
            " new Promise(r => { i.onload = i.onerror = r; })))"
        )
        driver.save_screenshot(out)
        print(f"wrote {out}", flush=True)
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a cub100 training workdir or export")
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "cub100"))
    parser.add_argument("--collection", help="an existing collection (default: build one)")
    parser.add_argument("--requests", type=int, default=2000, help="per concurrency level")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--photos", type=int, default=512, help="distinct query photos")
    parser.add_argument("--screenshot", help="also save a screenshot of the page here (PNG)")
    args = parser.parse_args()
    root = Path(args.root)
    print(f"load average: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})", flush=True)
    queries = _photos(root, "test")[:: max(1, len(_photos(root, "test")) // args.photos)]
    queries = queries[: args.photos]
    uploads = [(p.name, p.read_bytes()) for p in queries]
    with tempfile.TemporaryDirectory() as scratch:
        collection = Path(args.collection) if args.collection else Path(scratch) / "collection"
        if not args.collection:
            _build(collection, args.workdir, root)
        port = _free_port()
        server = _start_server(collection, port)
        url = f"http://127.0.0.1:{port}"
        requests = [_request(port, name, data) for name, data in uploads]
        try:
            if args.screenshot:
                _screenshot(url, queries[len(queries) // 3], args.screenshot)
            asyncio.run(_load(port, requests, 64, 8))  # warm-up: caches, connections
            rows = []
            for clients in (int(c) for c in args.clients.split(",")):
                seconds, latencies = asyncio.run(_load(port, requests, args.requests, clients))
                rows.append((clients, args.requests / seconds, *np.percentile(latencies, [50, 99])))
                print(
                    f"{clients:3d} clients: {rows[-1][1]:6.1f} requests/s, p50 "
                    f"{1000 * rows[-1][2]:7.1f} ms, p99 {1000 * rows[-1][3]:7.1f} ms",
                    flush=True,
                )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    encoder = load_encoder(args.workdir)
    paths = [str(p) for p in queries]
    encoder.encode_images(paths[:64])  # warm-up
    began = time.perf_counter()
    encoder.encode_images(paths)
    batch_rate = len(paths) / (time.perf_counter() - began)
    print(
        f"Encoder.encode_images on the same {len(paths)} photo files, one call: "
        f"{batch_rate:.1f} photos/s"
    )
    for clients, rate, _, _ in rows:
        print(f"{clients:3d} clients: {rate / batch_rate:.2f}x the batch throughput")


if __name__ == "__main__":
    main()
