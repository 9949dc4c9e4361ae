"""meshwise: split PyTorch training and inference across processes and devices.

    import meshwise as mw
    engine = mw.parallelize(model, mw.Plan(dp=2), loss_fn=..., optimizer=..., sample=...)
    for batch in engine.loader(dataset, batch_size=64):
        loss = engine.step(batch)
"""

from meshwise.build import parallelize
from meshwise.engine import Engine
from meshwise.launch import WorkerFailed, launch
from meshwise.parallel_map import map
from meshwise.partition import Partition, partition
from meshwise.plan import Plan
from meshwise.tensor import tensor_plan

__all__ = ["Engine", "Partition", "Plan", "WorkerFailed", "launch", "map", "parallelize", "partition", "tensor_plan"]
__version__ = "0.1.0"
