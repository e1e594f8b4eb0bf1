"""The synchronized data-parallel step, and the state a checkpoint needs to continue it exactly.

Per step, on every rank (lines marked [dist] exist only for distribution; at size 1 they do nothing):
    global batch = perm(seed, epoch)[pos*B:(pos+1)*B]          same on every rank
    shard        = this rank's contiguous slice of it           [dist]
    grads        = SUM over the shard of per-example gradients  (and the loss sum, the number correct, the
                                                                 seconds this rank computed: stats.py)
    sum over the ranks, by the reducer                          [dist] reducers.py; which one: placement.py
    grads       /= B (the global batch size: exact full-batch gradient, even for uneven shards)
    SGD update                                                  identical on every rank

The shards are equal (sizes differ by at most one) unless --balance asks for shares that follow each
rank's measured speed (balance.py); the seconds in the statistics are what it measures.
"""
from __future__ import annotations

import hashlib
import math
import time
from typing import NamedTuple

import numpy as np

from lenet_dist.checkpoints.format import Checkpoint
from lenet_dist.data import normalize, sampler
from lenet_dist.data.identity import data_record
from lenet_dist.data.split import val_size_of, validation_split
from lenet_dist.nn.layers import Workspace
from lenet_dist.nn.model import LeNet5, NUM_PARAMS
from lenet_dist.nn.optim import LRSchedule, SGD
from lenet_dist.parallel.balance import ShardBalancer
from lenet_dist.parallel.placement import reducer_for
from lenet_dist.parallel.stats import Tail

BALANCE_QUANTUM = 8           # --balance: shard cuts move in steps of 8 examples (few, steady shapes)


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, replicas out of sync); the message is one line. `kind` says which
    for the exit status (run/exitcodes.py): "diverged", "replicas" or "training"; never read from the text."""

    def __init__(self, message, kind="training"):
        super().__init__(message)
        self.kind = kind


class StepResult(NamedTuple):
    batch: int                  # examples in the global batch
    loss_sum: float             # their summed loss
    correct: int                # how many were classified right
    stop: bool                  # some rank asked to stop: all stop after this step
    lr: float                   # the learning rate this step applied


class DataParallelTrainer:
    def __init__(self, cfg, comm, dataset, *, reducer=None):
        """`reducer`: how gradients are summed (reducers.py), unbound; None: placement.reducer_for's choice
        (benchmarks and tests pass their own)."""
        self.cfg, self.comm = cfg, comm
        n = len(dataset.train_images) if not cfg.train_subset else min(cfg.train_subset, len(dataset.train_images))
        val_size = val_size_of(n, cfg.val_size)
        train_idx, val_idx = validation_split(n, val_size, cfg.seed)            # the held-out examples
        self.images, self.labels = dataset.train_images[train_idx], dataset.train_labels[train_idx].astype(np.intp)
        self.val_images, self.val_labels = dataset.train_images[val_idx], dataset.train_labels[val_idx]
        self.test_images, self.test_labels = dataset.test_images, dataset.test_labels
        self.n = len(train_idx)
        self.data_record = data_record(dataset.identity(), n, val_size, cfg.seed)  # meta["data"]
        self.reducer = reducer_for(cfg, comm) if reducer is None else reducer     # [dist]
        tail = Tail(comm.size, self.reducer.tail_slots)
        self.model = LeNet5(seed=cfg.seed, grad_tail=tail.length, label_smoothing=cfg.label_smoothing)
        comm.bcast_(self.model.params)                                   # [dist] rank 0's initial weights
        self.opt = SGD(self.model.params, momentum=cfg.momentum, nesterov=cfg.nesterov,
                       weight_decay=cfg.weight_decay)
        self.reducer.bind(self.model.grad_buffer, tail)                  # [dist]
        self.steps_per_epoch = sampler.steps_per_epoch(self.n, cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.schedule = LRSchedule(cfg.lr, kind=cfg.schedule, total_steps=self.total_steps,
                                   steps_per_epoch=self.steps_per_epoch,
                                   warmup_steps=int(round(cfg.warmup_epochs * self.steps_per_epoch)),
                                   gamma=cfg.gamma, step_epochs=cfg.step_epochs)
        self.step, self.epoch, self.pos = 0, 0, 0                       # pos: batches done in this epoch
        self.lr_scale = 1.0             # on the schedule: the caller's steering (run/steering.py), saved by it
        self._perm_epoch, self._perm = None, None
        self._xbuf = Workspace(np.float32)                               # normalized shard images
        self.reducer.share([*self.model.workspaces(), self._xbuf])      # [dist]
        self._carry = None              # a resumed half-precision run's residuals, owed to the next step's sum
        self.balancer = ShardBalancer(comm.size, enabled=cfg.balance)
        self.examples_by_rank = np.zeros(comm.size, np.int64)           # since the caller last reset them:
        self.seconds_by_rank = np.zeros(comm.size, np.float64)          # work and compute time of every rank
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
        """One synchronized SGD step -> StepResult. `stop` is true when any rank asked to stop: the vote
        travels with the gradients, so all ranks stop after the same step."""
        idx = self._batch_indices()
        B, lr = len(idx), self.schedule(self.step) * self.lr_scale
        cuts = self._cuts(B)                                                    # [dist] every rank's share
        reducer = self.reducer
        reducer.begin()
        t0 = time.perf_counter()
        for lo, hi in reducer.pieces(cuts[self.comm.rank], cuts[self.comm.rank + 1]):   # this rank's shard
            x, y = self._examples(idx, lo, hi)
            reducer.add(*self.model.loss_and_grad(x, y, scale=1.0, ready=reducer.ready, before=reducer.before))
        seconds = time.perf_counter() - t0 - reducer.waited
        stats = reducer.sum(stop_request, seconds)                              # [dist] over all ranks
        if not math.isfinite(stats.loss_sum):
            raise TrainingError(f"loss is {stats.loss_sum} at step {self.step}: training diverged "
                                f"(lower --lr, or check the data)", kind="diverged")
        self._observe(np.diff(cuts), stats.seconds)                             # [dist]
        reducer.update(lambda part: self._apply(part, B, lr))                   # [dist] now, or when needed
        self.step += 1
        self.pos += 1
        if self.pos == self.steps_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        return StepResult(B, stats.loss_sum, stats.correct, stats.stop, lr)

    def _cuts(self, B):
        """[dist] Rank r takes global-batch positions [cuts[r], cuts[r + 1]): whole micro-batches in
        deterministic mode."""
        if self.cfg.deterministic:
            m = self.cfg.micro_batch
            return np.minimum(self.balancer.plan(-(-B // m)) * m, B)
        return self.balancer.plan(B, quantum=BALANCE_QUANTUM)

    def _observe(self, sizes, seconds):
        """[dist] Each rank's share and compute time: the balancer's measurement and the epoch's figures."""
        self.balancer.observe(sizes, seconds)
        self.examples_by_rank += sizes
        self.seconds_by_rank += seconds
        self.step_compute_seconds = seconds

    def _apply(self, part, B, lr):
        """Update the flat range `part` from its summed gradient, averaged over the global batch."""
        self._add_carry(part)
        self.model.grads[part] *= np.float32(1.0 / B)
        self.opt.step(self.model.grads, lr, part)

    def settle(self):
        """[dist] Finish what the last step still owes (pipelined: its last layers' update). Every rank calls
        this at the same points: before anything reads or writes the parameters between steps (evaluation,
        checks, checkpoints)."""
        self.reducer.settle()

    def _add_carry(self, part):
        """[dist] Add the residuals a resumed run could not hand back to the ranks that rounded them (another
        rank count, bucket plan or allreduce dtype) to the summed gradient, once, alike on every rank: the
        sum of the applied gradients then loses nothing to the restart."""
        if self._carry is not None:
            self.model.grads[part] += self._carry[part]
            if part.stop == NUM_PARAMS:
                self._carry = None

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
        raise TrainingError(f"replicas out of sync at step {self.step}: {who} (parameter checksums differ)", kind="replicas")

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
        residuals, state = None, self.reducer.state()
        if state is not None:
            mine, meta["allreduce"] = state
            residuals = self.comm.allgather(mine)                               # [dist] (ranks, NUM_PARAMS)
        return self.model.named_params(), self.opt.state_dict()["velocity"], meta, residuals

    def restore(self, ckpt: Checkpoint | None):
        """Every rank calls this; rank 0's checkpoint (others pass None) is broadcast to all. Residuals of a
        half-precision run go back to the ranks that rounded them when this run has as many ranks and sends
        the same buckets in the same dtype (then it rounds as the uninterrupted run would, bit for bit);
        otherwise their sum joins the next step's summed gradient (see _add_carry)."""
        self.settle()
        state = np.zeros(5, np.int64)           # step, epoch, pos, ranks that saved residuals, "as saved"
        if self.comm.rank == 0:
            self.model.load_named(ckpt.params)
            self.opt.load_state_dict({"velocity": ckpt.velocity})
            state[:3] = (ckpt.meta["step"], ckpt.meta["epoch"], ckpt.meta["pos"])
            if ckpt.residual is not None:
                state[3] = len(ckpt.residual)
                state[4] = len(ckpt.residual) == self.comm.size and self.reducer.takes(ckpt.meta["allreduce"])
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
            self.reducer.load_state(rows[self.comm.rank], [None if np.isnan(v) else float(v) for v in scales])
        elif state[3]:
            carry = ckpt.residual.sum(0, dtype=np.float64).astype(np.float32) if self.comm.rank == 0 \
                else np.empty(NUM_PARAMS, np.float32)
            self._carry = self.comm.bcast_(carry)                               # [dist]
        if self.pos >= self.steps_per_epoch or self.step != self.epoch * self.steps_per_epoch + self.pos:
            raise TrainingError(f"checkpoint position (step {self.step}, epoch {self.epoch}, batch {self.pos}) "
                                f"does not fit {self.steps_per_epoch} batches per epoch: was it made with "
                                f"another --batch-size or data set?")
