"""Exact top-k Hamming search: ours vs `faiss.IndexBinaryFlat` (all cores), fair and checked.

Modes (all print the load average and thread counts first, interleave the methods, report the
median of --repeats >= 5 runs, and say NOT COMPARABLE when the 1-minute load average before the
run exceeds 0.5 per core):

  scan   (default) `hamming_topk`, our exact linear scan, vs faiss. 1,000 queries x 1,000,000
         uniform random 64-bit codes, k = 100. Distances must equal faiss's for every query;
         indices must equal a NumPy brute force ordered by (distance, index) on a query subset.
         Last line: `ours / faiss: <ratio>x (median of 5; distances identical)`
         (BENCHMARKS.md records the measured ratios).
  mih    `MultiIndexHashing` on 10,000,000 class-clustered 64-bit codes (benchmarks/
         clustered_codes.py: 1,000 classes, 10-20% of bits flipped), 1,000 queries, k = 100, vs
         faiss and our linear scan. MIH must equal the scan on every query (distances and
         indices), the scan equal brute force on a subset, the distances faiss's. States the
         table memory. Last line: `faiss / MIH per query: <ratio>x (median of 5; ...)`.
  sweep  MIH vs linear scan over flip rate, code length and database size (the break-even).

  python benchmarks/search.py
  python benchmarks/search.py --bits 128 --database 100000
  python benchmarks/search.py --mode mih
  python benchmarks/search.py --mode sweep --sizes 100000 1000000
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fair import interleaved, machine_report, summary  # noqa: E402
from clustered_codes import clustered_codes  # noqa: E402

from fdh_jax.search.multi_index import MultiIndexHashing
from fdh_jax.search.scan import hamming_topk


def make_codes(args: argparse.Namespace, num_db: int, bits: int) -> tuple[np.ndarray, ...]:
    """-> (database, queries) packed uint8, uniform random bits or class-clustered."""
    if args.data == "uniform":
        rng = np.random.default_rng(args.seed)
        db = rng.integers(0, 256, (num_db, -(-bits // 8)), dtype=np.uint8)
        queries = rng.integers(0, 256, (args.queries, -(-bits // 8)), dtype=np.uint8)
        if bits % 8:  # zero the padding bits, as pack_codes does
            pad = np.uint8((0xFF << (8 - bits % 8)) & 0xFF)
            db[:, -1] &= pad
            queries[:, -1] &= pad
        return db, queries
    flip = tuple(args.flip)
    db, _ = clustered_codes(num_db, bits, classes=args.classes, flip=flip, seed=args.seed)
    queries, _ = clustered_codes(
        args.queries, bits, classes=args.classes, flip=flip, seed=args.seed + 1
    )
    return db, queries


def brute_force_rows(queries: np.ndarray, db: np.ndarray, k: int, rows: int) -> tuple:
    """Independent reference for the first `rows` queries: NumPy popcounts over all codes, then
    the k smallest by (distance, index). -> (distances, indices) `[rows, k]`."""
    db_bits = np.unpackbits(db, axis=1)
    out_d, out_i = [], []
    for q in np.unpackbits(queries[:rows], axis=1):
        distances = np.count_nonzero(db_bits != q, axis=1)
        key = distances.astype(np.int64) * len(db) + np.arange(len(db))
        best = np.argpartition(key, k - 1)[:k]
        best = best[np.argsort(key[best])]
        out_d.append(distances[best])
        out_i.append(best)
    return np.array(out_d), np.array(out_i)


def faiss_index(db: np.ndarray):  # noqa: ANN201 (faiss.IndexBinaryFlat)
    """faiss's exact binary index over packed codes; it runs on all cores by default."""
    import faiss

    index = faiss.IndexBinaryFlat(8 * db.shape[1])  # faiss counts whole bytes; padding is 0
    index.add(db)
    return index


def run_scan(args: argparse.Namespace) -> None:
    import faiss

    verdict = machine_report(faiss)
    db, queries = make_codes(args, args.database, args.bits)
    print(
        f"{args.queries} queries x {args.database} {args.data} database, {args.bits} bits, "
        f"top-{args.k}, {args.repeats} interleaved runs"
    )
    index = faiss_index(db)
    hamming_topk(queries[:8], db, args.k)  # compile (or load the cached kernel)
    index.search(queries[:8], args.k)
    times, results = interleaved(
        {
            "faiss IndexBinaryFlat": lambda: index.search(queries, args.k),
            "ours hamming_topk": lambda: hamming_topk(queries, db, args.k),
        },
        args.repeats,
    )
    for name, t in times.items():
        print(summary(name, t))
    faiss_distances, _ = results["faiss IndexBinaryFlat"]
    distances, indices = results["ours hamming_topk"]
    assert np.array_equal(distances, faiss_distances), "distances differ from faiss"
    rows = min(args.check_rows, args.queries)
    expected = brute_force_rows(queries, db, args.k, rows)
    assert np.array_equal(distances[:rows], expected[0]), "ours differs from brute force"
    assert np.array_equal(indices[:rows], expected[1]), "ours differs from brute force"
    print(
        f"checks: distances identical to faiss on all {args.queries} queries; ours identical to a "
        f"NumPy brute force (ties by index) on {rows} queries"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    ratio = statistics.median(times["ours hamming_topk"]) / statistics.median(
        times["faiss IndexBinaryFlat"]
    )
    note = f"; {verdict}" if verdict else ""
    print(f"ours / faiss: {ratio:.2f}x (median of {args.repeats}; distances identical{note})")


def run_mih(args: argparse.Namespace) -> None:
    import faiss

    verdict = machine_report(faiss)
    start = time.perf_counter()
    db, queries = make_codes(args, args.database, args.bits)
    print(
        f"{args.queries} queries x {args.database} {args.data} database (flip {args.flip}, "
        f"{args.classes} classes), {args.bits} bits, top-{args.k}; generated in "
        f"{time.perf_counter() - start:.1f} s"
    )
    start = time.perf_counter()
    mih = MultiIndexHashing(db, num_tables=args.tables)
    build = time.perf_counter() - start
    print(
        f"MultiIndexHashing: {mih.num_tables} tables of {np.diff(mih.bounds).tolist()} bits "
        f"(dense offsets: {mih.dense.tolist()}), built in {build:.1f} s; memory: tables "
        f"{mih.table_bytes / 2**20:.0f} MiB + codes {mih.code_bytes / 2**20:.0f} MiB"
    )
    index = faiss_index(db)
    mih.search(queries[:8], args.k)  # compile (or load the cached kernels)
    hamming_topk(queries[:8], db, args.k)
    methods = {
        "faiss IndexBinaryFlat": lambda: index.search(queries, args.k),
        "ours linear scan": lambda: hamming_topk(queries, db, args.k),
        "ours MultiIndexHashing": lambda: mih.search(queries, args.k),
    }
    times, results = interleaved(methods, args.repeats)
    for name, t in times.items():
        print(summary(name, t, per=args.queries))
    print(f"MIH search: {mih.last_search_stats}")
    scan, probe = results["ours linear scan"], results["ours MultiIndexHashing"]
    assert np.array_equal(probe[0], scan[0]) and np.array_equal(probe[1], scan[1]), "MIH != scan"
    assert np.array_equal(scan[0], results["faiss IndexBinaryFlat"][0]), "distances != faiss"
    rows = min(args.check_rows, args.queries)
    expected = brute_force_rows(queries, db, args.k, rows)
    assert np.array_equal(scan[0][:rows], expected[0]) and np.array_equal(
        scan[1][:rows], expected[1]
    ), "scan != brute force"
    print(
        f"checks: MIH identical to the linear scan (distances and indices) on all "
        f"{args.queries} queries; the scan identical to a NumPy brute force on {rows} queries; "
        "distances identical to faiss on all queries"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    medians = {name: statistics.median(t) for name, t in times.items()}
    speedup = medians["faiss IndexBinaryFlat"] / medians["ours MultiIndexHashing"]
    over_scan = medians["ours linear scan"] / medians["ours MultiIndexHashing"]
    note = f"; {verdict}" if verdict else ""
    print(f"linear scan / MIH per query: {over_scan:.1f}x")
    print(
        f"faiss / MIH per query: {speedup:.1f}x (median of {args.repeats}; "
        f"results identical to brute force{note})"
    )


def run_sweep(args: argparse.Namespace) -> None:
    """MIH (as shipped: per-query budget, pilot) vs the linear scan, same run, over the data."""
    verdict = machine_report()
    flips = {"5-10%": (0.05, 0.1), "10-20%": (0.1, 0.2), "20-30%": (0.2, 0.3)}
    print(
        f"{args.queries} queries, k = {args.k}, {args.classes} classes, median of "
        f"{args.repeats} interleaved runs; 'probed' = queries answered by the tables"
    )
    print(
        f"{'N':>9} {'bits':>4} {'flip':>7} {'m':>2} {'build s':>7} {'scan ms/q':>9} "
        f"{'MIH ms/q':>9} {'scan/MIH':>8} {'probed':>6} {'radius':>6} {'MiB':>6}"
    )
    for num_db in args.sizes:
        for bits in args.sweep_bits:
            for flip_name, flip in [*flips.items(), ("uniform", None)]:
                args.data, args.flip = ("uniform", args.flip) if flip is None else ("c", flip)
                db, queries = make_codes(args, num_db, bits)
                start = time.perf_counter()
                mih = MultiIndexHashing(db)
                build = time.perf_counter() - start
                mih.search(queries[:8], args.k)
                hamming_topk(queries[:8], db, args.k)
                times, results = interleaved(
                    {
                        "scan": lambda db=db, q=queries: hamming_topk(q, db, args.k),
                        "mih": lambda mih=mih, q=queries: mih.search(q, args.k),
                    },
                    args.repeats,
                )
                assert all(
                    np.array_equal(a, b)
                    for a, b in zip(results["scan"], results["mih"], strict=True)
                ), "MIH != scan"
                stats = mih.last_search_stats
                scan_ms = 1e3 * statistics.median(times["scan"]) / args.queries
                mih_ms = 1e3 * statistics.median(times["mih"]) / args.queries
                radius = stats["median_certified_radius"]
                print(
                    f"{num_db:>9} {bits:>4} {flip_name:>7} {mih.num_tables:>2} {build:>7.2f} "
                    f"{scan_ms:>9.3f} {mih_ms:>9.3f} {scan_ms / mih_ms:>8.2f} "
                    f"{stats['answered_by_probing'] / args.queries:>6.0%} "
                    f"{'-' if radius is None else f'{radius:.0f}':>6} "
                    f"{(mih.table_bytes + mih.code_bytes) / 2**20:>6.0f}",
                    flush=True,
                )
    if verdict:
        print(verdict)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("scan", "mih", "sweep"), default="scan")
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--database", type=int, help="default 1,000,000 (scan), 10,000,000 (mih)")
    parser.add_argument("--queries", type=int, help="default 1,000 (scan, mih), 200 (sweep)")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", choices=("uniform", "clustered"), help="default: by mode")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--flip", type=float, nargs=2, default=(0.1, 0.2), metavar=("LO", "HI"))
    parser.add_argument("--tables", type=int, help="MIH tables m (default: from N and K)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-rows", type=int, default=20, help="queries checked by NumPy")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--sweep-bits", type=int, nargs="+", default=[32, 64, 128])
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5: we report medians of at least 5 runs")
    if args.mode == "scan":
        args.database = args.database or 1_000_000
        args.queries = args.queries or 1000
        args.data = args.data or "uniform"
        run_scan(args)
    elif args.mode == "mih":
        args.database = args.database or 10_000_000
        args.queries = args.queries or 1000
        args.data = args.data or "clustered"
        run_mih(args)
    else:
        args.queries = args.queries or 200
        run_sweep(args)


if __name__ == "__main__":
    main()
