"""Class proxies for the proxy loss, initialised as well-separated binary codes.

With `C` classes and `K` bits, proxies start as Hadamard rows (and their negations) when `K` is a
power of two and there are enough rows: every pair is then at Hamming distance >= K/2. Otherwise a
seeded local search maximises the minimum pairwise Hamming distance. Starting from separated
corners of the hypercube is what makes the codes spread uniformly (as with CSQ's hash centres);
learnable proxies (HyP2) can then move, kept apart by the uniformity term.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import scipy.linalg


def _hadamard_codes(num_classes: int, bits: int) -> np.ndarray | None:
    if bits & (bits - 1) or num_classes > 2 * bits - 2:
        return None
    rows = scipy.linalg.hadamard(bits)[1:]  # row 0 is all ones: a degenerate, unbalanced code
    return np.concatenate([rows, -rows])[:num_classes].astype(np.int8)


def _min_distance_search(num_classes: int, bits: int, seed: int, sweeps: int = 30) -> np.ndarray:
    """Greedy bit flips from seeded random codes (`spread_codes`)."""
    rng = np.random.default_rng(seed)
    codes = rng.choice(np.array([-1, 1], np.int8), size=(num_classes, bits))
    return spread_codes(codes, rng, sweeps)


def spread_codes(codes: np.ndarray, rng: np.random.Generator, sweeps: int = 30) -> np.ndarray:
    """Greedy bit flips of `[C, K]` {-1, +1} codes that raise each code's distance to its
    nearest other code (visiting codes in `rng`'s order), until no flip helps or `sweeps` passes;
    returns the new codes (int8)."""
    codes = np.array(codes, np.int8)
    num_classes, bits = codes.shape
    if num_classes == 1:
        return codes
    for _ in range(sweeps):
        changed = False
        for i in rng.permutation(num_classes):
            others = np.delete(codes, i, axis=0).astype(np.int32)
            # Hamming distance of code i (with bit b flipped, for every b) to every other code.
            base = (bits - others @ codes[i].astype(np.int32)) // 2  # [C-1]
            differs = others != codes[i]  # [C-1, K]: flipping b changes distance by -1 / +1
            flipped = base[:, None] + np.where(differs, -1, 1)  # [C-1, K]
            current = (base.min(), -(base == base.min()).sum())
            candidates = [
                (flipped[:, b].min(), -(flipped[:, b] == flipped[:, b].min()).sum())
                for b in range(bits)
            ]
            best = max(range(bits), key=lambda b: candidates[b])
            if candidates[best] > current:
                codes[i, best] = -codes[i, best]
                changed = True
        if not changed:
            break
    return codes


@functools.lru_cache(maxsize=64)
def _separated_codes(num_classes: int, bits: int, seed: int) -> np.ndarray:
    codes = _hadamard_codes(num_classes, bits)
    codes = codes if codes is not None else _min_distance_search(num_classes, bits, seed)
    codes.flags.writeable = False  # cached: shared by every caller
    return codes


def separated_binary_codes(num_classes: int, bits: int, seed: int = 0) -> np.ndarray:
    """`[num_classes, bits]` int8 codes in {-1, +1} with a large minimum Hamming distance.

    Deterministic in its arguments; computed once per process (a model is initialised several
    times: abstract shapes, the jitted init, restores).
    """
    return _separated_codes(num_classes, bits, seed).copy()


def min_hamming_distance(codes: np.ndarray) -> int:
    """Smallest Hamming distance between two different rows of `[N, K]` {-1, +1} codes."""
    codes = codes.astype(np.int32)
    distance = (codes.shape[1] - codes @ codes.T) // 2
    np.fill_diagonal(distance, codes.shape[1] + 1)
    return int(distance.min())


class HashProxies(nn.Module):
    """One `[num_classes, K]` proxy matrix per code length, as parameters `proxies_<K>`."""

    num_classes: int
    bits: tuple[int, ...]
    seed: int = 0

    @nn.compact
    def __call__(self) -> dict[str, jnp.ndarray]:
        proxies = {}
        for k in self.bits:
            # The code search (about a second for 200 classes) runs only when the parameter is
            # initialised, never when a step or an encoder is traced.
            def init(_, k=k):
                codes = separated_binary_codes(self.num_classes, k, self.seed + k)
                return jnp.asarray(codes, jnp.float32)

            proxies[str(k)] = self.param(f"proxies_{k}", init)
        return proxies
