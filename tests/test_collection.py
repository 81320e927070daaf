"""A living collection (fdh_jax/search/collection.py) against a plain Python dict.

Random sequences of add / replace / remove / compact / reopen, from a seeded generator, are
applied to a collection and to an insertion-ordered dict; after every step the collection's
items, `search` (distances and tie order) and, every few steps, `near_duplicates` must equal
brute force over the dict's live items, computed here with NumPy.
"""

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fdh_jax.data.decode import decode_image
from fdh_jax.search import collection as collection_module
from fdh_jax.search.collection import CollectionError, UnknownIdError, open_collection

BITS = [12, 32]


def _clustered_codes(rng, count, bits, centres):
    """Codes near a few centres (a few flipped bits): ties and near-duplicates are common."""
    base = centres[bits][rng.integers(0, len(centres[bits]), count)]
    flips = rng.random((count, bits)) < rng.choice([0.0, 0.03, 0.1])
    return np.where(flips, -base, base).astype(np.int8)


def _brute_force(model, query, k, bits):
    """Top k of the dict's items by (distance, insertion order): NumPy, no fdh_jax code."""
    ids = list(model)
    if not ids:
        return [], []
    codes = np.stack([model[i]["codes"][bits] for i in ids])
    distances = (codes != query[None, :]).sum(1)
    order = np.argsort(distances, kind="stable")[:k]
    return [ids[j] for j in order], distances[order].tolist()


def _all_pairs_groups(model, radius, bits):
    """Connected components of the within-radius graph over all pairs, by a plain BFS."""
    ids = list(model)
    codes = np.stack([model[i]["codes"][bits] for i in ids]) if ids else np.zeros((0, bits))
    near = (codes[:, None, :] != codes[None, :, :]).sum(-1) <= radius
    seen, groups = set(), []
    for start in range(len(ids)):
        if start in seen:
            continue
        component, frontier = {start}, [start]
        while frontier:
            node = frontier.pop()
            for other in np.flatnonzero(near[node]):
                if int(other) not in component:
                    component.add(int(other))
                    frontier.append(int(other))
        seen |= component
        if len(component) > 1:
            groups.append([ids[j] for j in sorted(component)])
    return groups


def _check(collection, model, rng, centres):
    assert len(collection) == len(model)
    assert collection.ids() == list(model)
    for _ in range(2):
        bits = int(rng.choice(BITS))
        queries = _clustered_codes(rng, 3, bits, centres)
        k = int(rng.integers(1, 16))
        method = str(rng.choice(["scan", "multi_index", "auto"]))
        found = collection.search(codes=queries, k=k, bits=bits, method=method)
        for row, query in enumerate(queries):
            expected_ids, expected_distances = _brute_force(model, query, k, bits)
            assert found.ids[row] == expected_ids, (method, bits, k)
            assert found.distances[row].tolist() == expected_distances
            assert found.paths[row] == [model[i]["path"] for i in expected_ids]


def _random_add(collection, model, rng, centres, names):
    count = int(rng.integers(1, 25))
    codes = {k: _clustered_codes(rng, count, k, centres) for k in BITS}
    ids = None
    if rng.random() < 0.6:  # given ids from a small pool: re-adding one replaces it
        ids = [str(x) for x in rng.choice(names, count, replace=False)]
    paths = [f"photo-{rng.integers(10**6)}.jpg" for _ in range(count)]
    labels = rng.integers(-1, 5, count)
    result = collection.add(codes=codes, ids=ids, paths=paths, labels=labels)
    assert result.failed == [] and len(result.ids) == count
    if ids is not None:
        assert result.ids == ids
    for j, item_id in enumerate(result.ids):
        model.pop(item_id, None)  # a replaced item counts as added last
        model[item_id] = {
            "codes": {k: codes[k][j] for k in BITS},
            "path": paths[j],
            "label": int(labels[j]),
        }


def _random_remove(collection, model, rng):
    live = list(model)
    if not live:
        return
    chosen = [str(x) for x in rng.choice(live, min(len(live), int(rng.integers(1, 8))), False)]
    if rng.random() < 0.1:
        with pytest.raises(UnknownIdError, match="nothing removed"):
            collection.remove([*chosen, "no-such-id"])
        return  # all or nothing: the known ids stay too
    assert collection.remove(chosen) == len(chosen)
    for item_id in chosen:
        del model[item_id]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_changes_match_a_dict(tmp_path, monkeypatch, seed):
    # Small thresholds, so that the delta beside the multi-index and its rebuilds, and the merges
    # of trailing segments, all happen within a few hundred items.
    monkeypatch.setattr(collection_module, "_DELTA_MIN_ITEMS", 8)
    rng = np.random.default_rng(seed)
    centres = {k: np.where(rng.random((6, k)) < 0.5, 1, -1) for k in BITS}
    names = np.array([f"photo-{i}" for i in range(80)])
    directory = tmp_path / "collection"
    collection = open_collection(directory, create=True, bits=BITS)
    model: OrderedDict = OrderedDict()
    for step in range(700):
        action = rng.random()
        if action < 0.5:
            _random_add(collection, model, rng, centres, names)
        elif action < 0.85:
            _random_remove(collection, model, rng)
        elif action < 0.92:
            collection.compact()
        else:
            collection = open_collection(directory)
        _check(collection, model, rng, centres)
        if step % 25 == 0:
            radius, bits = int(rng.integers(0, 4)), int(rng.choice(BITS))
            expected = _all_pairs_groups(model, radius, bits)
            for method in ("scan", "multi_index"):
                assert collection.near_duplicates(radius, bits=bits, method=method) == expected
    reopened = open_collection(directory)
    assert [item.id for item in reopened] == list(model)
    for item in reopened:
        assert item.path == model[item.id]["path"] and item.label == model[item.id]["label"]
        for k in BITS:
            np.testing.assert_array_equal(item.codes[k], model[item.id]["codes"][k])
    assert reopened.stats()["segments"] <= 2 * int(np.log2(max(len(model), 2))) + 2


def test_a_change_writes_only_its_own_items(tmp_path):
    rng = np.random.default_rng(0)
    collection = open_collection(tmp_path / "c", create=True, bits=[64])
    collection.add(codes=np.where(rng.random((20_000, 64)) < 0.5, 1, -1))
    base = collection.last_change_bytes
    collection.add(codes=np.where(rng.random((10, 64)) < 0.5, 1, -1))
    assert collection.last_change_bytes < base / 50  # 10 items, not 20,010
    collection.remove(collection.ids()[:5])
    assert collection.last_change_bytes < base / 50


def test_kill_before_the_commit_leaves_the_collection_as_before(tmp_path):
    """A segment written without its manifest (a kill between the two renames) and temporary
    files are ignored, then deleted by the next change."""
    directory = tmp_path / "c"
    collection = open_collection(directory, create=True, bits=[16])
    collection.add(codes=np.ones((3, 16)), ids=["a", "b", "c"])
    orphan = directory / "segments" / "00000099.npz"
    orphan.write_bytes(collection.segment_files()[0].read_bytes())
    temporary = directory / f".collection.json.tmp-{os.getpid()}"
    temporary.write_text("{half a manifest")
    assert open_collection(directory).ids() == ["a", "b", "c"]
    collection.remove(["b"])
    assert not orphan.exists() and not temporary.exists()
    assert open_collection(directory).ids() == ["a", "c"]


def test_unusable_folders_and_files_are_named_in_one_line(tmp_path):
    with pytest.raises(CollectionError, match="is not a collection"):
        open_collection(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CollectionError, match="holds files and no collection"):
        open_collection(tmp_path, create=True, bits=[16])
    directory = tmp_path / "c"
    collection = open_collection(directory, create=True, bits=[16])
    collection.add(codes=np.ones((3, 16)), ids=["a", "b", "c"])
    segment = collection.segment_files()[0]
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    with pytest.raises(CollectionError, match=f"{segment}: damaged collection segment"):
        open_collection(directory)
    segment.unlink()
    with pytest.raises(CollectionError, match="missing"):
        open_collection(directory)
    manifest = directory / "collection.json"
    manifest.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CollectionError, match="not an fdh_jax collection manifest"):
        open_collection(directory)


class _FakeEncoder:
    """A stand-in with an encoder's interface: codes from each image's mean colour."""

    def __init__(self, fingerprint="f" * 64):
        self.bits = (8, 16)
        self.identity = {
            "fingerprint": fingerprint,
            "step": 3,
            "bits": [8, 16],
            "preprocessing": {"size": 8},
            "backbone": "fake",
        }
        self.source_path = None

    def encode_images(self, images, bits=None):
        images = [i if isinstance(i, np.ndarray) else decode_image(i) for i in images]
        means = np.stack([np.asarray(i, np.float64).mean((0, 1)) for i in images])
        levels = np.linspace(0, 255, 17)[1:-1]
        codes = {}
        for k in self.bits:
            thresholds = levels[np.arange(k) % len(levels)]
            codes[str(k)] = np.where(means[:, [j % 3 for j in range(k)]] > thresholds, 1, -1)
        return codes if bits is None else {str(bits): codes[str(bits)]}


def test_bad_photos_are_named_and_the_others_added(tmp_path):
    photos = []
    for i, colour in enumerate([(10, 200, 30), (250, 250, 250), (0, 0, 0)]):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(path)
        photos.append(path)
    html = tmp_path / "page.jpg"
    html.write_text("<html>not a photo</html>")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(photos[0].read_bytes()[:100])
    collection = open_collection(tmp_path / "c", _FakeEncoder(), create=True)
    result = collection.add([photos[0], html, photos[1], truncated, photos[2]])
    assert result.ids == [str(photos[0]), str(photos[1]), str(photos[2])]
    assert [photo for photo, _ in result.failed] == [str(html), str(truncated)]
    assert all(why for _, why in result.failed)
    hits = collection.search([photos[1]], k=1)
    assert hits.ids == [[str(photos[1])]] and hits.distances.tolist() == [[0]]
    again = collection.add([photos[1]])  # the same file again replaces its item
    assert again.ids == [str(photos[1])] and len(collection) == 3
    assert collection.ids()[-1] == str(photos[1])
    # Twice in one add would be one id added twice by one segment: refused, nothing written.
    with pytest.raises(CollectionError, match="ids given twice in one call"):
        collection.add([photos[0], photos[2], photos[0]])
    assert open_collection(tmp_path / "c").ids() == collection.ids()

    with pytest.raises(CollectionError, match="not of this model"):
        open_collection(tmp_path / "c", _FakeEncoder(fingerprint="0" * 64))
    with pytest.raises(CollectionError, match="open the collection with its encoder"):
        open_collection(tmp_path / "c").add([photos[0]])
    assert Path(tmp_path / "c" / "collection.json").is_file()


def test_kills_lose_no_acknowledged_change():
    """benchmarks/kill_collection.py, shortened: 3 kills of a process changing a collection."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_collection.py"
    result = subprocess.run(
        [sys.executable, str(script), "--n=3", "--changes=60", "--seed=5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "3 of 3 trials" in result.stdout
