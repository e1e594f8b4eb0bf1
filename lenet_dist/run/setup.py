"""A run's start-up around its checkpoint folder: claim it for a fresh run or pick the checkpoint to resume
from and settle the configuration, then hold the writer. Rank 0 decides; every rank gets the configuration
to train with. Errors here end the job before the first step and before anything is written (ResumeError,
on every rank alike, so that rank 0 alone says it and a restart launcher does not try again)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import ckptdir, resume
from ..comm import bcast_json
from ..config import TrainConfig
from ..errors import ResumeError


@dataclass(frozen=True)
class FolderPlan:
    """How a run uses its checkpoint folder (from lenet-train's flags)."""
    directory: Path | None = None       # --checkpoint-dir; None: no checkpoints on disk
    keep: int = 3                       # checkpoints of this run kept
    resume: str | None = None           # None: a new run; "on": continue it or stop; "auto": start if fresh
    start_over: bool = False            # a new run may move another run's checkpoints aside
    given: frozenset = frozenset()      # the TrainConfig fields typed on the command line
    override: frozenset = frozenset()   # those meant to replace the saved values on resume


class RunState:
    """What rank 0 adds to every checkpoint it writes (run_id, config_changes) and where it writes them."""

    def __init__(self, run_id, changes=(), writer=None, resumed_from=None):
        self.run_id, self.config_changes, self.writer = run_id, list(changes), writer
        self.resumed_from = resumed_from

    def meta(self, meta):
        return dict(meta, run_id=self.run_id, config_changes=self.config_changes)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def prepare(config, plan, comm, data, log):
    """-> (TrainConfig, the Checkpoint to restore from on rank 0 or None, RunState on rank 0 or None).
    Every rank calls it; the returned config is the same on all. A refusal (ResumeError) is raised on every
    rank alike, before anything is written, so that rank 0 alone says it."""
    cfg, found, state, refused = config, None, None, None
    if comm.rank == 0:
        try:
            cfg, found, state = _decide(config, plan, data, log)
        except ResumeError as e:
            refused = str(e)
    settled = bcast_json(comm, {"refused": refused} if refused else {"config": cfg.to_dict()})
    if "refused" in settled:
        raise ResumeError(settled["refused"])
    return TrainConfig.from_dict(settled["config"]), found, state


def _decide(config, plan, data, log):
    run_id, changes, own, found = ckptdir.new_run_id(), [], [], None
    cfg = config
    if plan.resume:
        found = resume.choose(plan.directory, len(data.train_images), data.identity(),
                              auto=plan.resume == "auto", warn=log.warning)
        if found is None:
            log.info("--resume auto: %s holds no run yet: starting one", plan.directory)
        else:
            path, ckpt = found
            saved = ckpt.meta["config"]
            # a checkpoint from before validation splits trained on every example: it goes on with none
            saved = {**TrainConfig().to_dict(), "val_size": 0, **saved}
            merged, diff = resume.resolve(saved, cfg.to_dict(), plan.given, plan.override, what=str(path))
            try:
                cfg = TrainConfig.from_dict(merged)
            except ValueError as e:
                raise ResumeError(f"{path}: its configuration is not usable: {e}") from None
            run_id = ckpt.meta.get("run_id") or run_id
            changes = list(ckpt.meta.get("config_changes") or [])
            if diff:
                changes.append(resume.change_record(ckpt.step, diff))
                log.warning("resuming with a changed configuration (--override): %s",
                            ", ".join(f"{resume.flag(k)} {old!r} -> {new!r}" for k, (old, new) in diff.items()))
            run = ckpt.meta.get("run_id")      # none: an older checkpoint; its neighbours are not provably ours
            own = (ckptdir.own_checkpoints(plan.directory, run, ckpt.step) if run else []) + [path]
    if not found and plan.directory and plan.directory.is_dir():
        ckptdir.claim(plan.directory, start_over=plan.start_over, log=log.warning)
    writer = None
    if plan.directory:
        writer = ckptdir.CheckpointWriter(plan.directory, keep=plan.keep, own=own, warn=log.warning)
    return cfg, found and found[1], RunState(run_id, changes, writer, found and found[0])
