"""`python -m fdh_jax.main` for tests/test_collection_multiprocess.py, run by each process of
`launch/local_multiprocess.sh`. With `FDH_TEST_KILL_AFTER_STAGING=I,J,...`, each listed
process SIGKILLs itself right after it has staged its block of a multi-process add, before
process 0 commits: a kill at the worst moment, made deterministic. Not a test module itself."""

import os
import signal

from absl import app

from fdh_jax import main
from fdh_jax.search.collection import Collection

_KILLED = os.environ.get("FDH_TEST_KILL_AFTER_STAGING", "").split(",")
if os.environ.get("JAX_PROCESS_ID") in _KILLED:
    stage_add = Collection.stage_add

    def stage_then_die(self, *args, **kwargs):
        stage_add(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    Collection.stage_add = stage_then_die

if __name__ == "__main__":
    app.run(main.main, flags_parser=main._parse_flags)
