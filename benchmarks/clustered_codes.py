"""Class-clustered binary codes, as trained hash codes are: the search benchmarks' realistic data.

Each code is one of `classes` random centre codes with every bit flipped independently with
probability p, p drawn per code uniformly from [flip_low, flip_high] (default 10% to 20%); queries
are drawn the same way from the same centres. Uniform random bits (`flip = 0.5`) have no
neighbourhood structure, and on them no sub-linear exact method can beat a linear scan.

    python benchmarks/clustered_codes.py --num 10000000 --bits 64 --out /tmp/db.npy
"""

import argparse

import numpy as np

_CHUNK = 1 << 20  # codes generated per step: bounds the temporary [chunk, bits] uint16 noise


def clustered_codes(
    num_codes: int,
    bits: int,
    *,
    classes: int = 1000,
    flip: tuple[float, float] = (0.1, 0.2),
    seed: int = 0,
    centres_seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """-> (codes `[num_codes, ceil(bits/8)]` packed uint8 as `pack_codes` packs them, labels
    `[num_codes]` int64). Seeded: `centres_seed` fixes the class centres (share it between a
    database and its queries), `seed` the class draws and the flips."""
    centres = np.random.default_rng(centres_seed).integers(0, 2, (classes, bits), dtype=np.uint8)
    rng = np.random.default_rng([seed, 1])
    labels = rng.integers(0, classes, num_codes)
    codes = np.empty((num_codes, -(-bits // 8)), np.uint8)
    for start in range(0, num_codes, _CHUNK):
        stop = min(num_codes, start + _CHUNK)
        rate = rng.uniform(flip[0], flip[1], stop - start)
        threshold = np.round(rate * 65536).astype(np.uint32)[:, None]
        flips = rng.integers(0, 65536, (stop - start, bits), dtype=np.uint16) < threshold
        codes[start:stop] = np.packbits(centres[labels[start:stop]] ^ flips, axis=1)
    return codes, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1_000_000)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--flip", type=float, nargs=2, default=(0.1, 0.2))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="where to write the packed codes (.npy)")
    args = parser.parse_args()
    codes, _ = clustered_codes(
        args.num, args.bits, classes=args.classes, flip=tuple(args.flip), seed=args.seed
    )
    np.save(args.out, codes)
    print(f"wrote {codes.shape[0]} packed {args.bits}-bit codes to {args.out}")


if __name__ == "__main__":
    main()
