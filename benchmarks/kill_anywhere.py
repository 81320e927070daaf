"""Kill a short training run at random moments and check that every restart ends exactly.

  python benchmarks/kill_anywhere.py --n=20 --seed=0

Runs a small demo configuration once without interruption (the reference), then `--n` times:
starts the same command in a fresh workdir, SIGKILLs it at a moment drawn uniformly over the
reference's wall time (seeded: start-up, a train step, a checkpoint being written, the
evaluation or `results.json` being written are all possible), runs the same command again to
the end, and compares its `results.json` mAP with the reference's. Prints one line per trial and
how many of the `n` ended with exactly the uninterrupted mAP (bit for bit), and whether each
workdir's files were valid after the kill (the results.json of a finished run is never half
written). Needs only the CPU; about a minute per trial on 2 cores.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FLAGS = [  # the demo, shrunk: 8 classes, 24 steps, a checkpoint every 4
    "--config=configs/demo.py",
    "--config.data.synthetic.num_classes=8",
    "--config.data.synthetic.train_per_class=16",
    "--config.data.synthetic.test_per_class=8",
    "--config.model.width=8",
    "--config.model.node_dim=32",
    "--config.train.classes_per_batch=8",
    "--config.train.images_per_class=2",
    "--config.train.batch_size=16",
    "--config.train.num_steps=24",
    "--config.train.warmup_steps=4",
    "--config.train.checkpoint_every=4",
    "--config.train.log_every=4",
    "--config.eval.batch_size=32",
]


def _start(workdir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "fdh_jax.main", f"--workdir={workdir}", *FLAGS]
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _finish(workdir: Path) -> dict:
    process = _start(workdir)
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"run in {workdir} failed ({process.returncode}): {stderr[-2000:]}")
    return json.loads((workdir / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="number of killed runs")
    parser.add_argument("--seed", type=int, default=0, help="fixes the kill moments")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {args.n} trials", flush=True)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="kill_anywhere-") as tmp:
        start = time.perf_counter()
        reference = _finish(Path(tmp) / "reference")
        wall = time.perf_counter() - start
        print(f"reference: {wall:.1f} s, mAP {reference['mAP']}", flush=True)
        exact = 0
        for trial in range(args.n):
            workdir = Path(tmp) / f"trial_{trial}"
            moment = float(rng.uniform(0.0, wall))
            process = _start(workdir)
            try:
                process.wait(timeout=moment)
                when = "after it finished"
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()
                when = "killed"
            steps = sorted(
                int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()
            )
            results_file = workdir / "results.json"
            if results_file.exists():  # if present after a kill, it must be whole
                json.loads(results_file.read_text())
            results = _finish(workdir)
            same = results["mAP"] == reference["mAP"] and results["steps"] == reference["steps"]
            exact += same
            print(
                f"trial {trial}: {when} at {moment:.1f} s (checkpoints {steps or 'none'}), "
                f"restart {'matches' if same else 'DIFFERS: ' + str(results['mAP'])}",
                flush=True,
            )
    print(f"{exact} of {args.n} restarts ended with exactly the uninterrupted mAP")
    sys.exit(0 if exact == args.n else 1)


if __name__ == "__main__":
    main()
