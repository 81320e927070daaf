"""What a change to a large collection costs, and what changes cost its searches.

  python benchmarks/collection.py --num=1000000

On `--num` class-clustered 64-bit codes (benchmarks/clustered_codes.py, as `search.py --mode mih`):
builds a collection (`fdh_jax.open_collection`, codes given directly) and its multi-index (one
search), then times adding 1,000 codes and removing 1,000 items (ms per item, bytes written, which
must be of the order of the change, not of the collection). Then applies 10,000 adds and 10,000
removes in batches of 1,000, and without compacting times top-100 search of `--queries` queries
against a `MultiIndexHashing` freshly built over the same live items (its build not timed),
checks that both equal brute force (`hamming_topk` over the live codes in insertion order, and a
NumPy loop for the first queries), and prints the ratio of the times (the issue's bar: at most
1.5). Then compacts and checks the results again. Check the load (printed) first: the timings
are only meaningful on a quiet machine.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clustered_codes import clustered_codes  # noqa: E402
from search import brute_force_rows  # noqa: E402

from fdh_jax.search.bits import unpack_codes  # noqa: E402
from fdh_jax.search.collection import open_collection  # noqa: E402
from fdh_jax.search.multi_index import MultiIndexHashing  # noqa: E402
from fdh_jax.search.scan import hamming_topk  # noqa: E402

BITS = 64
BATCH = 1000


def _codes(count: int, seed: int) -> np.ndarray:
    packed, _ = clustered_codes(count, BITS, seed=seed)
    return unpack_codes(packed, BITS)


def _timed_change(collection, what: str, change) -> None:  # noqa: ANN001
    began = time.perf_counter()
    change()
    seconds = time.perf_counter() - began
    print(
        f"{what}: {1000 * seconds:8.1f} ms, {1000 * seconds / BATCH:.3f} ms per item, "
        f"{collection.last_change_bytes:,} bytes written "
        f"({collection.last_change_bytes / BATCH:.0f} per item)",
        flush=True,
    )


def _best_of(repeats: int, search) -> tuple[float, tuple]:  # noqa: ANN001
    times, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = search()
        times.append(time.perf_counter() - began)
    return min(times), result


def _compare(collection, queries: np.ndarray, k: int, repeats: int) -> None:  # noqa: ANN001
    """Times the collection's search against a fresh multi-index over its live items; checks
    both against brute force."""
    live = collection.codes()
    positions = {item_id: p for p, item_id in enumerate(collection.ids())}
    collection.search(codes=queries[:1], k=k)  # builds the multi-index after a compaction
    began = time.perf_counter()
    fresh = MultiIndexHashing(live)
    print(
        f"fresh multi-index over {len(live):,} live items built in "
        f"{time.perf_counter() - began:.2f} s"
    )
    ours_s, ours = _best_of(repeats, lambda: collection.search(codes=queries, k=k))
    fresh_s, (fresh_d, fresh_i) = _best_of(repeats, lambda: fresh.search(queries, k))
    brute_d, brute_i = hamming_topk(queries, live, k)
    ours_i = np.array([[positions[i] for i in row] for row in ours.ids])
    exact = np.array_equal(ours.distances, brute_d) and np.array_equal(ours_i, brute_i)
    exact = exact and np.array_equal(fresh_d, brute_d) and np.array_equal(fresh_i, brute_i)
    numpy_d, numpy_i = brute_force_rows(np.packbits(queries > 0, 1), np.packbits(live > 0, 1), k, 3)
    exact = exact and np.array_equal(numpy_d, brute_d[:3]) and np.array_equal(numpy_i, brute_i[:3])
    print(
        f"top-{k} of {len(queries)} queries: collection {1000 * ours_s:.1f} ms, fresh multi-index "
        f"{1000 * fresh_s:.1f} ms, ratio {ours_s / fresh_s:.2f}x; "
        f"identical to brute force: {exact}",
        flush=True,
    )
    if not exact:
        sys.exit("the collection's results differ from brute force")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1_000_000, help="codes in the collection")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--changes", type=int, default=10_000, help="adds and removes each")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})", flush=True)
    rng = np.random.default_rng(0)
    queries = _codes(args.queries, seed=1)
    with tempfile.TemporaryDirectory() as scratch:
        collection = open_collection(Path(scratch) / "c", create=True, bits=[BITS])
        began = time.perf_counter()
        collection.add(codes=_codes(args.num, seed=0))
        print(
            f"added {args.num:,} codes in {time.perf_counter() - began:.1f} s "
            f"({collection.last_change_bytes:,} bytes)",
            flush=True,
        )
        began = time.perf_counter()
        collection.search(codes=queries[:1], k=args.k)
        print(f"multi-index built by the first search in {time.perf_counter() - began:.2f} s")
        extra = iter(_codes(2 * args.changes + BATCH, seed=2))
        batch = lambda: np.stack([next(extra) for _ in range(BATCH)])  # noqa: E731
        _timed_change(collection, f"add {BATCH:,} codes", lambda: collection.add(codes=batch()))
        victims = lambda: [str(i) for i in rng.choice(collection.ids(), BATCH, replace=False)]  # noqa: E731
        chosen = victims()
        _timed_change(collection, f"remove {BATCH:,} items", lambda: collection.remove(chosen))
        for _ in range(args.changes // BATCH):
            collection.add(codes=batch())
            collection.remove(victims())
        stats = collection.stats()
        print(
            f"after {args.changes:,} more adds and removes: {stats['items']:,} items, "
            f"{stats['segments']} segments, {stats['removed_not_compacted']:,} removed items "
            "not yet compacted",
            flush=True,
        )
        _compare(collection, queries, args.k, args.repeats)
        began = time.perf_counter()
        collection.compact()
        print(f"compacted in {time.perf_counter() - began:.1f} s", flush=True)
        _compare(collection, queries, args.k, args.repeats)


if __name__ == "__main__":
    main()
