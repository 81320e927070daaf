"""Kill a process that changes a collection at random moments; check that nothing acknowledged is
lost and nothing is half done.

  python benchmarks/kill_collection.py --n=20 --seed=0

Each trial starts a worker process on a new collection (`fdh_jax.open_collection`, 64-bit codes)
that applies a seeded sequence of changes: adds of 1 to 300 codes under ids from a pool (so many
replace earlier items), removals of up to 50 ids, and now and then a compaction; it prints `ack I`
after change I returned (the acknowledgement). The trial SIGKILLs the worker at a moment drawn
uniformly over 90% of an uninterrupted run's wall time after its first change (writing a segment,
the manifest's rename, a merge of segments or a compaction are all possible), opens the collection,
and compares its items (ids, order, codes, paths) with a plain dict that replays the changes: they
must equal the state after the acknowledged changes, or after one more (the change in flight,
whole). Then a new worker applies the remaining changes and the final state must equal the full
replay.

Prints one line per trial and how many of the `n` held. CPU only; a few seconds per trial.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BITS = 64
POOL = 2000  # ids drawn from item-0 ... item-1999


def change(seed: int, number: int) -> tuple:
    """Change `number` of the sequence, the same in the worker and the replay:
    ("add", ids, codes int8 [n, 64]), ("remove", ids) or ("compact",)."""
    rng = np.random.default_rng([seed, number])
    kind = rng.random()
    if kind < 0.04:
        return ("compact",)
    if kind < 0.3:
        count = int(rng.integers(1, 51))
        return ("remove", [f"item-{i}" for i in rng.choice(POOL, count, replace=False)])
    count = int(rng.integers(1, 301))
    ids = [f"item-{i}" for i in rng.choice(POOL, count, replace=False)]
    return ("add", ids, np.where(rng.random((count, BITS)) < 0.5, 1, -1).astype(np.int8))


def replay(seed: int, count: int) -> OrderedDict:
    """The items after the first `count` changes, by a plain insertion-ordered dict."""
    items: OrderedDict = OrderedDict()
    for number in range(count):
        step = change(seed, number)
        if step[0] == "add":
            for item_id, code in zip(step[1], step[2], strict=True):
                items.pop(item_id, None)  # a replaced item counts as added last
                items[item_id] = code
        elif step[0] == "remove":
            for item_id in step[1]:
                items.pop(item_id, None)
    return items


def worker(directory: str, seed: int, start: int, stop: int) -> None:
    """Applies changes [start, stop) and acknowledges each on stdout once it returned."""
    from fdh_jax.search.collection import open_collection  # noqa: PLC0415 (the worker only)

    collection = open_collection(directory, create=True, bits=[BITS])
    for number in range(start, stop):
        step = change(seed, number)
        if step[0] == "add":
            collection.add(codes=step[2], ids=step[1], paths=[f"/{i}.jpg" for i in step[1]])
        elif step[0] == "remove":
            collection.remove(step[1], missing="ignore")
        else:
            collection.compact()
        print(f"ack {number}", flush=True)


def _start(directory: Path, seed: int, start: int, stop: int) -> tuple[subprocess.Popen, Path]:
    """Starts a worker; its acknowledgements go to a file (-> the process and that file), read
    whole after it ended: a pipe read partly before a kill could hold acknowledgements back."""
    command = [sys.executable, __file__, "--worker", str(directory), f"--seed={seed}"]
    command += [f"--start={start}", f"--stop={stop}"]
    log = directory.with_name(f"{directory.name}.acks-{start}")
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.PIPE, text=True), log


def _wait_for_first_ack(process: subprocess.Popen, log: Path) -> None:
    while process.poll() is None and "ack " not in log.read_text():
        time.sleep(0.001)


def state_of(directory: Path) -> OrderedDict:
    """The collection's live items as {id: code}, in its order, read by a fresh process's view
    (a new `open_collection`)."""
    from fdh_jax.search.collection import open_collection  # noqa: PLC0415

    collection = open_collection(directory)
    state = OrderedDict()
    for item in collection:
        assert item.path == f"/{item.id}.jpg", item
        state[item.id] = item.codes[BITS]
    return state


def same(state: OrderedDict, expected: OrderedDict) -> bool:
    return list(state) == list(expected) and all(
        np.array_equal(state[i], expected[i]) for i in expected
    )


def trial(directory: Path, seed: int, changes: int, kill_after: float) -> tuple[bool, str]:
    """One kill and restart; -> (held, what happened)."""
    process, log = _start(directory, seed, 0, changes)
    _wait_for_first_ack(process, log)  # the first change is done: the worker has started
    time.sleep(kill_after)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    acked = sum(1 for line in log.read_text().splitlines() if line.startswith("ack "))
    state = state_of(directory)
    if same(state, replay(seed, acked)):
        done, how = acked, "without the change in flight"
    elif acked < changes and same(state, replay(seed, acked + 1)):
        done, how = acked + 1, "with the change in flight, whole"
    else:
        return False, f"after {acked} acks the items match neither {acked} nor {acked + 1} changes"
    rest, _ = _start(directory, seed, done, changes)
    _, stderr = rest.communicate()
    if rest.returncode != 0:
        return False, f"the restart failed: {stderr[-500:]}"
    if not same(state_of(directory), replay(seed, changes)):
        return False, "the restarted run ended with other items than the full replay"
    return True, f"{acked} acks, found {how}; restart completed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="trials (kills)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--changes", type=int, default=300, help="changes per run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.seed, args.start, args.stop)
        return
    sys.path.insert(0, str(REPO))
    print(f"load average: {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        reference, log = _start(Path(scratch) / "reference", args.seed, 0, args.changes)
        _wait_for_first_ack(reference, log)
        began = time.perf_counter()
        _, stderr = reference.communicate()
        if reference.returncode != 0:
            sys.exit(f"the uninterrupted run failed: {stderr[-2000:]}")
        wall = time.perf_counter() - began
        print(f"uninterrupted run: changes 1 to {args.changes - 1} in {wall:.1f} s", flush=True)
        rng = np.random.default_rng(args.seed)
        held = 0
        for number in range(args.n):
            kill_after = float(rng.uniform(0, 0.9 * wall))  # while changes are made
            ok, what = trial(
                Path(scratch) / f"trial{number}", args.seed + number, args.changes, kill_after
            )
            held += ok
            print(
                f"trial {number:2d}: kill at {kill_after:5.2f} s: "
                f"{'ok  ' if ok else 'FAIL'} {what}",
                flush=True,
            )
    print(f"{held} of {args.n} trials found exactly the acknowledged changes (or one more, whole)")
    sys.exit(0 if held == args.n else 1)


if __name__ == "__main__":
    main()
