"""A trained workdir on its own: encode, search, export and eval without the training setup.

A frozen resnet18 (a `.safetensors` written from a PyTorch model) is trained for two steps on a
folder dataset; then the dataset and the weights file are renamed away and every serving mode
runs from the workdir alone, through the command line, without `--config`.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from folder_datasets import pretrained_config, resnet18_file, write_folder_dataset
from PIL import Image

from fdh_jax.common.checksums import variables_fingerprint
from fdh_jax.data.decode import decode_image
from fdh_jax.data.sources.image_files import ImageFilesSource
from fdh_jax.search.collection import open_collection
from fdh_jax.search.hash_index import HashIndex
from fdh_jax.serving.encoder import EncoderRequestError
from fdh_jax.serving.export import export_encoder
from fdh_jax.serving.load import load_encoder
from fdh_jax.serving.workdir_encoder import restore_encoder
from fdh_jax.training.checkpointing import NoCheckpointError
from fdh_jax.training.train import train_and_evaluate
from fdh_jax.training.workdir import ModelFileError


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "fdh_jax.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _write_unseen_classes(root: Path) -> Path:
    """`root/<class>/<i>.png`: 3 classes the model never saw, 4 images each."""
    rng = np.random.default_rng(7)
    for label, colour in enumerate([(250, 20, 200), (20, 20, 20), (128, 128, 250)]):
        (root / f"unseen_{label}").mkdir(parents=True)
        for index in range(4):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (44, 52, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"unseen_{label}" / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A trained workdir whose dataset and weights file have been renamed away."""
    tmp = tmp_path_factory.mktemp("serving")
    weights = resnet18_file(tmp)
    data = write_folder_dataset(tmp / "data")
    photos = tmp / "photos"
    photos.mkdir()
    for name in ("class_0/0.png", "class_1/1.png", "class_3/2.png"):
        shutil.copy(data / name, photos / name.replace("/", "_"))
    config = pretrained_config(data, "resnet18", weights, freeze=True)
    workdir = tmp / "run"
    train_and_evaluate(config, workdir)
    data.rename(tmp / "data_moved")
    weights.rename(tmp / "weights_moved.safetensors")
    names = ("config.json", "model.json", "results.json")
    record = {name: (workdir / name).read_bytes() for name in names}
    # The two modes both tests below read: run once.
    _cli(f"--workdir={workdir}", "--mode=encode", f"--images={photos}", f"--index={tmp / 'db.npz'}")
    _cli(f"--workdir={workdir}", "--mode=export", f"--export_dir={tmp / 'export'}")
    return tmp, workdir, photos, record


def test_serving_modes_run_from_the_workdir_alone(served):
    tmp, workdir, photos, record = served
    index = tmp / "db.npz"  # --mode=encode, in the fixture
    loaded = HashIndex.load(index)
    assert loaded.bits == 12 and len(loaded) == 3
    assert json.loads(loaded.encoder_json)["fingerprint"] == variables_fingerprint(
        restore_encoder(workdir).variables
    )

    query = sorted(photos.iterdir())[1]
    found = _cli(f"--workdir={workdir}", "--mode=search", f"--index={index}", f"--query={query}")
    lines = found.stdout.splitlines()
    assert lines[0] == f"query: {query}" and len(lines) == 4  # the top 10 of a 3-image index
    assert any(line.endswith(f"d=  0  {query}") for line in lines[1:])  # itself, at distance 0

    export = tmp / "export"  # --mode=export, in the fixture
    manifest = json.loads((export / "export.json").read_text())
    assert manifest["step"] == 2 and "cpu" in manifest["platforms"]

    unseen = _write_unseen_classes(tmp / "unseen")
    evaluated = _cli(f"--workdir={workdir}", "--mode=eval", f"--eval_data={unseen}")
    assert "mAP@all" in evaluated.stdout
    results = json.loads((workdir / "eval" / "unseen" / "results.json").read_text())
    assert results["num_query"] + results["num_database"] == 12
    assert results["eval_data"] == str(unseen.resolve()) and results["checkpoint_step"] == 2
    assert all(0.0 < value <= 1.0 for value in results["mAP"].values())

    for name, content in record.items():  # the training record and results stay as trained
        assert (workdir / name).read_bytes() == content, name


_FRESH_EXPORT_ENCODE = """
import json, sys
import fdh_jax
encoder = fdh_jax.load_encoder(sys.argv[1])
codes = encoder.encode_images(sys.argv[2:])
heavy = ("flax", "optax", "orbax", "grain", "ml_collections", "tensorflow_datasets")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
models = sorted(m for m in sys.modules if m.startswith("fdh_jax.models"))
print(json.dumps({"codes": {k: v.tolist() for k, v in codes.items()}, "loaded": loaded + models}))
"""


def test_export_workdir_and_encode_mode_give_identical_codes(served):
    tmp, workdir, photos, _ = served
    export, index = tmp / "export", tmp / "db.npz"  # both written by the CLI in the fixture
    paths = ImageFilesSource(photos).paths  # the order --mode=encode uses

    fresh = subprocess.run(
        [sys.executable, "-c", _FRESH_EXPORT_ENCODE, str(export), *paths],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    report = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []  # no Flax, no fdh_jax.models, no training stack

    from_workdir = load_encoder(workdir).encode_images(paths)
    from_export = {k: np.array(v, np.int8) for k, v in report["codes"].items()}
    assert set(from_workdir) == set(from_export) == {"8", "12"}
    for k in from_workdir:
        np.testing.assert_array_equal(from_export[k], from_workdir[k])
    np.testing.assert_array_equal(HashIndex.load(index).codes, from_workdir["12"])
    # Arrays of any size go through the same evaluation transform as files.
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    np.testing.assert_array_equal(
        load_encoder(export).encode_images(pixels, bits=8)["8"], from_workdir["8"]
    )


def test_the_encoding_batch_does_not_change_codes(served):
    """The service encodes `prepare`d photos in batches of 1 to 4 and multiples of 4
    (`encode_prepared`, no input pipeline): every size gives the codes `encode_images` gives in
    the training config's batch, through the workdir and the export."""
    tmp, workdir, photos, _ = served
    paths = [str(p) for p in sorted(photos.iterdir())] * 3
    for encoder in (load_encoder(workdir), load_encoder(tmp / "export")):
        reference = encoder.encode_images(paths)
        for batch_size in (1, 4):  # 9 photos: a partial last batch of 4
            codes = encoder.encode_images(paths, batch_size=batch_size)
            for k, expected in reference.items():
                np.testing.assert_array_equal(codes[k], expected, err_msg=f"{k}, {batch_size}")
        prepared = np.stack([encoder.prepare(decode_image(p)) for p in paths])
        for size in (1, 3, 8):
            codes = [encoder.encode_prepared(prepared[i : i + size]) for i in range(0, 9, size)]
            for k, expected in reference.items():
                got = np.concatenate([c[k] for c in codes])
                np.testing.assert_array_equal(got, expected, err_msg=f"{k}, prepared {size}")


def test_serving_failures_are_one_line(served):
    tmp, workdir, photos, _ = served
    foreign = tmp / "foreign.npz"
    HashIndex(
        codes=np.ones((2, 12), np.int8),
        labels=[0, 1],
        paths=["a", "b"],
        encoder_json=json.dumps({"fingerprint": "0" * 64, "step": 9}),
    ).save(foreign)
    query = sorted(photos.iterdir())[0]
    search = ("--mode=search", f"--index={foreign}", f"--query={query}")
    refused = _cli(f"--workdir={workdir}", *search, check=False)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "encoded by model 000000000000" in refused.stderr

    broken = tmp / "broken_export"
    export_encoder(workdir, broken)
    with open(broken / "variables.npz", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    corrupt = _cli(
        f"--workdir={broken}", "--mode=encode", f"--images={photos}", "--index=x.npz", check=False
    )
    assert corrupt.returncode == 2 and corrupt.stderr.count("\n") == 1
    assert "variables.npz does not match its checksum" in corrupt.stderr

    # Codes fitted to a collection need the model's features: an export refuses in one line.
    adapted = _cli(
        f"--workdir={tmp / 'export'}",
        "--mode=encode",
        f"--images={photos}",
        f"--index={tmp / 'adapted.npz'}",
        "--adapt",
        check=False,
    )
    assert adapted.returncode == 2 and adapted.stderr.count("\n") == 1
    assert "need the training workdir" in adapted.stderr
    assert not (tmp / "adapted.npz").exists()


def test_collection_modes_from_the_command_line(served, tmp_path):
    """add (creating the collection from the workdir), search, remove, duplicates and compact
    through the CLI; results equal a fresh `--mode=encode` index of the same photos."""
    tmp, workdir, photos, _ = served
    collection = tmp_path / "collection"
    added = _cli(f"--workdir={workdir}", "--mode=add", f"--collection={collection}",
                 f"--images={photos}")  # fmt: skip
    assert added.stdout.strip().endswith("(3 items)")
    paths = [os.path.abspath(p) for p in ImageFilesSource(photos).paths]
    index = HashIndex.load(tmp / "db.npz")  # the fixture's --mode=encode of the same photos
    opened = open_collection(collection)
    assert opened.ids() == paths and opened.model_path == str(workdir.resolve())
    found = opened.search(codes=index.codes, k=3)
    expected_paths, expected_distances = index.search(index.codes, 3)
    assert [[os.path.abspath(p) for p in row] for row in expected_paths] == found.paths
    np.testing.assert_array_equal(found.distances, expected_distances)

    unseen = _write_unseen_classes(tmp_path / "unseen")
    (unseen / "page.jpg").write_text("<html>a web page saved as .jpg</html>")
    more = _cli("--mode=add", f"--collection={collection}", f"--workdir={tmp / 'export'}",
                f"--images={unseen}", check=False)  # fmt: skip
    assert more.returncode == 1, more.stderr[-2000:]  # some photos could not be read
    assert more.stderr.count("not added:") == 1 and "page.jpg" in more.stderr
    assert "Added 12 photo(s)" in more.stdout and "(15 items)" in more.stdout

    removed = paths[1]
    gone = _cli("--mode=remove", f"--collection={collection}", f"--ids={removed}")
    assert gone.stdout.strip().endswith("(14 items)")
    hits = _cli("--mode=search", f"--collection={collection}", f"--query={removed}", "--topk=20")
    lines = hits.stdout.splitlines()
    assert lines[0] == f"query: {removed}" and len(lines) == 15
    assert all(removed not in line for line in lines[1:]) and paths[0] in hits.stdout

    dups = _cli("--mode=duplicates", f"--collection={collection}", "--max_distance=0")
    assert dups.stdout.splitlines()[-1].endswith("among 14 items")
    compacted = _cli("--mode=compact", f"--collection={collection}")
    assert "(14 items)" in compacted.stdout
    assert open_collection(collection).ids() == [paths[0], paths[2], *opened_ids(unseen)]

    unknown = _cli("--mode=remove", f"--collection={collection}", "--ids=nope", check=False)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "no item with id 'nope'" in unknown.stderr
    nothing = _cli("--mode=search", f"--collection={tmp_path}", f"--query={removed}", check=False)
    assert nothing.returncode == 2 and "is not a collection" in nothing.stderr
    assert nothing.stderr.count("\n") == 1


def opened_ids(folder: Path) -> list[str]:
    """The ids `--mode=add --images=folder` gives: absolute paths, sorted, images only."""
    return [os.path.abspath(p) for p in ImageFilesSource(folder).paths if not p.endswith(".jpg")]


def test_library_errors_name_what_is_wrong(served, tmp_path):
    tmp, workdir, photos, _ = served
    with pytest.raises(NoCheckpointError, match="no checkpoint in"):
        load_encoder(_empty_workdir(workdir, tmp_path))
    with pytest.raises(NoCheckpointError, match="steps there: 2"):
        load_encoder(workdir, step=5)
    encoder = load_encoder(workdir)
    with pytest.raises(EncoderRequestError, match="code lengths"):
        encoder.encode_images([str(p) for p in photos.iterdir()], bits=16)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    from fdh_jax.data.decode import BadImageError

    with pytest.raises(BadImageError, match="bad.jpg"):
        encoder.encode_images([str(bad)])
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        encoder.encode_images(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ModelFileError, match="neither a training workdir"):
        load_encoder(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an fdh_jax export"):
        export_encoder(workdir, tmp_path / "taken")


def _empty_workdir(workdir: Path, tmp_path: Path) -> Path:
    """A copy of the workdir's record without checkpoints."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("config.json", "model.json"):
        shutil.copy(workdir / name, empty / name)
    return empty


def _readme_example(section: str, replacements: dict) -> str:
    readme = (REPO / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme[readme.index(section) :], re.S).group(1)
    for old, new in replacements.items():
        assert old in example, old
        example = example.replace(old, new)
    return example


def _jpegs(photos: Path, folder: Path) -> Path:
    """The fixture's three photos as a.jpg, b.jpg, c.jpg (the README examples' names)."""
    folder.mkdir()
    for name, path in zip("abc", sorted(photos.iterdir()), strict=True):
        Image.open(path).convert("RGB").save(folder / f"{name}.jpg", quality=95)
    return folder


def test_readme_trained_model_example_runs(served, tmp_path, monkeypatch, capsys):
    tmp, workdir, photos, _ = served
    export = tmp_path / "encoder"
    export_encoder(workdir, export)
    monkeypatch.chdir(_jpegs(photos, tmp_path / "jpegs"))
    example = _readme_example(
        "## Use a trained model",
        {
            '"/tmp/cub100_encoder"': repr(str(export)),
            '"/tmp/photos.npz"': repr(str(tmp_path / "photos.npz")),
        },
    )
    exec(compile(example, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "(8, 12) bits: a.jpg at distance 0"
    assert len(HashIndex.load(tmp_path / "photos.npz")) == 3


def test_readme_collection_example_runs(served, tmp_path, monkeypatch, capsys):
    tmp, workdir, photos, _ = served
    monkeypatch.chdir(_jpegs(photos, tmp_path / "jpegs"))
    example = _readme_example(
        "## A growing collection",
        {'"/tmp/cub100_encoder"': repr(str(workdir)), '"/tmp/birds"': repr(str(tmp_path / "b"))},
    )
    exec(compile(example, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "['a', 'b', 'c'] []"
    assert lines[1] == "a 0 {'site': 'x'}"
    assert lines[2].startswith("2 ")
    assert open_collection(tmp_path / "b").ids() == ["b", "c"]
