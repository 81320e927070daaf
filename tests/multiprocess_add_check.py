"""`python -m fdh_jax.main` for tests/test_collection_multiprocess.py, run by each process of
`launch/local_multiprocess.sh`. With `FDH_TEST_KILL_AFTER_STAGING=I,J,...`, each listed
process SIGKILLs itself once every listed process has staged its block of a multi-process add,
before process 0 commits: a kill at the worst moment, made deterministic. (Waiting for the
others' staged records matters: a process killed at once can take down a collective the others
are still finishing, which then hang.) Not a test module itself."""

import os
import signal
import time

from absl import app

from fdh_jax import main
from fdh_jax.search.collection import Collection

_KILLED = os.environ.get("FDH_TEST_KILL_AFTER_STAGING", "").split(",")
if os.environ.get("JAX_PROCESS_ID") in _KILLED:
    stage_add = Collection.stage_add

    def stage_then_die(self, new, run, part, **kwargs):
        stage_add(self, new, run, part, **kwargs)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all((run / f"{rank}.json").exists() for rank in _KILLED):
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

    Collection.stage_add = stage_then_die

if __name__ == "__main__":
    app.run(main.main, flags_parser=main._parse_flags)
