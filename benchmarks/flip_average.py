"""Decide on test-time flip averaging (`model.flip_average`) on the validation split only.

  python benchmarks/flip_average.py W0 W1 W2

Each `W` is a run of a config with a validation split (`eval.validation_fraction > 0`) trained
with `--config.train.keep_checkpoints` large enough to keep the checkpoint of every validated
step (e.g. 12 for 1,600 steps validated every 200). Training does not depend on the switch, so
one run serves both sides: every validated checkpoint is scored on the validation split with and
without flip averaging, each side selects its checkpoint as `eval.select=best` would (the best
mean validation mAP over the code lengths, ties to the later step), and the table compares the
two selections per run and on the mean. The query split's mAP at each selected step is printed
for the record only; it decides nothing.
"""

import argparse
import time
import types

import numpy as np

from fdh_jax.data import load_splits
from fdh_jax.evaluation.evaluate import evaluate
from fdh_jax.serving.workdir_encoder import restore_encoder
from fdh_jax.training import feature_cache, selection
from fdh_jax.training.checkpointing import checkpoint_steps
from fdh_jax.training.workdir import read_training_record


def scored_run(workdir: str) -> dict:
    """Validation scores of every validated checkpoint of `workdir`, with and without flip
    averaging; the step each selects and the query mAP there."""
    recorded, _ = read_training_record(workdir)
    config = recorded.copy_and_resolve_references()
    config.model.flip_average = True  # the cache then supplies the mirror images' maps too
    total = int(config.train.num_steps)
    every = int(config.eval.every)
    steps = [s for s in checkpoint_steps(workdir) if s == total or (every > 0 and s % every == 0)]
    expected = sorted({*range(every, total + 1, every), total}) if every > 0 else [total]
    if steps != expected:
        missing = sorted(set(expected) - set(steps))
        raise SystemExit(
            f"{workdir}: no checkpoint of validated steps {missing}; train it with "
            f"--config.train.keep_checkpoints={len(expected)} or more"
        )
    encoder = restore_encoder(workdir, steps[-1], config)
    models = {flip: encoder.model.clone(flip_average=flip) for flip in (False, True)}
    splits = load_splits(config, ("train", "test"))
    backbone = {
        "params": encoder.variables["params"].get("backbone", {}),
        "batch_stats": encoder.variables["batch_stats"].get("backbone", {}),
    }
    database, query = feature_cache.cached_splits(
        config, splits["train"], splits["test"], backbone, encoder.mesh
    )
    _, validation = selection.validation_sources(config, database)
    if validation is None:
        raise SystemExit(f"{workdir}: trained without a validation split")
    scores = {False: {}, True: {}}
    variables = {}
    for step in steps:
        variables[step] = restore_encoder(workdir, step, config).variables
        state = types.SimpleNamespace(**variables[step], ema_params=None)
        for flip, model in models.items():
            scores[flip][step] = selection.validation_scores(
                model, state, validation, config, encoder.mesh
            )
        print(
            f"  step {step}: validation mean {100 * scores[False][step]['mean']:.2f} without, "
            f"{100 * scores[True][step]['mean']:.2f} with flip averaging",
            flush=True,
        )
    run = {}
    for flip, model in models.items():
        best = max(steps, key=lambda s, f=flip: (scores[f][s]["mean"], s))
        evaluation = evaluate(model, variables[best], query, database, config, encoder.mesh)
        run[flip] = {
            "step": best,
            "validation": scores[flip][best],
            "query": evaluation.results["mAP"],
        }
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+")
    args = parser.parse_args()
    runs = []
    for workdir in args.workdirs:
        start = time.perf_counter()
        print(f"{workdir}:", flush=True)
        runs.append(scored_run(workdir))
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    bits = [k for k in runs[0][False]["query"]]
    print(
        "\n| run | flip averaging | selected step | validation mean | query mAP x100, "
        + " / ".join(bits)
        + " (record only) |"
    )
    print("|---|---|---|---|---|")
    for workdir, run in zip(args.workdirs, runs, strict=True):
        for flip in (False, True):
            side = run[flip]
            query = " / ".join(f"{100 * side['query'][k]:.2f}" for k in bits)
            print(
                f"| {workdir} | {'on' if flip else 'off'} | {side['step']} | "
                f"{100 * side['validation']['mean']:.2f} | {query} |"
            )
    gains = np.array(
        [100 * (r[True]["validation"]["mean"] - r[False]["validation"]["mean"]) for r in runs]
    )
    means = {
        flip: " / ".join(f"{100 * np.mean([r[flip]['query'][k] for r in runs]):.2f}" for k in bits)
        for flip in (False, True)
    }
    print(
        f"\nvalidation gain of flip averaging: mean {gains.mean():+.2f} "
        f"(per run: {', '.join(f'{g:+.2f}' for g in gains)}; ahead on {(gains > 0).sum()} of "
        f"{len(gains)})"
    )
    print(f"query mAP means (record only): off {means[False]}, on {means[True]}")


if __name__ == "__main__":
    main()
