"""Near-duplicates: every pair of codes within a Hamming radius, and the groups they link.

`pairs_within_scan` compares all pairs a block at a time (small collections, or radii whose
multi-index probing would cost more); `MultiIndexHashing.pairs_within` finds the same pairs by
range search through its tables, probing per item only the buckets within `radius // m` bits of
each substring (`MultiIndexHashing.range_probe_pays` says when that beats the scan).
`connected_groups` turns the pairs into groups: the connected components of the graph that links
each pair.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

_PAIR_BLOCK_ELEMENTS = 1 << 24  # word comparisons per block of `pairs_within_scan`


def pairs_within_scan(words: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j of `words: [N, W]` uint64 codes within Hamming distance `radius`, by
    comparing every pair a block at a time -> (first, second) int64, sorted by (first, second)."""
    num = len(words)
    block = max(1, _PAIR_BLOCK_ELEMENTS // max(1, num * words.shape[1]))
    firsts, seconds = [], []
    for start in range(0, num, block):
        stop = min(num, start + block)
        distances = np.bitwise_count(words[start:stop, None, :] ^ words[None, :, :]).sum(-1)
        rows, columns = np.nonzero(distances <= radius)
        rows = rows + start
        upper = columns > rows
        firsts.append(rows[upper])
        seconds.append(columns[upper])
    return (
        np.concatenate(firsts).astype(np.int64) if firsts else np.zeros(0, np.int64),
        np.concatenate(seconds).astype(np.int64) if seconds else np.zeros(0, np.int64),
    )


def connected_groups(num: int, first: np.ndarray, second: np.ndarray) -> list[np.ndarray]:
    """The connected components with two or more of `num` nodes linked by the pairs
    (`first[i]`, `second[i]`): each ascending, ordered by their smallest node."""
    if len(first) == 0:
        return []
    graph = coo_matrix((np.ones(len(first), np.int8), (first, second)), shape=(num, num))
    _, component = connected_components(graph, directed=False)
    order = np.argsort(component, kind="stable")
    boundaries = np.flatnonzero(np.diff(component[order])) + 1
    groups = [g for g in np.split(order, boundaries) if len(g) > 1]
    return sorted(groups, key=lambda g: int(g[0]))
