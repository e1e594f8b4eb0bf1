"""Run under `mpirun -n N python -m tests.pipeline_prog OUT.npz`: the real trainer on the shipped subset,
once pipelined (the back lane in 8 KiB chunks, 2 under way: many chunks, so that the front lane has to pass
them) and once serial (whole buckets, the update after the step), for float32 and float16, and in float32
with a global batch one smaller than the ranks (the last rank computes nothing: it settles at the step's
start). Between steps a test-set evaluation every 5 steps settles the owed update, as the epoch loop
does. Rank 0 saves the parameters, velocities and step losses of both for the test to compare."""
import sys

import numpy as np

from lenet_dist.comm import get_comm
from lenet_dist.config import TrainConfig
from lenet_dist.data import load_subset
from lenet_dist.parallel.reducers import BucketedReducer, HalfPrecisionReducer
from lenet_dist.parallel.step import DataParallelTrainer


def run(comm, ds, dtype, pipelined, batch=48):
    cfg = TrainConfig(batch_size=batch, seed=5, lr=0.02, bucket_kb=64, allreduce_dtype=dtype)
    lanes = dict(pipelined=pipelined, chunk_kb=8, window=2)
    reducer = BucketedReducer(comm, 64, **lanes) if dtype == "float32" else HalfPrecisionReducer(comm, 64, dtype, **lanes)
    t = DataParallelTrainer(cfg, comm, ds, reducer=reducer)
    assert t.reducer.pipelined == pipelined
    losses = []
    for step in range(12):
        losses.append(t.train_step()[1])
        if step % 5 == 4:
            t.evaluate()
    params, velocity, _, _ = t.checkpoint_content()
    return np.concatenate([p.ravel() for p in params.values()]), velocity.copy(), np.array(losses)


def main():
    comm = get_comm()
    ds = load_subset()
    out = {}
    for dtype in ("float32", "float16"):
        for name, pipelined in (("pipelined", True), ("serial", False)):
            p, v, losses = run(comm, ds, dtype, pipelined)
            out.update({f"{dtype}-{name}-params": p, f"{dtype}-{name}-velocity": v, f"{dtype}-{name}-losses": losses})
    for name, pipelined in (("pipelined", True), ("serial", False)):    # a global batch of size - 1:
        p, v, losses = run(comm, ds, "float32", pipelined, batch=comm.size - 1)   # the last rank has none
        out.update({f"empty-{name}-params": p, f"empty-{name}-velocity": v, f"empty-{name}-losses": losses})
    default = DataParallelTrainer(TrainConfig(batch_size=48, bucket_kb=64), comm, ds)    # on one node
    out["default-pipelined"] = np.array(default.reducer.pipelined)
    if comm.rank == 0:
        np.savez(sys.argv[1], **out)


if __name__ == "__main__":
    main()
