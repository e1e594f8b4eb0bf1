"""A run's start-up around its checkpoint folder: claim it for a fresh run or pick the checkpoint to resume
from and settle the configuration, then hold the writer. Rank 0 decides; every rank gets the configuration
to train with. Errors here end the job before the first step and before anything is written (ResumeError,
on every rank alike, so that rank 0 alone says it and a restart launcher does not try again)."""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path

from lenet_dist.checkpoints import folder as ckptdir, resume
from lenet_dist.comm import bcast_json
from lenet_dist.config import TrainConfig
from lenet_dist.errors import ResumeError, UsageError

RUNS = Path("runs")         # a run without --checkpoint-dir keeps its model in a folder of its own under it


@dataclass(frozen=True)
class FolderPlan:
    """How a run uses its checkpoint folder (from lenet-train's flags)."""
    directory: Path | None = None       # --checkpoint-dir; None: no checkpoints on disk
    keep: int = 3                       # checkpoints of this run kept
    resume: str | None = None           # None: a new run; "on": continue it or stop; "auto": start if fresh
    start_over: bool = False            # a new run may move another run's checkpoints aside
    given: frozenset = frozenset()      # the TrainConfig fields typed on the command line
    override: frozenset = frozenset()   # those meant to replace the saved values on resume
    run_folder: bool = False            # no --checkpoint-dir (nor --no-save): a new folder runs/<name>/
    run_name: str | None = None         # --run-name: that <name> (else a timestamp and a short id)


def run_folder_name(now=None):
    """A new run folder's name: sortable by its start (UTC), with a short id against two runs in one second."""
    return time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime(now)) + "-" + secrets.token_hex(2)


def settle_folder(plan, facts, comm):
    """-> (plan, facts) with the run's folder: for a run without --checkpoint-dir, runs/<name>/ under the
    current directory, made by rank 0 and the same path on every rank, holding the checkpoints and (without
    --metrics) metrics.jsonl; both unchanged otherwise. A folder that cannot be made is a UsageError on every
    rank alike."""
    if not plan.run_folder:
        return plan, facts
    path, refused = None, None
    if comm.rank == 0:
        try:
            path = _make_run_folder(plan.run_name)
        except OSError as e:
            refused = (f"cannot create the run folder {e.filename or RUNS}: {e.strerror or e} (--checkpoint-dir "
                       f"DIR keeps the run elsewhere, --no-save keeps nothing)")
    settled = bcast_json(comm, {"refused": refused} if refused else {"path": str(path)})
    if "refused" in settled:
        raise UsageError(settled["refused"])
    path = Path(settled["path"])
    # the commands printed to go on name the folder; a --run-name in them names it already
    argv = facts.argv if plan.run_name else (*facts.argv, "--checkpoint-dir", str(path))
    facts = replace(facts, checkpoint_dir=path, metrics=facts.metrics or path / "metrics.jsonl", argv=argv)
    return replace(plan, directory=path, run_folder=False), facts


def _make_run_folder(name):
    """Rank 0: runs/<name>. A named one is made by the checkpoint writer, and refused by claim() when it
    holds another run, as a --checkpoint-dir is; a new name is made here, so that no other run takes it."""
    if name:
        return RUNS / name
    for _ in range(8):
        path = RUNS / run_folder_name()
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(17, "no free name", str(RUNS))


class RunState:
    """What rank 0 adds to every checkpoint it writes (run_id, run_name, config_changes) and where it writes
    them. `name`: the run's name, its folder's (None without one: evaluators then name it by its id)."""

    def __init__(self, run_id, changes=(), writer=None, resumed_from=None, name=None):
        self.run_id, self.config_changes, self.writer = run_id, list(changes), writer
        self.resumed_from, self.name = resumed_from, name

    def meta(self, meta):
        named = {"run_name": self.name} if self.name else {}
        return dict(meta, run_id=self.run_id, **named, config_changes=self.config_changes)

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
            # a checkpoint from before validation splits trained on every example: it goes on with none;
            # one from before label smoothing trained without it
            saved = {**TrainConfig().to_dict(), "val_size": 0, "label_smoothing": 0.0, **saved}
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
    name = plan.directory.resolve().name if plan.directory else None
    return cfg, found and found[1], RunState(run_id, changes, writer, found and found[0], name)
