"""Run under `mpirun -n N python tests/mpi_prog.py OUT.npy BATCH [--deterministic]` (or without mpirun).

Takes ONE synchronized step of the real DataParallelTrainer on the shipped subset with global batch BATCH
and saves rank 0's averaged gradient (what the optimizer is given) to OUT.npy, so a test can compare the
N-rank gradient with the single-process full-batch gradient.
"""
import sys

import numpy as np

from lenet_dist.comm import get_comm
from lenet_dist.config import TrainConfig
from lenet_dist.data import load_subset
from lenet_dist.parallel.step import DataParallelTrainer


def main():
    out, batch = sys.argv[1], int(sys.argv[2])
    cfg = TrainConfig(batch_size=batch, seed=3, deterministic="--deterministic" in sys.argv, micro_batch=4)
    comm = get_comm()
    trainer = DataParallelTrainer(cfg, comm, load_subset())
    trainer.train_step()
    trainer.settle()
    if comm.rank == 0:
        np.save(out, trainer.model.grads)


if __name__ == "__main__":
    main()
