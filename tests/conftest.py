import os
import sys

# Tests import the harness and their own worker functions by module name; spawned ranks
# inherit this path.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The CPU/gloo tiers run on the CPU even where GPUs exist; tests/test_gpu.py asks for CUDA.
os.environ.setdefault("MESHWISE_DEVICE", "cpu")
