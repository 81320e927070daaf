"""Image folders as found (issue 13): every kind of broken file, both `data.bad_images` policies,
the message, the CLI, and the cached, shared scan of `fdh_jax.data.image_scan` (issue 11).

The hostile folder is built here, byte by byte where it matters: a 40,000 x 40,000 PNG bomb whose
header alone says 1.6 gigapixels, truncated JPEG and PNG, random bytes and an HTML page named
.jpg, an empty file, a file without read permission, a dangling link and a link loop, next to
three unusual but good images (an animated GIF, a 16-bit PNG, a CMYK JPEG) that must decode.
A split.csv puts bad files in both splits.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, load_config
from PIL import Image

from fdh_jax.data import image_scan, load_split, load_splits
from fdh_jax.data.decode import MAX_PIXELS, BadImagesFoundError, decode_image
from fdh_jax.data.sources import base as sources_base
from fdh_jax.data.sources.folder import FolderSource

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
SIZE = 24  # side of the good images


# ---------------------------------------------------------------------------- building the folder


def jpeg_bytes(color, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (SIZE, SIZE), color).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def noise_bytes(fmt: str) -> bytes:
    """A noisy image, so that its compressed data is long enough to cut in the middle."""
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png_bytes(side: int = 40_000) -> bytes:
    """A complete, valid 1-bit `side` x `side` PNG of zeros, compressed row by row.

    Never holds the 200 MB of raw rows (nor the 1.6 GB it would decode to): ~190 KB of zlib.
    """
    compressor = zlib.compressobj(9)
    row = bytes(1 + side // 8)  # filter byte + 1 bit per pixel
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    return bomb_png_bytes()


RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)

# The independent expectation: every bad file, the split.csv row it gets, and a piece of the
# reason the message must give. "noread.jpg" holds a good JPEG: only permission makes it bad.
BAD = {
    "images/Albatross/empty.jpg": ("train", "empty file (0 bytes)"),
    "images/Albatross/truncated.jpg": ("test", "truncated"),
    "images/Albatross/truncated.png": ("train", "truncated"),
    "images/Albatross/random.jpg": ("test", "not a recognised image format"),
    "images/Gull/page.jpg": ("train", "HTML page"),
    "images/Gull/bomb.png": ("test", "decompression bomb"),
    "images/Gull/noread.jpg": ("train", "permission denied"),
    "images/Gull/dangling.jpg": ("test", "dangling symbolic link"),
    "images/Gull/loop.jpg": ("train", "symbolic link loop"),
}
# Good files and the colour of their (first) frame.
GOOD = {
    "images/Albatross/a0.jpg": ("train", RED),
    "images/Albatross/a1.jpg": ("train", RED),
    "images/Albatross/a2.jpg": ("test", RED),
    "images/Albatross/animated.gif": ("train", GREEN),  # first frame green, second blue
    "images/Gull/g0.jpg": ("train", BLUE),
    "images/Gull/g1.jpg": ("test", BLUE),
    "images/Gull/sixteen_bit.png": ("test", (100, 100, 100)),  # 16-bit gray 100 * 257
    "images/Gull/cmyk.jpg": ("train", (255, 0, 0)),  # stored as CMYK (0, 255, 255, 0)
}


def build_hostile_folder(root: Path, bomb: bytes, *, split_csv: bool = True) -> Path:
    """Writes the hostile folder under `root` (see the module docstring) and returns `root`."""
    for relative in list(BAD) + list(GOOD):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
    albatross, gull = root / "images" / "Albatross", root / "images" / "Gull"
    for name in ("a0.jpg", "a1.jpg", "a2.jpg"):
        (albatross / name).write_bytes(jpeg_bytes(RED))
    for name in ("g0.jpg", "g1.jpg"):
        (gull / name).write_bytes(jpeg_bytes(BLUE))
    frames = [Image.new("RGB", (SIZE, SIZE), GREEN), Image.new("RGB", (SIZE, SIZE), BLUE)]
    frames[0].save(albatross / "animated.gif", save_all=True, append_images=frames[1:], loop=0)
    Image.fromarray(np.full((SIZE, SIZE), 100 * 257, np.uint16)).save(gull / "sixteen_bit.png")
    (gull / "cmyk.jpg").write_bytes(jpeg_bytes((0, 255, 255, 0), mode="CMYK"))  # red in CMYK

    (albatross / "empty.jpg").write_bytes(b"")
    jpeg, png = noise_bytes("JPEG"), noise_bytes("PNG")
    (albatross / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 6 // 10])
    (albatross / "truncated.png").write_bytes(png[: len(png) // 2])
    (albatross / "random.jpg").write_bytes(np.random.default_rng(7).bytes(4096))
    (gull / "page.jpg").write_text(
        "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
        "<body><h1>Not Found</h1></body></html>\n"
    )
    (gull / "bomb.png").write_bytes(bomb)
    (gull / "noread.jpg").write_bytes(jpeg_bytes(BLUE))
    (gull / "noread.jpg").chmod(0)
    (gull / "dangling.jpg").symlink_to(gull / "deleted_long_ago.jpg")
    (gull / "loop.jpg").symlink_to(gull / "loop.jpg")
    if split_csv:
        rows = [f"{relative},{split}" for relative, (split, _) in {**BAD, **GOOD}.items()]
        (root / "split.csv").write_text("path,split\n" + "\n".join(rows) + "\n")
    return root


def expected_bad(root: Path) -> dict[str, tuple[str, str]]:
    """`{absolute path: (split, reason piece)}` of the files that are bad for this user."""
    return {str(root / relative): entry for relative, entry in BAD.items()}


@pytest.fixture
def refuse_noread(monkeypatch, tmp_path):
    """The kernel's EACCES for noread.jpg when running as root, whom chmod 0 does not stop.

    Only `os.open` of that one path is replaced (by what the kernel does for other users), so
    everything after it (decode_image's errno handling, the scan, the policy) runs for real.
    As another user the chmod 0 refuses by itself and nothing is patched.
    """
    if not IS_ROOT:
        return
    real_open = os.open

    def open_as_another_user(path, flags, *args, **kwargs):
        if os.path.basename(os.fspath(path)) == "noread.jpg":
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_as_another_user)


def folder_config(root: Path, policy: str):
    config = load_config("folder")
    config.data.root = str(root)
    config.data.bad_images = policy
    return config


# ---------------------------------------------------------------------------- decoding


def test_unusual_good_images_decode(tmp_path, bomb_png):
    root = build_hostile_folder(tmp_path, bomb_png)
    for relative, (_, color) in GOOD.items():
        image = decode_image(root / relative)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8, relative
        assert np.abs(image.astype(int) - color).max() <= 6, (relative, image[0, 0], color)


def test_bomb_is_refused_from_its_header_by_our_own_limit(tmp_path, bomb_png, monkeypatch):
    assert len(bomb_png) < 256 * 1024  # small on disk, 1.6 gigapixels inside
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png)
    # Pillow's own limit switched off (as some code does): ours must still refuse, at once.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    start = time.monotonic()
    with pytest.raises(Exception) as raised:
        decode_image(path)
    assert time.monotonic() - start < 2.0  # decoding 1.6 GP would take far longer (and 1.6 GB)
    assert raised.value.reason == (
        f"decompression bomb: 40000x40000 = 1,600,000,000 pixels, over the limit of "
        f"{MAX_PIXELS:,} (refused before decoding)"
    )
    assert decode_image(bomb_png_bytes(side=64)).shape == (64, 64, 3)  # same file, small: fine


def test_fifo_named_jpg_does_not_hang(tmp_path):
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(Exception, match="not a regular file"):
        decode_image(fifo)
    assert time.monotonic() - start < 2.0


def test_postscript_is_refused_not_run(tmp_path):
    """Pillow identifies EPS and would run Ghostscript on it to decode: an endless PostScript
    loop must not reach it."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{} loop\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # what plain Pillow would do
    path = tmp_path / "drawing.jpg"
    path.write_bytes(eps)
    with pytest.raises(Exception) as raised:
        decode_image(path)
    assert raised.value.reason.startswith("not a supported image: PostScript/EPS")


# ---------------------------------------------------------------------------- both policies


def test_error_policy_lists_every_bad_file_of_both_splits(tmp_path, bomb_png, refuse_noread):
    root = build_hostile_folder(tmp_path / "data", bomb_png)
    cache = tmp_path / "cache"
    with pytest.raises(BadImagesFoundError) as raised:
        load_splits(folder_config(root, "error"), cache_dir=cache)
    error = raised.value
    expected = expected_bad(root)
    found = {
        split: {bad.path: bad.reason for bad in bad} for split, bad in error.bad_by_split.items()
    }
    assert {split: set(paths) for split, paths in found.items()} == {
        split: {path for path, (s, _) in expected.items() if s == split}
        for split in ("train", "test")
    }
    message = str(error)
    lines = message.splitlines()
    assert lines[0].startswith(
        f"{len(expected)} unreadable image(s) in folder (train: 5, test: 4); fix or remove them"
    )
    assert "--config.data.bad_images=skip" in lines[0]
    assert len(lines) == 1 + len(expected)  # every bad file, one line each
    for path, (split, reason) in expected.items():
        assert reason in found[split][path], (path, found[split][path])
        assert any(line.startswith(f"  {split}: {path}: ") for line in lines), path
    restored = pickle.loads(pickle.dumps(error))  # crosses processes like any expected error
    assert str(restored) == message and restored.bad_by_split == error.bad_by_split
    # load_split of one split still works, and stops with that split's bad files only.
    with pytest.raises(BadImagesFoundError) as raised:
        load_split(folder_config(root, "error"), "test", cache_dir=cache)
    assert {bad.path for bad in raised.value.bad_images} == {
        path for path, (split, _) in expected.items() if split == "test"
    }


def test_skip_policy_trains_without_them_and_says_how_many(
    tmp_path, bomb_png, refuse_noread, capsys
):
    root = build_hostile_folder(tmp_path / "data", bomb_png)
    sources = load_splits(folder_config(root, "skip"), cache_dir=tmp_path / "cache")
    expected = expected_bad(root)
    for split, source in sources.items():
        good = {str(root / r) for r, (s, _) in GOOD.items() if s == split}
        assert set(source.paths) == good, split
        assert source.class_names == ["Albatross", "Gull"]
        for i in range(len(source)):  # what training reads: everything decodes
            item = source[i]
            assert item["image"].shape == (SIZE, SIZE, 3)
            assert item["label"] == source.class_names.index(Path(item["path"]).parent.name)
    stderr = capsys.readouterr().err
    assert f"skipping {len(expected)} unreadable image(s) of folder (train: 5, test: 4):" in stderr
    for path, (split, reason) in expected.items():
        assert f"  {split}: {path}: " in stderr and reason in stderr


def test_skip_with_every_image_bad_is_still_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"{i}.jpg").write_text("<html>not an image</html>")
    with pytest.raises(BadImagesFoundError, match="every image of split 'train' is unreadable"):
        load_splits(folder_config(tmp_path, "skip"), cache_dir=tmp_path / "cache")


def test_folder_listing_errors_are_bad_entries_not_tracebacks(tmp_path, monkeypatch):
    """Without split.csv the folder is walked: a class folder that is a link loop, or that
    cannot be read, is reported with its path; link files are kept as images to be named."""
    images = tmp_path / "images"
    for class_name in ("Crow", "Wren", "Locked"):
        (images / class_name).mkdir(parents=True)
        for i in range(2):
            (images / class_name / f"{i}.jpg").write_bytes(jpeg_bytes(RED))
    (images / "Crow" / "dangling.jpg").symlink_to(images / "Crow" / "gone.jpg")
    (images / "Crow" / "loop.jpg").symlink_to(images / "Crow" / "loop.jpg")
    (images / "Loop").symlink_to(images / "Loop")  # a class folder that is a link loop
    (images / "notes_link").symlink_to(tmp_path / "nowhere")  # dangling, not a folder: ignored
    locked = images / "Locked"
    locked.chmod(0)
    if IS_ROOT:  # root lists it anyway: make scandir refuse it as the kernel would for others
        real_scandir = os.scandir

        def scandir_as_another_user(path="."):
            if os.fspath(path) == str(locked):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir_as_another_user)
    try:
        sources = {split: FolderSource(tmp_path, split) for split in ("train", "test")}
        train, test = sources["train"], sources["test"]
        assert train.class_names == test.class_names == ["Crow", "Wren"]
        listing = {bad.path: bad.reason for bad in train.listing_errors}
        assert listing == {
            str(images / "Loop"): "cannot list folder: symbolic link loop",
            str(locked): "cannot list folder: permission denied",
        }
        assert test.listing_errors == train.listing_errors
        crow = images / "Crow"
        links = {
            str(crow / "dangling.jpg"): f"dangling symbolic link (-> {crow / 'gone.jpg'})",
            str(crow / "loop.jpg"): "symbolic link loop",
        }
        assert set(links) <= set(train.paths) | set(test.paths)  # kept, to be named
        with pytest.raises(BadImagesFoundError) as raised:
            image_scan.scan_splits(sources, "error", use_cache=False)
        found = {
            split: {bad.path: bad.reason for bad in bad_images}
            for split, bad_images in raised.value.bad_by_split.items()
        }
        # The listing errors once (under the first split), each link under its own split.
        assert found["train"] == listing | {p: r for p, r in links.items() if p in train.paths}
        assert found.get("test", {}) == {p: r for p, r in links.items() if p in test.paths}
        kept = image_scan.scan_splits(sources, "skip", use_cache=False, progress=None)
        for split, source in sources.items():
            assert set(kept[split].paths) == set(source.paths) - set(links)
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------------------- the command line


def test_cli_error_lists_both_splits_exit_2_no_traceback(tmp_path, bomb_png):
    root = build_hostile_folder(tmp_path / "data", bomb_png)
    env = dict(os.environ, FDH_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fdh_jax.main",
            "--config=configs/folder.py",
            f"--workdir={tmp_path / 'w'}",
            f"--config.data.root={root}",
            "--config.model.pretrained=",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    # As root the chmod 0 file is readable (a good image) in this separate process.
    expected = {
        path: entry
        for path, entry in expected_bad(root).items()
        if not (IS_ROOT and path.endswith("noread.jpg"))
    }
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    first = [i for i, line in enumerate(lines) if line.startswith("fdh_jax: error: ")]
    assert len(first) == 1, result.stderr[-3000:]  # one message...
    message = lines[first[0] :]
    assert message[0].startswith(f"fdh_jax: error: {len(expected)} unreadable image(s) in folder")
    assert len(message) == 1 + len(expected)  # ...listing every bad file, nothing after it
    for path, (split, reason) in expected.items():
        assert any(line.startswith(f"  {split}: {path}: ") and reason in line for line in message)
    assert not (tmp_path / "w" / "checkpoints").exists()


# ---------------------------------------------------------------------------- the scan cache


def count_decodes(monkeypatch) -> list[str]:
    """Records every decode the sources do (the scan decodes through `source[i]`)."""
    calls: list[str] = []
    real_decode = sources_base.decode_image

    def counting_decode(path, *args, **kwargs):
        calls.append(str(path))
        return real_decode(path, *args, **kwargs)

    monkeypatch.setattr(sources_base, "decode_image", counting_decode)
    return calls


def test_scan_cache_hit_touch_and_corruption(tmp_path, bomb_png, refuse_noread, monkeypatch):
    root = build_hostile_folder(tmp_path / "data", bomb_png)
    cache = tmp_path / "cache"
    config = folder_config(root, "skip")
    calls = count_decodes(monkeypatch)
    first = load_splits(config, cache_dir=cache)
    num_items = len(BAD) + len(GOOD)
    assert len(calls) == num_items  # every file decoded once
    cache_files = sorted(cache.glob("*.json"))
    assert len(cache_files) == 2  # one per split
    assert not list(cache.glob("*.tmp"))  # written atomically, nothing left over

    calls.clear()
    second = load_splits(config, cache_dir=cache)
    assert calls == []  # unchanged folder: nothing decoded
    for split in ("train", "test"):
        assert second[split].paths == first[split].paths

    # A touched file (new mtime) changes its split's key: that split, and only it, is rescanned.
    touched = root / "images" / "Albatross" / "a2.jpg"  # a test image
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))
    calls.clear()
    load_splits(config, cache_dir=cache)
    num_test = sum(1 for split, _ in {**BAD, **GOOD}.values() if split == "test")
    assert len(calls) == num_test and str(touched) in calls
    # A rewritten file (new size) too, and what it now is counts: the page becomes an image.
    page = root / "images" / "Gull" / "page.jpg"
    page.write_bytes(jpeg_bytes(BLUE))
    calls.clear()
    sources = load_splits(config, cache_dir=cache)
    assert len(calls) == num_items - num_test and str(page) in sources["train"].paths

    # A corrupt cache file: a warning, a rescan, and a valid file again.
    calls.clear()
    newest = max(cache.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    newest.write_text('{"scan_version": 1, "num_items": ')
    with pytest.warns(UserWarning, match="ignoring the corrupt image-scan cache"):
        load_splits(config, cache_dir=cache)
    assert len(calls) == num_items - num_test
    assert json.loads(newest.read_text())["scan_version"] == image_scan.SCAN_VERSION
    calls.clear()
    load_splits(config, cache_dir=cache)
    assert calls == []


def test_scan_cache_default_folder_follows_fdh_jax_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FDH_JAX_CACHE", str(tmp_path / "shared"))
    assert image_scan.default_cache_dir() == tmp_path / "shared" / "image_scan"
    monkeypatch.delenv("FDH_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert image_scan.default_cache_dir() == tmp_path / "xdg" / "fdh_jax" / "image_scan"


# ---------------------------------------------------------------------------- several processes

PROCESS_SCRIPT = """
import json, sys
from fdh_jax import parallel
assert parallel.initialize_distributed(), "expected JAX_* variables from the launcher"
import jax
from fdh_jax.data import image_scan
from fdh_jax.data.sources import base
from fdh_jax.data.sources.folder import FolderSource

root, cache = sys.argv[1], sys.argv[2]
calls, real_decode = [], base.decode_image
def counting_decode(path, *args, **kwargs):
    calls.append(str(path))
    return real_decode(path, *args, **kwargs)
base.decode_image = counting_decode
sources = {split: FolderSource(root, split) for split in ("train", "test")}
kept = image_scan.scan_splits(sources, "skip", cache_dir=cache, progress=None)
print("RESULT " + json.dumps({
    "process": jax.process_index(),
    "decoded": sorted(calls),
    "paths": {split: source.paths for split, source in sources.items()},
    "kept": {split: source.paths for split, source in kept.items()},
}), flush=True)
"""


def test_two_processes_share_the_scan_and_report_once(tmp_path, bomb_png):
    """Each of 2 processes decodes its half (plus the other half's few bad files, for their
    reasons); both keep the same files; the summary is printed once; a rerun decodes nothing."""
    root = build_hostile_folder(tmp_path / "data", bomb_png)
    script = tmp_path / "scan_process.py"
    script.write_text(PROCESS_SCRIPT)
    bad = {path for path in expected_bad(root) if not (IS_ROOT and path.endswith("noread.jpg"))}

    def launch() -> tuple[dict[int, dict], str]:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("XLA_FLAGS", None)
        result = subprocess.run(
            [str(REPO / "launch" / "local_multiprocess.sh"), "2", "--", sys.executable]
            + [str(script), str(root), str(tmp_path / "cache")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        reports = [
            json.loads(line.split("RESULT ", 1)[1])
            for line in result.stdout.splitlines()
            if "RESULT " in line
        ]
        return {report["process"]: report for report in reports}, result.stderr

    reports, stderr = launch()
    assert sorted(reports) == [0, 1]
    for process, report in reports.items():
        share = set()
        for paths in report["paths"].values():
            share.update(paths[process::2])
        # Its own half, and the other half's bad files only (re-decoded for their reasons).
        assert set(report["decoded"]) == share | bad, process
        assert len(report["decoded"]) == len(share | bad)  # each file once
        for split, paths in report["paths"].items():
            assert report["kept"][split] == [p for p in paths if p not in bad]
    assert reports[0]["kept"] == reports[1]["kept"]
    summaries = [line for line in stderr.splitlines() if "skipping" in line]
    assert len(summaries) == 1 and summaries[0].startswith("[0] skipping"), stderr[-3000:]
    assert f"skipping {len(bad)} unreadable image(s)" in summaries[0]

    reports, _ = launch()  # every process has both splits cached: nothing decoded
    assert [reports[p]["decoded"] for p in (0, 1)] == [[], []]
    assert reports[0]["kept"] == reports[1]["kept"]
