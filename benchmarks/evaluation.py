"""mAP@all at NABirds size: ours vs the per-query sort loop as the peers write it.

NABirds protocol (docs/design.md, "Evaluation protocol"): 24,633 queries x 23,929 database
codes, 555 classes; 48 bits.
Codes are class centres with ~20% of bits flipped, so relevant items are near and ties abound,
as with trained codes. The peer loop (Hamming distance by matmul, np.argsort per query, AP from
the sorted relevance vector) runs on a subset of queries and is extrapolated; both are compared on
that subset. Run: python benchmarks/evaluation.py [--subset 500] [--repeats 3]
"""

import argparse
import os
import time

import numpy as np

from fdh_jax.evaluation.metrics import mean_average_precision

NUM_QUERY, NUM_DB, BITS, NUM_CLASSES = 24_633, 23_929, 48, 555


def make_codes(rng: np.random.Generator, labels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    flips = rng.random((len(labels), centres.shape[1])) < 0.2
    return np.where(flips, -centres[labels], centres[labels]).astype(np.int8)


def peer_loop_map(query_codes, db_codes, query_labels, db_labels, kind="stable") -> float:
    """The per-query loop of DPSH / ADSH / SEMICON style evaluations, in NumPy."""
    db = db_codes.astype(np.float32)
    aps = []
    for i in range(len(query_codes)):
        relevant = (db_labels == query_labels[i]).astype(np.float32)
        distance = 0.5 * (db.shape[1] - db @ query_codes[i].astype(np.float32))
        relevant = relevant[np.argsort(distance, kind=kind)]
        count = int(relevant.sum())
        if count == 0:
            aps.append(0.0)
            continue
        positions = np.flatnonzero(relevant) + 1.0
        aps.append(float((np.arange(1, count + 1) / positions).mean()))
    return float(np.mean(aps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=500, help="queries for the peer loop")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centres = np.where(rng.random((NUM_CLASSES, BITS)) < 0.5, -1, 1).astype(np.int8)
    query_labels = rng.integers(0, NUM_CLASSES, NUM_QUERY)
    db_labels = rng.integers(0, NUM_CLASSES, NUM_DB)
    query_codes = make_codes(rng, query_labels, centres)
    db_codes = make_codes(rng, db_labels, centres)
    print(f"machine: {os.cpu_count()} CPU cores; load average {os.getloadavg()}")
    print(f"{NUM_QUERY} queries x {NUM_DB} database, {BITS} bits, {NUM_CLASSES} classes")

    mean_average_precision(query_codes[:64], db_codes, query_labels[:64], db_labels)  # compile
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = mean_average_precision(query_codes, db_codes, query_labels, db_labels)
        times.append(time.perf_counter() - start)
    print(
        f"ours   mAP@all = {ours:.6f}  time {min(times):.2f} s (best of {args.repeats}; all "
        + ", ".join(f"{t:.2f}" for t in times)
        + ")"
    )

    subset = np.random.default_rng(1).choice(NUM_QUERY, args.subset, replace=False)
    start = time.perf_counter()
    peer = peer_loop_map(query_codes[subset], db_codes, query_labels[subset], db_labels)
    peer_time = time.perf_counter() - start
    ours_subset = mean_average_precision(
        query_codes[subset], db_codes, query_labels[subset], db_labels
    )
    extrapolated = peer_time * NUM_QUERY / args.subset
    print(
        f"peer loop on {args.subset} queries: {peer_time:.2f} s -> extrapolated to "
        f"{NUM_QUERY} queries: {extrapolated:.1f} s (not run in full)"
    )
    print(
        f"subset mAP: ours {ours_subset:.10f}  peer loop (stable argsort) {peer:.10f}  "
        f"|diff| {abs(ours_subset - peer):.1e}"
    )
    if abs(ours_subset - peer) > 1e-9:
        raise SystemExit("MISMATCH between ours and the peer loop")
    print(f"speed-up vs the peer loop: {extrapolated / min(times):.0f}x")


if __name__ == "__main__":
    main()
