"""`--mode=add` from several processes (hosts) at once: each encodes a share of the photos.

    launch/local_multiprocess.sh 2 -- python -m fdh_jax.main --mode=add --collection=C \
        --images=PHOTOS --workdir=W

Every process lists the photos (and `--ids`) alike and takes a contiguous block of the list:
process `p` of `P` encodes photos `[p * n // P, (p + 1) * n // P)` on its own devices, with no
collective (a process's unreadable photos only shorten its block), and writes its block as a
segment into a staging folder of the collection (`segments.staging_run`), numbered as if the
blocks before it had just been added. After a barrier process 0 alone takes the collection's
write lock and commits every block in one manifest write (`Collection.commit_staged`): ids and
codes, in the order of the photo list, equal those of a one-process add of the same photos, and
an id already in the collection is replaced as there. The collection folder must be shared by
the processes (one file system: a local disk for one machine, NFS or the like for several).

A kill of any process before that commit leaves the collection as it was; the staged files are
garbage that the next change deletes, and the same command, run again, adds the photos. Process
0 prints the unreadable photos of every block and the result line; every process exits with
the status a one-process add would have.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from fdh_jax.search import segments
from fdh_jax.search.collection import (
    Collection,
    CollectionError,
    check_distinct_ids,
    open_collection,
)
from fdh_jax.serving import collection_modes as modes
from fdh_jax.serving.load import load_encoder

COMMIT_FAILED = 2  # the others' exit status when process 0 could not commit (it says why)
_NAME_BYTES = 8  # of the staging folder's name, which process 0 draws and tells the others


def add_photos(directory: str, workdir: str | None, step: int | None, images: str, ids: str | None):
    """`--mode=add` in each of the processes of a multi-process run; returns the exit status
    (0, or `SOME_PHOTOS_FAILED` on every process if any process had an unreadable photo)."""
    rank, processes = jax.process_index(), jax.process_count()
    paths, given = modes.photos_and_ids(images, ids)
    check_distinct_ids(given or paths)  # before any encoding, as a one-process add
    path = Path(directory).expanduser()
    encoder = load_encoder(modes.model_for_cli(path, workdir, create=True), step)
    encoder = encoder.on_local_devices()
    with contextlib.ExitStack() as stack:
        name, collection = np.zeros(_NAME_BYTES, np.int32), None
        if rank == 0 or segments.is_collection(path):  # a wrong model fails on every process
            collection = open_collection(path, encoder, create=rank == 0)
        if rank == 0:
            run = stack.enter_context(segments.staging_run(path))
            name = np.frombuffer(bytes.fromhex(run.name), np.uint8).astype(np.int32)
        # Also a barrier: the others open a new collection once process 0 has made it.
        name = multihost_utils.broadcast_one_to_all(name)
        if rank != 0:
            collection = collection or open_collection(path, encoder)
            run = path / segments.INCOMING / bytes(np.asarray(name, np.uint8)).hex()
        start, stop = rank * len(paths) // processes, (rank + 1) * len(paths) // processes
        block = given[start:stop] if given is not None else None
        progress = modes.progress_printer(stop - start)
        new = collection.prepare_add(paths[start:stop], ids=block, progress=progress)
        counts = np.asarray(
            multihost_utils.process_allgather(np.array([len(new.kept), len(new.failed)]))
        ).reshape(processes, 2)
        collection.stage_add(new, run, rank, seq_offset=int(counts[:rank, 0].sum()))
        multihost_utils.sync_global_devices("fdh_jax add: every block staged")
        status = modes.SOME_PHOTOS_FAILED if counts[:, 1].sum() else 0
        return _commit(collection, run, processes, status)


def _commit(collection: Collection, run: Path, processes: int, status: int) -> int:
    """Process 0 commits the staged blocks and reports; every process learns how that went (so
    none exits before the commit) and returns the exit status."""
    outcome = np.array(status, np.int32)
    result = None
    if jax.process_index() == 0:
        try:
            result = collection.commit_staged(run, processes)
        except BaseException:
            multihost_utils.broadcast_one_to_all(np.array(COMMIT_FAILED, np.int32))
            raise
    outcome = int(multihost_utils.broadcast_one_to_all(outcome))
    if result is not None:
        return modes.report_add(collection, result)
    if outcome == COMMIT_FAILED:
        raise CollectionError(
            "process 0 could not commit the add (its error says why): nothing was added"
        )
    return outcome
