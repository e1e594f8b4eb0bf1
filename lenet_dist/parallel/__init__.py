"""The distributed training step and the ways of summing its gradient over the ranks.

    step.py        DataParallelTrainer: batch, shard, forward/backward, the reducer's sum, update
    stats.py       the step's statistics (loss sum, correct, stop vote, compute seconds) and their tail slots
    reducers.py    the reducer interface; the fused sum; the bucketed sum (pipelined or not; in half precision)
    fixedpoint.py  --deterministic: micro-batch gradients summed as 2**-32 fixed-point integers
    autotune.py    --bucket-kb -1: time the fused and the bucketed sums on the run, keep the faster
    placement.py   which reducer a run gets (the one placement policy)
    buckets.py     the bucket plan and the non-blocking collectives that carry them (lanes)
    compressed.py  the buckets in half precision: encoded with error feedback, halves summed (HalfSum)
    halfprec.py    half-precision rounding, agreed scales, error feedback (numbers only, no MPI)
    balance.py     --balance: shard sizes that follow each rank's measured speed
    turns.py       more ranks than cores on a node: its ranks compute in turns of at most `cores` ranks
    timeline.py    --timeline: every rank's phases over a window of steps, as a Chrome trace
"""
