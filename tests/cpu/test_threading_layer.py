"""numba's threading layer (viterbi_numba/cpu/threading_layer.py): fork and Python threads after kernel
calls, each in a fresh process (a layer is chosen once per process)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

FORK_AND_THREADS = r"""
import json, multiprocessing, sys, threading
import numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import make_problem
import numba
import viterbi_numba as vn

scores, tokens, E1, E2 = make_problem(np.random.default_rng(0), 8, 6, 5, D=3)

def log_z(_):
    return vn.log_partition(scores, tokens, E1, E2).tolist()

want = log_z(0)  # a parallel kernel has run in this process before it forks
with multiprocessing.get_context("fork").Pool(2) as pool:
    forked = pool.map(log_z, range(4), chunksize=1)
threaded = []
workers = [threading.Thread(target=lambda: threaded.append(log_z(0))) for _ in range(4)]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
print(json.dumps({"layer": numba.threading_layer(), "want": want, "forked": forked, "threaded": threaded}))
"""


def _run(script, layer=None):
    """``script`` in a fresh process, with NUMBA_THREADING_LAYER set to ``layer`` (None: unset)."""
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_THREADING_LAYER"}
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    return subprocess.run(
        [sys.executable, "-c", script, os.path.dirname(HERE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,  # a hung fork pool fails here instead of hanging the suite
    )


@pytest.mark.skipif(sys.platform != "linux", reason="the tbb wheel is a dependency on Linux")
def test_fork_pool_and_threads_after_a_kernel_call():
    """TBB is chosen, a fork pool after a kernel call returns the same results (with GNU OpenMP the
    children were killed and the pool hung), and so do kernel calls from four Python threads at once."""
    done = _run(FORK_AND_THREADS)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["layer"] == "tbb"
    assert found["forked"] == [found["want"]] * 4
    assert found["threaded"] == [found["want"]] * 4


def test_a_layer_chosen_by_the_user_is_kept():
    done = _run(
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]); from conftest import make_problem;"
        "import numba, viterbi_numba as vn;"
        "vn.log_partition(*make_problem(np.random.default_rng(0), 2, 3, 4, D=2)); print(numba.threading_layer())",
        "workqueue",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "workqueue"
