"""Whether and how a run goes on from a checkpoint: which file, which configuration. No flags parsed here.

A resumed run continues the configuration saved in the checkpoint. A value the user gave again on the
command line that differs from it is an error listing each difference, unless the user names it in
`override` (to train longer, lower the rate, ...); then it is applied and recorded in the meta
(`config_changes`). A few values cannot change in the middle of a run at all (FIXED).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from lenet_dist.checkpoints.folder import OWN_PREFIXES, SUPERSEDED
from lenet_dist.checkpoints.format import CheckpointError, list_checkpoints, load_file
from lenet_dist.data.identity import data_mismatch
from lenet_dist.data.sampler import steps_per_epoch
from lenet_dist.data.split import val_size_of
from lenet_dist.errors import ResumeError

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


def meta_problem(meta):
    """Why a verified checkpoint's meta (outside its content hash, so hand-editable) cannot be resumed from, or
    None: the fields a resume reads must have their types (a string or zero scale, `data: 5`, ...)."""
    if not isinstance(meta.get("config"), dict):
        return f"meta.config is {type(meta.get('config')).__name__}, not an object"
    data = meta.get("data")
    if data is not None and not (isinstance(data, dict) and isinstance(data.get("sha256", {}), dict)
                                 and isinstance(data.get("split", {}), dict)):
        return f"meta.data is {data!r:.40}, not a data identity"
    ranks = meta.get("ranks", 1)
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        return f"meta.ranks is {ranks!r:.40}, not a rank count"
    if not isinstance(meta.get("run_id", ""), str) or not isinstance(meta.get("config_changes", []), list):
        return "meta.run_id or meta.config_changes has the wrong type"
    allreduce = meta.get("allreduce")
    if allreduce is not None:
        scales = allreduce.get("scale") if isinstance(allreduce, dict) else None
        if not isinstance(scales, list) or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0)
                for v in scales):
            return f"meta.allreduce.scale is {scales!r:.60}, not a list of positive numbers (or null)"
    return None


def position_problem(meta, n_examples=None):
    """Why a checkpoint's (step, epoch, pos) cannot be a position of its own run over n_examples training
    examples (None: the number its meta.data records), or None."""
    cfg = meta.get("config")
    batch = cfg.get("batch_size") if isinstance(cfg, dict) else None
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        return f"its config has no usable batch_size ({batch!r})"
    if n_examples is None:
        n = ((meta.get("data") or {}).get("split") or {}).get("of")      # counted within the subset already
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            return None                             # nothing recorded to check against (an older checkpoint)
    else:
        subset = cfg.get("train_subset") or 0
        n = min(subset, n_examples) if isinstance(subset, int) and subset > 0 else n_examples
    val = cfg.get("val_size")
    n -= val_size_of(n, val if isinstance(val, int) and not isinstance(val, bool) else None)   # held out
    steps = steps_per_epoch(max(n, 1), batch)
    if meta["pos"] >= steps or meta["step"] != meta["epoch"] * steps + meta["pos"]:
        return (f"its position (step {meta['step']}, epoch {meta['epoch']}, batch {meta['pos']}) does not fit "
                f"{steps} batches of {batch} per epoch")
    return None


def newest_usable(directory, n_examples=None, warn=print, *, identity=None, for_resume=True):
    """The newest checkpoint in `directory` that can be resumed from, as (path, Checkpoint), or None. The one
    rule, shared by the trainer, lenet-launch and the watchers. Anything unusable is skipped with a warning
    naming it: not a regular file, too big, corrupt (content hash, NaN or absurd values: checkpoint.MAX_ABS),
    named for another step, hand-edited meta a resume cannot read (meta_problem), a position that does not
    fit n_examples (None: the data size the checkpoint records). `identity` (this data's, keyword-only): a readable checkpoint of
    other data is not skipped but refused (ResumeError saying what differs): identity before position.
    for_resume=False (an evaluator): a checkpoint that loads and is named for its step is usable."""
    for step, path in list_checkpoints(directory):
        try:
            ckpt = load_file(path)
            if ckpt.step != step:
                raise CheckpointError(f"{path}: named for step {step}, its meta says step {ckpt.step}")
            problem = meta_problem(ckpt.meta) if for_resume else None    # an evaluator needs the weights only
            if problem:
                raise CheckpointError(f"{path}: {problem}")
            if identity is not None:
                why = data_mismatch(ckpt.meta.get("data"), identity)
                if why:
                    raise ResumeError(f"{path} was trained on other data: {why}; resume with that run's data "
                                      f"flags (--dataset, --data-dir, --subset), or use a new --checkpoint-dir")
            problem = position_problem(ckpt.meta, n_examples) if for_resume else None
            if problem:
                raise CheckpointError(f"{path}: {problem}")
        except CheckpointError as e:
            warn(f"skipping checkpoint: {e}")
            continue
        return path, ckpt
    return None


def folder_is_fresh(directory):
    """True when `directory` is absent or holds nothing of a run: no checkpoint, no last/best pointer, no
    superseded-* folder (our own temp files aside: a crashed first start leaves one)."""
    d = Path(directory)
    if not d.exists():
        return True
    return not any(p.name.startswith((*OWN_PREFIXES, SUPERSEDED)) for p in d.iterdir())


def choose(directory, n_examples, identity, *, auto=False, warn=print):
    """--resume: (path, Checkpoint) to continue from; None only with auto=True and a fresh folder (start a new
    run). Anything else is a ResumeError saying why, raised before anything is written: a missing or empty
    folder (a mistyped path), checkpoints of other data, none usable."""
    d = Path(directory)
    if not d.is_dir():
        if auto and not d.exists():
            return None
        raise ResumeError(f"--resume: {d} {'is not a folder' if d.exists() else 'does not exist'}: nothing to "
                          f"continue (a mistyped --checkpoint-dir? a new run starts without --resume)")
    found = list_checkpoints(d)
    if not found:
        if auto and folder_is_fresh(d):
            return None
        raise ResumeError(f"--resume: {d} holds no checkpoint (ckpt-*.npz): nothing to continue (a mistyped "
                          f"--checkpoint-dir? a new run starts without --resume)")
    skipped = []
    got = newest_usable(d, n_examples, lambda m: (skipped.append(m), warn(m)), identity=identity)
    if got is None:
        first = skipped[0].removeprefix("skipping checkpoint: ") if skipped else "none could be read"
        raise ResumeError(f"--resume: none of the {len(found)} checkpoint(s) in {d} can be resumed from "
                          f"(newest: {first}); nothing was changed there")
    return got
