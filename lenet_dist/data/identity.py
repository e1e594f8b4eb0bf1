"""Which data a run used: the identity of its files and its validation split, as recorded in every
checkpoint's meta ("data"), so that an evaluator scores a checkpoint only on the data it was trained for
and a resume on other data is refused.

    record = data_record(dataset.identity(), n, val_size, seed)  # -> meta["data"]
    why = data_mismatch(meta.get("data"), dataset.identity())   # None when the files are the same
"""
from __future__ import annotations

from lenet_dist.data.split import indices_sha256, validation_split


def data_record(identity: dict, n: int, val_size: int, seed: int) -> dict:
    """meta["data"]: the files' identity, and the split (rebuilt by validation_split, checked by its hash)."""
    _, val = validation_split(n, val_size, seed)
    return dict(identity, split={"of": n, "val_size": val_size, "seed": seed, "val_sha256": indices_sha256(val)})


def data_mismatch(recorded: dict | None, identity: dict) -> str | None:
    """Why a checkpoint's meta["data"] is not this data, or None. The files decide, by sha256; the names
    (the same files may be loaded as "mnist" or as "idx") only tell the user which is which."""
    if not recorded:
        return None                 # a checkpoint from before data identities: nothing to compare
    theirs, ours = recorded.get("sha256") or {}, identity["sha256"]
    differ = [k for k in sorted(ours) if theirs.get(k) != ours[k]]
    if not differ:
        return None
    k = differ[0]
    return (f"{len(differ)} of {len(ours)} files differ: it was trained on {recorded.get('name')!r} whose "
            f"{k.replace('_', ' ')} have sha256 {str(theirs.get(k))[:12]}..., this is {identity['name']!r} with "
            f"{ours[k][:12]}...")
