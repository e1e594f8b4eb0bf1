"""Run under `mpirun -n N python -m tests.halfsum_prog OUT.npz`: three buckets of random half-precision
values per rank summed by buckets.HalfSum, the later buckets' all-to-alls finishing first on some ranks
(they are started and waited for in a rank-dependent way). Rank 0 saves, for each dtype, every rank's
inputs and results (gathered) for the test to check. The sums go through a buckets.Lane, as in the reducer."""
import sys

import numpy as np

from lenet_dist.comm import get_comm
from lenet_dist.parallel import halfprec
from lenet_dist.parallel.buckets import Lane
from lenet_dist.parallel.compressed import HalfSum


def main():
    comm = get_comm()
    out = {}
    for dtype in ("float16", "bfloat16"):
        sizes = (59_001, 2_417, 7)                              # none a multiple of 2, 3 or 4
        rng = np.random.default_rng(comm.rank * 7 + len(dtype))
        inputs = [(rng.standard_normal(n) * 10.0 ** rng.integers(-6, 3, n)).astype(np.float32) for n in sizes]
        bits = [halfprec.to_float16(x).view(np.uint16) if dtype == "float16" else halfprec.to_bfloat16(x)
                for x in inputs]
        sums = [HalfSum(comm, 0, n, dtype, source=b.copy()) for n, b in zip(sizes, bits)]
        lane = Lane(comm)                                       # the reducer's way: started and done in order
        for s in sums:
            lane.add([s])
            if comm.rank % 2:                                   # odd ranks move things along between starts
                lane.pump()
        lane.drain()
        for k, (s, b) in enumerate(zip(sums, bits)):
            out[f"{dtype}-in{k}"] = comm.allgather(b)
            out[f"{dtype}-out{k}"] = comm.allgather(s.result.copy())
    if comm.rank == 0:
        np.savez(sys.argv[1], **out)


if __name__ == "__main__":
    main()
