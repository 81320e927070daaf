"""Why trained codes do not carry to new species: a probe on frozen features and linear heads.

  python benchmarks/transfer_probe.py                  # cub100's first 50 species, 15 held out
  python benchmarks/transfer_probe.py --split_seed=1   # another 15 held out

Issue 34 asks for hash codes trained with labels that score, on species never trained on, at
least as well as PCA-ITQ fitted on the trained species. This probe takes the deep descriptor out
of the question: the features are the frozen MobileNetV2's mask-pooled C5 (photo and mirror
averaged, L2: the baselines' equal terms, `feature_baselines.py`), and the hash head is one
linear layer + tanh per code length, trained on them with the recipe's code losses (the library's
`proxy_loss` at scale 16 and margin 0.3 with learnable proxies, `proxy_uniformity`,
`quantization_loss`, `bit_balance_loss`, with the weights of `--config`: the recipe's).

Of the first `--seen` species (those `unseen_classes.py` trains on; the other 50 are never
touched), `--held_out_fraction` (15 of 50) are held out as `eval.validation_by=classes` holds
them out at `eval.validation_seed=--split_seed` (`fdh_jax.data.splits.class_validation_split`):
half of each one's database images query the other half. The others train the head on 90% of
each species' database images, and the other 10% (`validation_split`, as `eval.validation_by`
= images) query the 90% ("seen"). Rows, mAP@all x100:
- PCA-ITQ fitted on the training species' images;
- the head trained towards the recipe's proxies (well separated codes, `models/proxies.py`);
- towards proxies placed by the features: the PCA-ITQ codes of each training species' mean
  feature, as they are (similar species share codes) and spread by the proxies' bit-flip search
  (`spread_codes`) from there;
- blends: sign(head's continuous code + alpha * the PCA-ITQ projection), both scaled to the
  same spread over the training images;
- the recipe's head trained with the cosine form of the neighbourhood term
  (`loss.neighbourhood_form=cosine`, `loss.neighbourhood_pairs=other_classes`): the codes'
  cosines between images of two species pulled towards the centred features' cosines;
- a bit share: half the bits from a head of half the length, half from PCA-ITQ.
"""

import argparse
import time
from pathlib import Path

import feature_baselines as fb
import jax
import jax.numpy as jnp
import numpy as np
import optax
from feature_baselines import SHARED

from fdh_jax.config_files import load_config
from fdh_jax.data.sources import make_source
from fdh_jax.data.splits import class_validation_split, validation_split
from fdh_jax.evaluation.metrics import mean_average_precision
from fdh_jax.models.proxies import min_hamming_distance, separated_binary_codes, spread_codes
from fdh_jax.search.adaptation import binarise
from fdh_jax.training import losses

ALPHAS = (0.1, 0.2, 0.35, 0.5, 1.0)
SIMILARITY_WEIGHTS = (3.0, 10.0, 30.0)


def probe_split(species: np.ndarray, seen: int, fraction: float, seed: int):
    """Database indices `(train, seen_queries, held_queries, held_database)`: the library's
    class-disjoint validation (`class_validation_split`) of the first `seen` species, then its
    per-species 10% validation (`validation_split`) of the species left for training."""
    names = np.array(sorted(set(species))[:seen])
    members = np.flatnonzero(np.isin(species, names))
    labels = np.searchsorted(names, species[members])
    train, held_queries, held_database = class_validation_split(labels, fraction, seed)
    fit, seen_queries = validation_split(labels[train], 0.1, seed)
    return tuple(
        members[index] for index in (train[fit], train[seen_queries], held_queries, held_database)
    )


def train_head(
    features, labels, proxies, loss_config, steps: int, seed: int, similarity: float = 0.0
):
    """A linear + tanh head trained with the recipe's code losses, plus `similarity` x the
    cosine form of the neighbourhood term over pairs of two classes (`losses.similarity_loss`,
    teacher: the features); returns `x -> [N, K]` floats."""
    num_classes, bits = proxies.shape
    params = {
        "w": jax.random.normal(jax.random.key(seed), (features.shape[1], bits))
        / np.sqrt(features.shape[1]),
        "b": jnp.zeros(bits),
        "proxies": jnp.asarray(proxies, jnp.float32),
    }

    def forward(params, x):
        return jnp.tanh(x @ params["w"] + params["b"])

    def loss(params, x, y):
        codes = forward(params, x)
        c = loss_config
        return (
            losses.proxy_loss(
                codes, params["proxies"], y, scale=c.proxy_scale, margin=c.proxy_margin
            )
            + c.uniformity_weight * losses.proxy_uniformity(params["proxies"], t=c.uniformity_t)
            + c.quantization_weight * losses.quantization_loss(codes)
            + c.balance_weight * losses.bit_balance_loss(codes)
            + similarity * losses.similarity_loss(codes, x, y)
        )

    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, steps // 10, steps)
    optimizer = optax.adamw(schedule, weight_decay=1e-4)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    features = jnp.asarray(features, jnp.float32)
    for _ in range(steps):
        batch = rng.choice(len(features), 64, replace=False)
        params, state = step(params, state, features[batch], labels[batch])
    return lambda x: np.asarray(forward(params, jnp.asarray(x, jnp.float32)), np.float64)


def rows_for_length(data: dict, bits: int, loss_config, args) -> dict[str, tuple[float, float]]:
    """`{row name: (held-out mAP, seen mAP)}` at one code length."""
    x, y = data["train"]
    itq = fb.fit_hash("PCA-ITQ", x, y, bits, args.seed)
    spread = ((x - itq.mean) @ itq.projection).std(0)

    def itq_continuous(features):
        return (features - itq.mean) @ itq.projection / spread

    def score(encode) -> tuple[float, float]:
        return tuple(
            100 * mean_average_precision(binarise(encode(q)), binarise(encode(d)), ql, dl)
            for (q, ql), (d, dl) in (
                (data["held_queries"], data["held_database"]),
                (data["seen_queries"], data["train"]),
            )
        )

    num_classes = int(y.max()) + 1
    means = np.stack([x[y == c].mean(0) for c in range(num_classes)])
    placed = itq(means)
    proxies = {
        "recipe's proxies (separated)": separated_binary_codes(num_classes, bits, bits),
        "proxies placed by the features": placed,
        "placed, then spread": spread_codes(placed, np.random.default_rng(bits)),
    }
    rows = {"PCA-ITQ fitted on the training species": score(itq_continuous)}
    heads = {}
    for name, codes in proxies.items():
        heads[name] = train_head(x, y, codes, loss_config, args.steps, args.seed)
        rows[f"head, {name}"] = score(heads[name])
        rows[f"(min. Hamming distance of the {name})"] = (min_hamming_distance(codes),) * 2
    recipe = heads["recipe's proxies (separated)"]
    head_spread = recipe(x).std()  # the head's codes are not at +-1: cosine losses ignore scale
    for alpha in ALPHAS:
        rows[f"blend, recipe's head + {alpha} x PCA-ITQ"] = score(
            lambda f, alpha=alpha: recipe(f) + alpha * head_spread * itq_continuous(f)
        )
    for weight in SIMILARITY_WEIGHTS:
        head = train_head(
            x,
            y,
            proxies["recipe's proxies (separated)"],
            loss_config,
            args.steps,
            args.seed,
            similarity=weight,
        )
        rows[f"head + {weight} x cosine term, other classes' pairs"] = score(head)
    half = bits // 2
    short = train_head(
        x, y, separated_binary_codes(num_classes, half, half), loss_config, args.steps, args.seed
    )
    short_itq = fb.fit_hash("PCA-ITQ", x, y, bits - half, args.seed)
    rows["bit share: a head of half the bits, PCA-ITQ for the rest"] = score(
        lambda f: np.concatenate([short(f), (f - short_itq.mean) @ short_itq.projection], 1)
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "cub100"))
    parser.add_argument("--seen", type=int, default=50)
    parser.add_argument("--held_out_fraction", type=float, default=0.3)
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--bits", default="12,24,32,48")
    fb.add_feature_arguments(parser)  # --config (the loss weights too), --seed, --cache_dir
    args = parser.parse_args()
    fb.resolve_model_settings(args)
    start = time.perf_counter()
    source = make_source("folder", args.data, "train")
    variant = fb.Variant(mirror=True, pooling="mask", l2=True)
    features = fb.variant_features(fb.cached_pools(source, args), variant)
    species = np.array([Path(path).parent.name for path in source.paths])
    parts = probe_split(species, args.seen, args.held_out_fraction, args.split_seed)
    labels = np.unique(species, return_inverse=True)[1]
    data = {}
    for name, index in zip(
        ("train", "seen_queries", "held_queries", "held_database"), parts, strict=True
    ):
        data[name] = (features[index], labels[index])
    trained = np.unique(data["train"][1])  # numbered 0 .. C-1 for the proxies
    for name in ("train", "seen_queries"):
        data[name] = (data[name][0], np.searchsorted(trained, data[name][1]))
    loss_config = load_config(args.config).loss
    print(
        f"{len(parts[0])} training images of {len(np.unique(species[parts[0]]))} species, "
        f"{len(parts[1])} seen queries; {len(np.unique(species[parts[2]]))} held-out species: "
        f"{len(parts[2])} queries, {len(parts[3])} database images (split seed {args.split_seed})"
    )
    bits = [int(b) for b in args.bits.split(",")]
    table = {b: rows_for_length(data, b, loss_config, args) for b in bits}
    lengths = " / ".join(map(str, bits))
    print(f"\nmAP@all x100 at {lengths} bits\n\n| codes | held-out species | seen species |")
    print("|---|---|---|")
    for row in table[bits[0]]:
        if row.startswith("(min."):
            print(f"| {row} | {' / '.join(str(table[b][row][0]) for b in bits)} | |")
            continue
        held = " / ".join(f"{table[b][row][0]:.2f}" for b in bits)
        seen = " / ".join(f"{table[b][row][1]:.2f}" for b in bits)
        print(f"| {row} | {held} | {seen} |")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
