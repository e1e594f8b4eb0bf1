"""The bucketed and the compressed allreduce against the fused float32 path, over real mpirun on 1-4 ranks:
the real trainer, one epoch of the shipped subset (40 steps of batch 50, lr 0.01, where trajectories that
differ by float rounding stay together; see test_mpi.py)."""
import json

import numpy as np
import pytest

from lenet_dist.checkpoints import format as checkpoint
from lenet_dist.nn.model import NUM_PARAMS

from tests.mpiutil import final_params, launch

BASE = ["--subset", "--val-size", "0",  # no held-out split: 40 steps
        "--epochs", "1", "--batch-size", "50", "--lr", "0.01", "--seed", "7", "--no-progress",
        "--log-level", "WARNING", "--stall-timeout", "30"]


def train(n, tmp_path, name, *extra):
    d = tmp_path / name
    launch(n, [*BASE, "--checkpoint-dir", d, "--metrics", d / "metrics.jsonl", *extra])
    last = [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r["event"] == "epoch"][-1]
    assert last["step"] == 40 and last["ranks"] == max(n, 1), last
    return final_params(d)[0], last


def rel_diff(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("n, kb", [(2, "64"), (3, "1"), (4, "1")])
def test_bucketed_allreduce_equals_the_fused_one(tmp_path, n, kb):
    # kb 1: a bucket per layer (five and the tail); 64, the default: fc1..fc3, then conv1..conv2
    fused, m0 = train(n, tmp_path, "fused", "--bucket-kb", "0")
    bucketed, m = train(n, tmp_path, f"b{kb}", "--bucket-kb", kb)
    assert rel_diff(bucketed, fused) <= 1e-5
    assert abs(m["train_loss"] - m0["train_loss"]) <= 1e-4


def test_bucketed_deterministic_mode_stays_bit_identical_across_rank_counts(tmp_path):
    det = ["--deterministic", "--micro-batch", "4"]
    one, _ = train(0, tmp_path, "one", *det, "--bucket-kb", "0")
    for n, kb in ((2, "0"), (3, "1"), (4, "64")):
        got, _ = train(n, tmp_path, f"n{n}", *det, "--bucket-kb", kb)
        assert np.array_equal(got, one), (n, kb)


@pytest.mark.parametrize("n", [2, 4])
def test_compressed_allreduce_follows_the_float32_one(tmp_path, n):
    # measured: float16 5e-5, bfloat16 1e-3 relative to the largest parameter after 40 steps on 4 ranks
    fused, m0 = train(n, tmp_path, "fused", "--bucket-kb", "0")
    for dtype, tol in (("float16", 1e-3), ("bfloat16", 1e-2)):
        half, m = train(n, tmp_path, dtype, "--allreduce-dtype", dtype)
        assert 0 < rel_diff(half, fused) <= tol, dtype     # not the float32 path in disguise, and close to it
        assert abs(m["test_acc"] - m0["test_acc"]) <= 0.005
        assert abs(m["train_loss"] - m0["train_loss"]) <= 1e-3


@pytest.mark.parametrize("n, dtype", [(2, "float16"), (3, "bfloat16")])
def test_a_compressed_run_killed_and_resumed_ends_bit_identical(tmp_path, n, dtype):
    """Each rank's error-feedback residual and the agreed scales are in the checkpoint, so the resumed run
    rounds as the uninterrupted one (without them its first step went in float32 and the residuals were
    lost). 2 ranks: HalfSum; 3: MPI's own half sums."""
    flags = ["--allreduce-dtype", dtype, "--checkpoint-every", "10"]
    whole, _ = train(n, tmp_path, "whole", *flags)
    d = tmp_path / "killed"
    p = launch(n, [*BASE, "--checkpoint-dir", d, "--metrics", d / "metrics.jsonl", *flags, "--fault", "1:25:exit"],
               check=False)
    assert p.returncode != 0 and checkpoint.list_checkpoints(d)[0][0] == 20, p.stderr[-2000:]
    ck = checkpoint.load_file(d / checkpoint.file_name(20))
    assert ck.residual.shape == (n, NUM_PARAMS) and ck.meta["allreduce"]["dtype"] == dtype
    assert (np.abs(ck.residual).max(axis=1) > 0).all()                         # every rank's own
    assert not np.array_equal(ck.residual[0], ck.residual[1])
    assert all(s is not None for s in ck.meta["allreduce"]["scale"])          # the next step goes in half
    resumed, _ = train(n, tmp_path, "killed", *flags, "--resume")
    assert np.array_equal(resumed, whole)


def test_the_default_on_one_node_is_one_non_blocking_allreduce(tmp_path):
    """By placement: 2 ranks on this node, a core each, so no buckets (nothing to hide on shared memory)
    but one non-blocking allreduce after backward; half precision still goes in buckets. The sums are the
    fused path's, bit for bit (2 ranks: a + b = b + a). More ranks than cores keep the buckets (with naps
    between tests: comm.py)."""
    n = 2
    fused, _ = train(n, tmp_path, "fused", "--bucket-kb", "0")
    default, m = train(n, tmp_path, "default")
    assert m["reduction"] == "fused, non-blocking" and m["allreduce"] == "fused"
    assert np.array_equal(default, fused)
    _, m = train(n, tmp_path, "half", "--allreduce-dtype", "bfloat16")
    assert m["reduction"] == "buckets"
    _, m = train(n, tmp_path, "b64", "--bucket-kb", "64")          # asked for: buckets, on one node too
    assert m["reduction"] == "buckets"


def test_one_rank_sends_nothing_so_neither_buckets_nor_compression_change_a_bit(tmp_path):
    fused, _ = train(0, tmp_path, "fused", "--bucket-kb", "0")
    for name, flags in (("b1", ["--bucket-kb", "1"]), ("half", ["--allreduce-dtype", "float16"])):
        got, _ = train(0, tmp_path, name, *flags)
        assert np.array_equal(got, fused), name
    got, _ = train(1, tmp_path, "mpi1", "--allreduce-dtype", "bfloat16")   # under mpirun -n 1 as well
    assert np.array_equal(got, fused)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_half_sums_are_one_rounding_of_the_float32_sum_and_the_same_on_every_rank(tmp_path, n):
    """HalfSum (all-to-all, float32 sums, allgather) over real mpirun: for every bucket and element, the
    float32 sum of the ranks' halves rounded once to half, identical on all ranks, with uneven chunks."""
    from lenet_dist.parallel import halfprec
    out = tmp_path / "h.npz"
    launch(n, [out], module="tests.halfsum_prog", timeout=180)
    got = np.load(out)
    for dtype in ("float16", "bfloat16"):
        for k in range(3):
            ins, outs = got[f"{dtype}-in{k}"], got[f"{dtype}-out{k}"]             # (ranks, n) bits each
            assert ins.shape[0] == n and (outs == outs[0]).all(), (dtype, k)        # every rank alike
            f32 = ins.view(np.float16).astype(np.float32) if dtype == "float16" else halfprec.from_bfloat16(ins)
            total = f32.sum(axis=0, dtype=np.float32)
            want = halfprec.to_float16(total).view(np.uint16) if dtype == "float16" else halfprec.to_bfloat16(total)
            assert np.array_equal(outs[0], want), (dtype, k)


@pytest.mark.parametrize("n", [2, 3])
def test_the_pipelined_step_gives_the_serial_steps_bits(tmp_path, n):
    """The last layers' update applied just before the next forward needs them, their sums in chunks behind
    the first layers': the same parameters, velocities and losses, bit for bit, as the whole update after
    every step (3 ranks: uneven chunks and HalfSum's place taken by MPI's own half sums)."""
    out = tmp_path / "p.npz"
    launch(n, [out], module="tests.pipeline_prog", timeout=180)
    got = np.load(out)
    for dtype in ("float32", "float16", "empty"):
        for what in ("params", "velocity", "losses"):
            a, b = got[f"{dtype}-pipelined-{what}"], got[f"{dtype}-serial-{what}"]
            assert np.array_equal(a, b), (dtype, what, float(np.abs(a - b).max()))
        assert np.isfinite(got[f"{dtype}-pipelined-params"]).all()
    assert not got["default-pipelined"]           # all ranks on one node: whole buckets by default


def test_the_default_measures_both_paths_and_keeps_one_without_changing_the_result(tmp_path):
    """--bucket-kb -1: the first 58 steps try the fused path and the buckets in turn, then
    the run keeps one and says which; the parameters stay those of the fused path (float rounding)."""
    def run(name, *extra):
        d = tmp_path / name
        p = launch(2, ["--subset", "--val-size", "0", "--epochs", "2", "--batch-size", "50", "--lr", "0.01",
                       "--seed", "7", "--no-progress", "--log-level", "INFO", "--stall-timeout", "30",
                       "--checkpoint-dir", d, "--metrics", d / "metrics.jsonl", *extra])
        rows = [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if r["event"] == "epoch"]
        return final_params(d)[0], rows, p.stderr
    fused, rows, _ = run("fused", "--bucket-kb", "0")
    assert rows[-1]["allreduce"] == "fused"
    chosen, rows, log = run("auto", "--bucket-kb=-1")
    assert rows[-1]["step"] == 80 and rows[-1]["allreduce"] in ("fused", "buckets")
    assert f"allreduce: {rows[-1]['allreduce']} (fused " in log
    assert rel_diff(chosen, fused) <= 1e-5
