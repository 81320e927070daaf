"""One process of a 2-process x 2-device run on 127.0.0.1; started by tests/test_multiprocess.py
through `launch/local_multiprocess.sh 2 -- python tests/multiprocess_check.py PHASE WORKDIR`.

`PHASE=preempt`: train; process 0 sends itself SIGTERM as it fetches the batch of step 3, JAX's
preemption service agrees on a step across both processes, both save it and exit 143.
`PHASE=resume`: restore that checkpoint, finish training and evaluate; process 0 writes the
evaluation's codes of both splits to `WORKDIR/codes.npz`.
`PHASE=fit`: on the finished run, fit its codes as `eval.fitted_codes` does at the end of
training (on both processes; process 0 stores the fit) and encode the database split with
them; process 0 writes those codes to `WORKDIR/fitted_codes.npz`. Not a test module itself.
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_config  # noqa: E402

from fdh_jax import parallel  # noqa: E402

NUM_STEPS, SIGNAL_AT = 6, 3


def check_config():
    """The tiny config with SGD: its update is linear in the gradient, so 2 processes can be
    compared tightly with 1. (Adam divides by sqrt(v): where a gradient is near zero it turns
    the float summation-order noise of the cross-process all-reduce into O(lr) differences.)"""
    config = tiny_config(NUM_STEPS)
    config.train.optimizer = "sgd"
    config.train.learning_rate = 0.02
    return config


def main(phase: str, workdir: Path) -> int:
    assert parallel.initialize_distributed(), "expected JAX_* variables from the launcher"
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from fdh_jax.evaluation import evaluate  # noqa: PLC0415
    from fdh_jax.training import checkpointing, train  # noqa: PLC0415

    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    config = check_config()
    if phase == "fit":
        return fit_codes(workdir)
    if phase == "preempt":
        fetch, calls = parallel.global_batch, [0]

        def fetch_then_signal(batch, mesh):
            calls[0] += 1
            if calls[0] == SIGNAL_AT and jax.process_index() == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            if calls[0] >= SIGNAL_AT:
                # The processes agree on the stop step asynchronously: leave the service time
                # to do so before the last step (tiny steps could otherwise all run first).
                time.sleep(0.5)
            return fetch(batch, mesh)

        parallel.global_batch = fetch_then_signal
        try:
            train.train_and_evaluate(config, workdir)
        except checkpointing.Preempted as notice:
            print(f"process {jax.process_index()}: {notice}", flush=True)
            return 143
        return 1  # the notice was lost
    evaluations = []
    evaluate_fn = evaluate.evaluate

    def keep_evaluation(*args, **kwargs):
        evaluations.append(evaluate_fn(*args, **kwargs))
        return evaluations[-1]

    evaluate.evaluate = keep_evaluation
    train.train_and_evaluate(config, workdir)
    (evaluation,) = evaluations
    if jax.process_index() == 0:
        codes = {f"query_{k}": v for k, v in evaluation.query_codes.items()}
        codes |= {f"database_{k}": v for k, v in evaluation.db_codes.items()}
        np.savez(workdir / "codes.npz", **codes)
    return 0


def fit_config():
    """`check_config` with fitted codes (and the validation split they are chosen on)."""
    config = check_config()
    config.eval.validation_fraction = 0.34
    config.eval.fitted_codes = True
    return config


def fit_codes(workdir: Path) -> int:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from fdh_jax.encoding import encode_source  # noqa: PLC0415
    from fdh_jax.training import code_fitting, selection, train  # noqa: PLC0415
    from fdh_jax.training.step import state_variables  # noqa: PLC0415

    config = fit_config()
    run = train.prepare_run(config, workdir)
    training, validation = selection.validation_sources(config, run.database)
    variables, _ = code_fitting.fitted_variables(
        workdir, int(run.state.step), run.model, state_variables(run.state), training,
        validation, config, run.mesh,
    )  # fmt: skip
    codes, _ = encode_source(run.model, variables, run.database, config, run.mesh)
    run.manager.close()
    if jax.process_index() == 0:
        np.savez(workdir / "fitted_codes.npz", **codes)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
