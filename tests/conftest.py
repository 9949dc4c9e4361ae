import os
import sys
import tempfile

# Tests import the harness and their own worker functions by module name; spawned ranks
# inherit this path.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The CPU/gloo tiers run on the CPU even where GPUs exist; tests/test_gpu.py asks for CUDA.
os.environ.setdefault("MESHWISE_DEVICE", "cpu")
# meshwise run records every run under runs/ by default: the tests' go to a scratch directory
_RUNS = tempfile.mkdtemp(prefix="meshwise-test-runs-")
os.environ["MESHWISE_RUNS"] = _RUNS


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ARG001
    import shutil

    shutil.rmtree(_RUNS, ignore_errors=True)  # made above, for this session only
