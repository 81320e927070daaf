"""`--mode=add` from 2 processes x 1 CPU device (launch/local_multiprocess.sh, gloo on
127.0.0.1; fdh_jax/serving/multiprocess_add.py): the ids, codes and item numbers equal a
one-process add of the same photos, the unreadable photo of process 1's block is reported by
process 0, and a job killed after staging its blocks leaves the collection exactly as it was
until the same command, run again, completes the add."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, tiny_config
from served_collection import write_photos

from fdh_jax.search.collection import open_collection
from fdh_jax.serving.load import load_encoder
from fdh_jax.training import checkpointing
from fdh_jax.training.train import prepare_run
from fdh_jax.training.workdir import record_training_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny workdir (its step-0 checkpoint: saved, not trained, which takes 10 s instead of
    40) and 11 photos, the last (sorted) one unreadable."""
    root = tmp_path_factory.mktemp("multiprocess_add")
    config = tiny_config()
    run = prepare_run(config, root / "run")
    record_training_run(root / "run", config, run.database, resuming=False)
    checkpointing.save_checkpoint(run.manager, 0, run.state, run.progress)
    run.manager.wait_until_finished()
    run.manager.close()
    photos = root / "photos"
    write_photos(photos, per_colour=2)
    (photos / "zz_page.jpg").write_text("<html>a web page saved as .jpg</html>")
    return root / "run", photos


def _add(collection, workdir, photos, kill_after_staging=None):
    """`--mode=add` from 2 processes; `kill_after_staging`: the processes to SIGKILL then."""
    env = dict(os.environ, DEVICES_PER_PROCESS="1")
    env.pop("XLA_FLAGS", None)
    if kill_after_staging is not None:
        env["FDH_TEST_KILL_AFTER_STAGING"] = str(kill_after_staging)
    script = REPO / "tests" / "multiprocess_add_check.py"
    arguments = [f"--collection={collection}", f"--workdir={workdir}", f"--images={photos}"]
    command = [str(REPO / "launch" / "local_multiprocess.sh"), "2", "--", sys.executable]
    command += [str(script), "--mode=add", *arguments]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _state(directory):
    """Everything a user sees of a collection: ids, item numbers, codes of every length."""
    collection = open_collection(directory)
    ids = collection.ids()
    return {
        "ids": ids,
        "seq": [collection.get(i, codes=False).seq for i in ids],
        "codes": {k: collection.codes(k).tolist() for k in collection.bits},
    }


def test_two_processes_add_what_one_adds(trained, tmp_path):
    workdir, photos = trained
    paths = sorted(str(p) for p in photos.iterdir())
    one = open_collection(tmp_path / "one", load_encoder(workdir), create=True)
    for attempt in range(2):  # the second add replaces every item
        result = one.add(paths)
        assert [photo for photo, _ in result.failed] == [paths[-1]] and len(one) == 10

        two = _add(tmp_path / "two", workdir, photos)  # first: a new collection, by process 0
        assert two.returncode == 1, two.stderr[-3000:]  # status 1: an unreadable photo
        assert f"[0] fdh_jax: not added: {paths[-1]}: " in two.stderr, two.stderr[-3000:]
        assert "[0] Added 10 photo(s)" in two.stdout and "[1] Added" not in two.stdout
        assert _state(tmp_path / "two") == _state(tmp_path / "one"), attempt
    assert not any((tmp_path / "two" / "incoming").iterdir())


def test_a_kill_after_staging_changes_nothing_and_a_rerun_completes(trained, tmp_path):
    workdir, photos = trained
    paths = sorted(str(p) for p in photos.iterdir())
    one = open_collection(tmp_path / "one", load_encoder(workdir), create=True)
    one.add(paths[:3])
    directory = tmp_path / "two"
    two = open_collection(directory, load_encoder(workdir), create=True)
    two.add(paths[:3])
    manifest = (directory / "collection.json").read_bytes()
    before = _state(directory)

    # Both processes die after staging (a job killed at once). A kill of process 1 alone races:
    # process 0 either fails in the barrier and deletes its staging folder or is killed by the
    # launcher first. Process 0 makes the folder before the others start encoding and dies with
    # no collective left to fail in, so the staged files always stay for the rerun to clear.
    killed = _add(directory, workdir, photos, kill_after_staging="0,1")
    assert killed.returncode != 0 and "Added" not in killed.stdout, killed.stdout
    (run,) = (directory / "incoming").iterdir()
    assert any(run.glob("*.json"))  # at least one block was staged before the kill
    assert (directory / "collection.json").read_bytes() == manifest
    assert _state(directory) == before

    again = _add(directory, workdir, photos)
    assert again.returncode == 1, again.stderr[-3000:]
    one.add(paths)
    assert _state(directory) == _state(tmp_path / "one")
    assert not run.exists()  # the killed run's files: deleted by the commit
    assert json.loads((directory / "collection.json").read_text())["generation"] > 1
