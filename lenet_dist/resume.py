"""Whether and how a run goes on from a checkpoint: which file, which configuration. No flags parsed here.

A resumed run continues the configuration saved in the checkpoint. A value the user gave again on the
command line that differs from it is an error listing each difference, unless the user names it in
`override` (to train longer, lower the rate, ...); then it is applied and recorded in the meta
(`config_changes`). A few values cannot change in the middle of a run at all (FIXED).
"""
from __future__ import annotations

import time

from .checkpoint import CheckpointError, list_checkpoints, load_file
from .data.split import val_size_of
from .errors import ResumeError
from .sampler import steps_per_epoch

# keys that no override can change mid-run, and why
FIXED = {"batch_size": "the saved data position counts batches of the saved size",
         "seed": "the data order of the epoch in progress derives from it",
         "train_subset": "the saved data position counts within the saved subset",
         "val_size": "the examples trained on (and the saved data position) depend on the held-out split"}


def flag(key):
    return "--" + key.replace("_", "-")


def differences(saved, requested, given):
    """[(key, saved value, requested value)] for every key in `given` (what the user typed) whose requested
    value differs from the saved one. Any saved-vs-requested comparison (config, data identity) uses this."""
    return [(k, saved.get(k), requested[k]) for k in sorted(given) if k in requested and saved.get(k) != requested[k]]


def resolve(saved, requested, given, override=(), *, what="the checkpoint"):
    """(the dict to go on with, {key: [saved, new]}) from the saved dict and the user's. ResumeError listing
    every difference not named in `override`, or naming an override that cannot be honoured."""
    diffs = differences(saved, requested, given)
    override = set(override)
    refused = [d for d in diffs if d[0] not in override]
    if refused:
        listed = "; ".join(f"{flag(k)} {new!r} (saved: {old!r})" for k, old, new in refused)
        names = ",".join(k.replace("_", "-") for k, _, _ in refused)
        raise ResumeError(f"--resume continues the configuration of {what}, and the command line differs: {listed}; "
                          f"drop those flags to continue as saved, or add --override {names} to change them on purpose")
    fixed = [(k, FIXED[k]) for k, _, _ in diffs if k in FIXED]
    if fixed:
        raise ResumeError("cannot change on resume: " + "; ".join(f"{flag(k)} ({why})" for k, why in fixed)
                          + "; start a new run instead")
    changes = {k: [old, new] for k, old, new in diffs}
    return dict(saved, **{k: new for k, (_, new) in changes.items()}), changes


def change_record(step, changes):
    """One entry of meta['config_changes']."""
    return {"step": int(step), "time": round(time.time(), 3), "changes": changes}


def position_problem(meta, n_examples):
    """Why a checkpoint's (step, epoch, pos) cannot be a position of its own run over n_examples, or None."""
    cfg = meta.get("config")
    batch = cfg.get("batch_size") if isinstance(cfg, dict) else None
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        return f"its config has no usable batch_size ({batch!r})"
    subset = cfg.get("train_subset") or 0
    n = min(subset, n_examples) if isinstance(subset, int) and subset > 0 else n_examples
    val = cfg.get("val_size")
    n -= val_size_of(n, val if isinstance(val, int) and not isinstance(val, bool) else None)   # held out
    steps = steps_per_epoch(max(n, 1), batch)
    if meta["pos"] >= steps or meta["step"] != meta["epoch"] * steps + meta["pos"]:
        return (f"its position (step {meta['step']}, epoch {meta['epoch']}, batch {meta['pos']}) does not fit "
                f"{steps} batches of {batch} per epoch")
    return None


def newest_usable(directory, n_examples, warn=print):
    """The newest checkpoint in `directory` that can be resumed from, as (path, Checkpoint), or None.
    Anything unusable (not a regular file, too big, corrupt, named for another step, a position that does
    not fit the data) is skipped with a warning naming it."""
    for step, path in list_checkpoints(directory):
        try:
            ckpt = load_file(path)
            if ckpt.step != step:
                raise CheckpointError(f"{path}: named for step {step}, its meta says step {ckpt.step}")
            problem = position_problem(ckpt.meta, n_examples)
            if problem:
                raise CheckpointError(f"{path}: {problem}")
        except CheckpointError as e:
            warn(f"skipping checkpoint: {e}")
            continue
        return path, ckpt
    return None
