"""The synchronized data-parallel step, and the state a checkpoint needs to continue it exactly.

Per step, on every rank (lines marked [dist] exist only for distribution; at size 1 they do nothing):
    global batch = perm(seed, epoch)[pos*B:(pos+1)*B]          same on every rank
    shard        = this rank's contiguous slice of it           [dist]
    grads        = SUM over the shard of per-example gradients  (+ loss sum, correct count in the tail,
                                                                 and the seconds this rank computed)
    allreduce(grads | tail)                                     [dist] in buckets started during backward
                                                                       (buckets.py), or one fused call
    grads       /= B (the global batch size: exact full-batch gradient, even for uneven shards)
    SGD update                                                  identical on every rank

The shards are equal (sizes differ by at most one) unless --balance asks for shares that follow each
rank's measured speed (balance.py); the seconds in the tail are what it measures.

By default the placement decides (--bucket-kb unset): ranks on several nodes, or gradients in half
precision, go bucketed; ranks that share one node, a core each, sum the whole gradient in one non-blocking
allreduce after backward (on shared memory there is no transfer to hide, and MPICH's non-blocking sum
keeps its pace beside a busy process where the blocking one does not). --bucket-kb N: buckets of N KiB;
0: the one fused (blocking) allreduce; -1: the run's first steps time both and keep the faster
(pathchoice.py).

Bucketed: backward hands each layer's finished
gradients to buckets.BucketedAllreduce, which starts a non-blocking allreduce per bucket, fully connected
layers first. Pipelined (when the ranks span several nodes, each with a core per rank, and not
deterministic): the step waits only for the first layers' bucket and the tail, updates conv1..conv2, and
owes the update of fc1..fc3 until the next forward reaches fc1 (settle()), so their sums travel during the
convolutions' backward and the next step's convolutions' forward. Each parameter gets the same update from
the same sum as in the serial order, bit for bit; everything that reads the parameters between steps
settles first. --allreduce-dtype float16 | bfloat16 sends the buckets in half precision (halfprec.py).

Deterministic mode: the global batch is cut into fixed-size micro-batches, each micro-batch's gradient
is rounded to 2**-32 fixed point in int64 and summed as integers. Integer addition is associative, so the
sum, and the parameters, are bit-identical whatever the number of ranks or how the micro-batches fall.
"""
from __future__ import annotations

import hashlib
import math
import time

import numpy as np

from .. import sampler
from .balance import ShardBalancer
from .buckets import BUCKET_KB_DEFAULT, BucketedAllreduce, tail_slots
from ..checkpoint import Checkpoint
from ..data import normalize
from ..data.identity import data_record
from ..data.split import val_size_of, validation_split
from ..layers import Workspace
from ..model import NUM_PARAMS, LeNet5
from ..optim import SGD, LRSchedule
from .autotune import PathChooser

TAIL = 3                      # grad buffer tail: [loss sum, number correct, stop votes, then one slot per
                              # rank: the seconds it spent computing its shard (the others add 0)]
FIXED_POINT_BITS = 32         # deterministic mode: gradients rounded to multiples of 2**-32
BALANCE_QUANTUM = 8           # --balance: shard cuts move in steps of 8 examples (few, steady shapes)


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, replicas out of sync); the message is one line."""


class DataParallelTrainer:
    def __init__(self, cfg, comm, dataset, *, pipelined=None, chunk_kb=None, window=None):
        """`pipelined`, `chunk_kb`, `window`: how the buckets travel (buckets.BucketedAllreduce); None: the
        defaults, pipelined across nodes with a core per rank (benchmarks and tests set them)."""
        self.cfg, self.comm = cfg, comm
        n = len(dataset.train_images) if not cfg.train_subset else min(cfg.train_subset, len(dataset.train_images))
        val_size = val_size_of(n, cfg.val_size)
        train_idx, val_idx = validation_split(n, val_size, cfg.seed)            # the held-out examples
        self.images, self.labels = dataset.train_images[train_idx], dataset.train_labels[train_idx].astype(np.intp)
        self.val_images, self.val_labels = dataset.train_images[val_idx], dataset.train_labels[val_idx]
        self.test_images, self.test_labels = dataset.test_images, dataset.test_labels
        self.n = len(train_idx)
        self.data_record = data_record(dataset.identity(), n, val_size, cfg.seed)  # meta["data"]
        auto = cfg.bucket_kb is not None and cfg.bucket_kb < 0            # [dist] try both, keep the faster
        # [dist] By placement (bucket_kb None): buckets where there is a transfer to hide (across nodes) or
        # half precision to send; on one node (a core per rank) one non-blocking allreduce after backward.
        # Shared memory sums the gradient in ~0.1 ms, so overlap has nothing to hide there, and the buckets'
        # MPI calls cost 3-4% a step; but MPICH's blocking allreduce is 1.2-1.7x slower than its non-blocking
        # one when a busy process shares the cores (bench/paths_interleaved.py, docs/scaling.md).
        nothing_to_hide = comm.ranks_per_node == comm.size and comm.nap is None and cfg.allreduce_dtype == "float32"
        by_placement = cfg.bucket_kb is None
        kb = (0 if nothing_to_hide else BUCKET_KB_DEFAULT) if by_placement else cfg.bucket_kb
        self.bucket_kb = (BUCKET_KB_DEFAULT if auto else kb) if comm.size > 1 else 0   # 0: fused
        self.fused_nonblocking = by_placement and self.bucket_kb == 0 and comm.size > 1
        bucketed = self.bucket_kb > 0
        extra = tail_slots(self.bucket_kb, cfg.allreduce_dtype) if bucketed else 0
        self.model = LeNet5(seed=cfg.seed, grad_tail=TAIL + comm.size + extra)
        comm.bcast_(self.model.params)                                   # [dist] rank 0's initial weights
        self.opt = SGD(self.model.params, momentum=cfg.momentum, nesterov=cfg.nesterov,
                       weight_decay=cfg.weight_decay)
        self.steps_per_epoch = sampler.steps_per_epoch(self.n, cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.schedule = LRSchedule(cfg.lr, kind=cfg.schedule, total_steps=self.total_steps,
                                   steps_per_epoch=self.steps_per_epoch,
                                   warmup_steps=int(round(cfg.warmup_epochs * self.steps_per_epoch)),
                                   gamma=cfg.gamma, step_epochs=cfg.step_epochs)
        self.step, self.epoch, self.pos = 0, 0, 0                       # pos: batches done in this epoch
        self._perm_epoch, self._perm = None, None
        self._xbuf = Workspace(np.float32)                               # normalized shard images
        if cfg.deterministic:
            self._acc = np.zeros(NUM_PARAMS + TAIL + comm.size, np.int64)  # fixed-point gradient sum
        # [dist] pipelined: the last layers' update waits for the next forward to need it (see settle()).
        # Only across nodes (on one, shared memory sums the gradient in ~0.1 ms: nothing to hide, and the
        # lanes cost 3-5% more than whole buckets), and not on a node with more ranks than cores, where a
        # rank's waits give its core to a peer and each chunk would wait for that peer's turn (measured
        # 0.71-0.79x the whole buckets). docs/scaling.md.
        if pipelined is None:
            pipelined = not cfg.deterministic and comm.nap is None and comm.ranks_per_node < comm.size
        self.pipelined = bucketed and pipelined and not cfg.deterministic
        self.reducer = BucketedAllreduce(comm, self.model.grad_buffer, bucket_kb=self.bucket_kb,   # [dist]
                                         dtype=cfg.allreduce_dtype, pipelined=self.pipelined,
                                         chunk_kb=chunk_kb, window=window,
                                         send=self._acc if cfg.deterministic else None) if bucketed else None
        self.chooser = PathChooser(comm) if auto and bucketed and cfg.allreduce_dtype == "float32" else None
        self.path = "buckets" if bucketed else "fused"                  # [dist] this step's reduction
        self._steps_here = 0            # steps since this start (the chooser's clock)
        self._pending = None            # (B, lr) of the update still owed to [back_lo, NUM_PARAMS)
        self._settle_wait = 0.0         # seconds the current step's forward waited for it
        self._carry = None              # a resumed half-precision run's residuals, owed to the next step's sum
        self.balancer = ShardBalancer(comm.size, enabled=cfg.balance)
        self.slowdown = 1.0             # > 1: this rank computes that many times slower (--fault RANK:STEP:slow)
        self.examples_by_rank = np.zeros(comm.size, np.int64)           # since the caller last reset them:
        self.seconds_by_rank = np.zeros(comm.size, np.float64)          # work and compute time of every rank
        self.comm_seconds = 0.0         # this rank's time blocked on the step's reduction (caller resets it)
        self.settle_seconds = 0.0       # the part of it spent waiting for an owed update (pipelined)
        self.step_compute_seconds = np.zeros(comm.size)                 # the last step's, per rank

    # ------------------------------------------------------------------------------ position and state
    @property
    def done(self):
        return self.step >= self.total_steps

    def _batch_indices(self):
        if self._perm_epoch != self.epoch:
            self._perm, self._perm_epoch = sampler.epoch_permutation(self.cfg.seed, self.epoch, self.n), self.epoch
        return sampler.global_batch(self._perm, self.pos, self.cfg.batch_size)

    def _examples(self, idx, lo, hi):
        """Normalized float32 images and int labels of global-batch positions [lo, hi)."""
        u8 = self.images[idx[lo:hi]]
        if self.cfg.augment_shift:
            shifts = sampler.random_shifts(self.cfg.seed, self.epoch, self.pos, len(idx), self.cfg.augment_shift)
            u8 = sampler.shift_images(u8, shifts[lo:hi], self.cfg.augment_shift)
        return normalize(u8, out=self._xbuf.get("x", u8.shape)), self.labels[idx[lo:hi]]

    # ---------------------------------------------------------------------------------------- the step
    def train_step(self, stop_request=False):
        """One synchronized SGD step. Returns (global batch size, loss sum, number correct, stop) where
        `stop` is true when any rank asked to stop: the vote travels in the same allreduce, so all ranks
        stop after the same step."""
        idx = self._batch_indices()
        B = len(idx)
        buf = self.model.grad_buffer
        if self.chooser:                                                        # [dist] trying both paths
            path = self.chooser.path(self._steps_here)
            if path != self.path:
                self.settle()
                self.path = path
            self.chooser.step_starts(self._steps_here)
        reducer = self._active
        if self.cfg.deterministic:
            m = self.cfg.micro_batch
            cuts = np.minimum(self.balancer.plan(-(-B // m)) * m, B)           # [dist] whole micro-batches
            self._deterministic_grads(idx, cuts, stop_request)
        else:
            cuts = self.balancer.plan(B, quantum=BALANCE_QUANTUM)
            lo, hi = cuts[self.comm.rank], cuts[self.comm.rank + 1]            # [dist] this rank's shard
            ready = reducer.ready if reducer else None                          # [dist] buckets leave early
            before = self._before_layer if reducer and self.pipelined else None # [dist] the owed update
            self._settle_wait = 0.0
            if hi <= lo:
                self.settle()                                                   # [dist] before buf is reused
            t0 = time.perf_counter()
            if hi > lo:
                x, y = self._examples(idx, lo, hi)
                loss, correct = self.model.loss_and_grad(x, y, scale=1.0, ready=ready, before=before)  # sums
            else:
                buf[:] = 0.0
                loss, correct = 0.0, 0
            seconds = self._slow_down(time.perf_counter() - t0 - self._settle_wait)
            buf[NUM_PARAMS:] = 0.0
            buf[NUM_PARAMS:NUM_PARAMS + TAIL] = (loss, correct, stop_request)
            buf[NUM_PARAMS + TAIL + self.comm.rank] = seconds
            self._reduce(buf)                                                   # [dist]
        loss_sum, n_correct = float(buf[NUM_PARAMS]), int(round(float(buf[NUM_PARAMS + 1])))
        stop = bool(buf[NUM_PARAMS + 2] > 0)
        if not math.isfinite(loss_sum):
            raise TrainingError(f"loss is {loss_sum} at step {self.step}: training diverged "
                                f"(lower --lr, or check the data)")
        sizes, seconds = np.diff(cuts), buf[NUM_PARAMS + TAIL:NUM_PARAMS + TAIL + self.comm.size]  # [dist]
        self.balancer.observe(sizes, seconds)
        self.examples_by_rank += sizes
        self.seconds_by_rank += seconds
        self.step_compute_seconds = seconds                                    # this step's, per rank (a view)
        lr = self.schedule(self.step)
        if reducer and self.pipelined and reducer.back_lo < NUM_PARAMS:       # [dist] the first layers now,
            front = slice(0, self.reducer.back_lo)                              # the rest when needed
            self._add_carry(front)
            self.model.grads[front] *= np.float32(1.0 / B)
            self.opt.step(self.model.grads, lr, front)
            self._pending = (B, lr)
        else:
            self._add_carry(slice(0, NUM_PARAMS))
            self.model.grads *= np.float32(1.0 / B)
            self.opt.step(self.model.grads, lr)
        self.step += 1
        self.pos += 1
        if self.pos == self.steps_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        if self.chooser:                                                        # [dist]
            decided = self.chooser.step_ends(self._steps_here, self.settle)
            if decided:
                self.path = decided
        self._steps_here += 1
        return B, loss_sum, n_correct, stop

    @property
    def reduction(self):
        """[dist] How this step's gradient is summed, in words (logged, and in the epoch rows)."""
        if self.path == "fused":
            return "fused, non-blocking" if self.fused_nonblocking else "fused"
        return "buckets, pipelined" if self.pipelined else "buckets"

    @property
    def _active(self):
        """[dist] The reducer this step uses: none on the fused path."""
        return self.reducer if self.path == "buckets" else None

    def _before_layer(self, offset):
        """[dist] Forward is about to use the weights from flat `offset` on: if they are owed an update,
        wait for their sums and apply it; otherwise let MPI move the sums along."""
        if self._pending is not None and offset >= self.reducer.back_lo:
            t = time.perf_counter()
            self.settle()
            self._settle_wait += time.perf_counter() - t
        else:
            self.reducer.pump()

    def settle(self):
        """[dist] Apply the update the last step still owes its last layers (pipelined: their sums travel
        while the next forward runs its convolutions). Every rank calls this at the same points: before
        anything reads or writes the parameters between steps (evaluation, checks, checkpoints)."""
        if self._pending is None:
            return
        B, lr = self._pending
        self._pending = None
        t = time.perf_counter()
        self.reducer.settle()
        waited = time.perf_counter() - t
        self.comm_seconds += waited
        self.settle_seconds += waited
        back = slice(self.reducer.back_lo, NUM_PARAMS)
        self._add_carry(back)
        self.model.grads[back] *= np.float32(1.0 / B)
        self.opt.step(self.model.grads, lr, back)

    def _add_carry(self, part):
        """[dist] Add the residuals a resumed run could not hand back to the ranks that rounded them (another
        rank count, bucket plan or allreduce dtype) to the summed gradient, once, alike on every rank: the
        sum of the applied gradients then loses nothing to the restart."""
        if self._carry is not None:
            self.model.grads[part] += self._carry[part]
            if part.stop == NUM_PARAMS:
                self._carry = None

    def _slow_down(self, seconds):
        """Rehearsing a straggler: stretch this rank's compute time by self.slowdown. Returns the seconds."""
        if self.slowdown > 1.0:
            time.sleep((self.slowdown - 1.0) * seconds)
            return self.slowdown * seconds
        return seconds

    def _deterministic_grads(self, idx, cuts, stop_request):
        """Fill grad_buffer with the fixed-point-exact gradient sum of the global batch (see module doc);
        this rank takes the micro-batches in global-batch positions [cuts[rank], cuts[rank + 1])."""
        m = self.cfg.micro_batch
        lo, hi = int(cuts[self.comm.rank]), int(cuts[self.comm.rank + 1])
        acc, buf, scale = self._acc, self.model.grad_buffer, float(2 ** FIXED_POINT_BITS)
        acc[:] = 0
        t0 = time.perf_counter()
        buf[NUM_PARAMS:] = 0.0
        starts = range(lo, hi, m)
        in_acc = [NUM_PARAMS]               # bucketed: the last micro-batch's gradients from here on are in acc

        def into_fixed_point(offset):       # [dist] a finished layer of the last micro-batch joins the sum ...
            acc[offset:in_acc[0]] += np.rint(buf[offset:in_acc[0]].astype(np.float64) * scale).astype(np.int64)
            in_acc[0] = offset
            self._active.ready(offset)      # ... and its bucket may leave
        for start in starts:
            early = self._active is not None and start == starts[-1]                          # [dist]
            x, y = self._examples(idx, start, min(start + m, hi))
            loss, correct = self.model.loss_and_grad(x, y, scale=1.0, ready=into_fixed_point if early else None)
            buf[NUM_PARAMS:NUM_PARAMS + TAIL] = (loss, correct, 0)
            rest = slice(NUM_PARAMS if early else 0, None)
            acc[rest] += np.rint(buf[rest].astype(np.float64) * scale).astype(np.int64)
        seconds = self._slow_down(time.perf_counter() - t0)
        acc[NUM_PARAMS + 2] = int(stop_request) << FIXED_POINT_BITS
        acc[NUM_PARAMS + TAIL + self.comm.rank] = int(round(seconds * scale))
        self._reduce(acc)                                                     # [dist] exact integer sum
        buf[:] = acc / scale

    def _reduce(self, send):
        """[dist] Sum `send` (the grad buffer, or the fixed-point sums) over the ranks: the buckets not yet
        started and the tail, then wait for all; or, fused, in one allreduce."""
        t = time.perf_counter()
        if self._active:
            self._active.finish()
            if not self.pipelined:
                self._active.settle()
        else:
            self.comm.allreduce_(send, nonblocking=self.fused_nonblocking)
        self.comm_seconds += time.perf_counter() - t

    # ---------------------------------------------------------------------------------------- evaluation
    def evaluate(self, split="test"):
        """(mean loss, accuracy) on the test set or the validation split ("val"), each rank evaluating a
        shard, figures summed; None for an empty split."""
        self.settle()
        images, labels = (self.val_images, self.val_labels) if split == "val" else (self.test_images, self.test_labels)
        if not len(images):
            return None
        lo, hi = sampler.shard_bounds(len(images), self.comm.rank, self.comm.size)           # [dist]
        loss, acc = self.model.evaluate(images[lo:hi], labels[lo:hi]) if hi > lo else (0.0, 0.0)
        sums = np.array([loss * (hi - lo), acc * (hi - lo)], np.float64)
        self.comm.allreduce_(sums)                                                            # [dist]
        n = len(images)
        return float(sums[0] / n), float(round(sums[1]) / n)

    # ---------------------------------------------------------------------------------- replica checks
    def params_digest(self):
        self.settle()
        return hashlib.sha256(self.model.params.tobytes()).digest()[:8]

    def check_synced(self):
        """Compare every rank's parameter checksum; raise TrainingError naming the odd ranks."""
        mine = np.frombuffer(self.params_digest(), np.uint64)
        all_ = self.comm.allgather(mine)[:, 0]                                # [dist]
        if (all_ == all_[0]).all():
            return
        values, counts = np.unique(all_, return_counts=True)
        if counts.max() * 2 > len(all_):              # a strict majority: name the ranks that left it
            odd = [r for r in range(len(all_)) if all_[r] != values[np.argmax(counts)]]
            who = f"rank(s) {', '.join(map(str, odd))} differ from the other ranks"
        else:
            who = "no majority: " + "; ".join(f"rank(s) {', '.join(str(r) for r in range(len(all_)) if all_[r] == v)} "
                                              f"agree" for v in values)
        raise TrainingError(f"replicas out of sync at step {self.step}: {who} (parameter checksums differ)")

    # ------------------------------------------------------------------------------- checkpoint content
    def checkpoint_content(self):
        """(named params, velocity, meta, residuals) for checkpoint.to_bytes / checkpoint.save. Every rank
        calls this at the same point: it settles, and a run whose gradients travel in half precision gathers
        each rank's error-feedback residual (residuals None otherwise)."""
        self.settle()
        meta = {"step": self.step, "epoch": self.epoch, "pos": self.pos, "ranks": self.comm.size,
                "config": self.cfg.to_dict(), "final": self.done, "data": self.data_record,
                "rng": {"generator": "numpy PCG64", "data_order": "SeedSequence([seed, epoch, 0])",
                        "augmentation": "SeedSequence([seed, epoch, pos + 1])", "seed": self.cfg.seed}}
        residuals = None
        if self.reducer is not None and self.reducer.compress:
            mine, meta["allreduce"] = self.reducer.compression_state()
            residuals = self.comm.allgather(mine)                               # [dist] (ranks, NUM_PARAMS)
        return self.model.named_params(), self.opt.velocity, meta, residuals

    def restore(self, ckpt: Checkpoint | None):
        """Every rank calls this; rank 0's checkpoint (others pass None) is broadcast to all. Residuals of a
        half-precision run go back to the ranks that rounded them when this run has as many ranks and sends
        the same buckets in the same dtype (then it rounds as the uninterrupted run would, bit for bit);
        otherwise their sum joins the next step's summed gradient (see _add_carry)."""
        self.settle()
        state = np.zeros(5, np.int64)           # step, epoch, pos, ranks that saved residuals, "as saved"
        if self.comm.rank == 0:
            self.model.load_named(ckpt.params)
            self.opt.velocity[...] = ckpt.velocity
            state[:3] = (ckpt.meta["step"], ckpt.meta["epoch"], ckpt.meta["pos"])
            if ckpt.residual is not None:
                state[3] = len(ckpt.residual)
                state[4] = (self.reducer is not None and len(ckpt.residual) == self.comm.size
                            and self.reducer.takes(ckpt.meta["allreduce"]))
        for buf in (self.model.params, self.opt.velocity, state):                # [dist]
            self.comm.bcast_(buf)
        self.step, self.epoch, self.pos = (int(v) for v in state[:3])
        if state[4]:
            rows = ckpt.residual if self.comm.rank == 0 else np.empty((self.comm.size, NUM_PARAMS), np.float32)
            scales = np.full(len(self.reducer.buckets), np.nan)
            if self.comm.rank == 0:
                scales[:] = [np.nan if v is None else v for v in ckpt.meta["allreduce"]["scale"]]
            rows = self.comm.bcast_(np.ascontiguousarray(rows))                  # [dist]
            self.comm.bcast_(scales)
            self.reducer.load_compression_state(rows[self.comm.rank], [None if np.isnan(v) else float(v) for v in scales])
        elif state[3]:
            carry = ckpt.residual.sum(0, dtype=np.float64).astype(np.float32) if self.comm.rank == 0 \
                else np.empty(NUM_PARAMS, np.float32)
            self._carry = self.comm.bcast_(carry)                               # [dist]
        if self.pos >= self.steps_per_epoch or self.step != self.epoch * self.steps_per_epoch + self.pos:
            raise TrainingError(f"checkpoint position (step {self.step}, epoch {self.epoch}, batch {self.pos}) "
                                f"does not fit {self.steps_per_epoch} batches per epoch: was it made with "
                                f"another --batch-size or data set?")
