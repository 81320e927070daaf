"""A kill while results.json or an index is being replaced leaves the previous file whole."""

import json
import subprocess
import sys

import numpy as np

from fdh_jax.evaluation.results import write_results
from fdh_jax.search.hash_index import HashIndex

# Writes the second version with the final rename replaced by SIGKILL: the process dies with
# the new content fully written to a temporary file, at the last moment before it would count.
_KILLED_WRITE = """
import os, signal, sys
import numpy as np
from fdh_jax.evaluation.results import write_results
from fdh_jax.search.hash_index import HashIndex
os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
target = sys.argv[1]
if target.endswith(".json"):
    write_results(os.path.dirname(target), {"mAP": {"12": 0.9}, "version": 2})
else:
    codes = np.ones((5, 16), np.int8)
    HashIndex(codes=codes, labels=np.arange(5), paths=[str(i) for i in range(5)]).save(target)
"""


def _killed_write(path):
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(path)], capture_output=True)
    assert done.returncode == -9, done.stderr.decode()[-2000:]


def test_kill_while_replacing_results_json_keeps_the_previous(tmp_path):
    first = {"mAP": {"12": 0.5}, "version": 1}
    write_results(tmp_path, first)
    _killed_write(tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text()) == first
    # The orphaned temporary file is not mistaken for results (and can be removed).
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".json")] == ["results.json"]


def test_kill_while_replacing_an_index_keeps_the_previous(tmp_path):
    path = tmp_path / "index.npz"
    codes = np.where(np.random.default_rng(0).random((7, 16)) < 0.5, 1, -1).astype(np.int8)
    HashIndex(codes=codes, labels=np.arange(7), paths=[f"p{i}" for i in range(7)]).save(path)
    _killed_write(path)
    loaded = HashIndex.load(path)  # checksum verified
    np.testing.assert_array_equal(loaded.codes, codes)
