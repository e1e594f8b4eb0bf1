"""Checkpoints are data, not code: named arrays plus one JSON metadata entry in an .npz file.

Layout of a checkpoint (format_version 1):
    conv1.weight ... fc3.bias   the ten parameters, float32, PyTorch layout (model.PARAM_SPECS)
    optim.velocity              the SGD momentum buffer, float32, flat, in the same order
    optim.residual              only from a run whose gradients travel in half precision: each rank's
                                error-feedback residual (what rounding lost, owed to its next gradient),
                                float32 (ranks, NUM_PARAMS); meta.allreduce then holds the agreed scales
    meta                        uint8 bytes of a JSON object: format_version, step, epoch, pos (batches done
                                in the epoch), config, ranks, final, created, rng (how to redraw every
                                random number), content_sha256 (over every array above, in order)

Loaded with allow_pickle=False and checked entry by entry (names, shapes, dtypes, the content hash) before
anything uses it. Written by files.atomic_write or ckptdir.CheckpointWriter: never seen half-written.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lenet_dist.files import atomic_write, read_regular, rename_durably, temp_name
from lenet_dist.nn.model import NUM_PARAMS, PARAM_SPECS

FORMAT_VERSION = 1
MAX_BYTES = 16 << 20            # a real checkpoint is ~0.5 MB; anything near this is not one of ours
MAX_ABS = 1e6                   # |parameter|, |velocity|, |residual| beyond this: not a usable model (LeNet-5's
                                # stay below ~10; a run that got there has diverged; docs/restarts.md)
_NAME = re.compile(r"^ckpt-(\d{9})\.npz$")


class CheckpointError(Exception):
    """A checkpoint is unreadable, corrupt or not for this architecture; the message is one line."""


@dataclass
class Checkpoint:
    params: dict        # name -> float32 array, PARAM_SPECS shapes
    velocity: np.ndarray  # (NUM_PARAMS,) float32
    meta: dict
    residual: np.ndarray | None = None  # (meta ranks, NUM_PARAMS) float32: half-precision runs only

    @property
    def step(self):
        return int(self.meta["step"])


def _content_hash(params, velocity, residual=None):
    h = hashlib.sha256()
    for name, _ in PARAM_SPECS:
        h.update(np.ascontiguousarray(params[name], dtype="<f4").tobytes())
    h.update(np.ascontiguousarray(velocity, dtype="<f4").tobytes())
    if residual is not None:                    # absent: the hash of every checkpoint without one is unchanged
        h.update(np.ascontiguousarray(residual, dtype="<f4").tobytes())
    return h.hexdigest()


def to_bytes(params, velocity, meta, residual=None):
    """Serialize; `params` maps each PARAM_SPECS name to an array, `meta` is a JSON-able dict, `residual`
    (optional) the (ranks, NUM_PARAMS) error-feedback residuals of a half-precision run."""
    meta = dict(meta, format_version=FORMAT_VERSION, content_sha256=_content_hash(params, velocity, residual))
    arrays = {name: np.asarray(params[name], dtype=np.float32) for name, _ in PARAM_SPECS}
    arrays["optim.velocity"] = np.asarray(velocity, dtype=np.float32)
    if residual is not None:
        arrays["optim.residual"] = np.asarray(residual, dtype=np.float32)
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def from_bytes(data, *, name="checkpoint"):
    """Parse and verify; raises CheckpointError naming what is wrong."""
    if len(data) > MAX_BYTES:
        raise CheckpointError(f"{name}: {len(data)} bytes, more than the {MAX_BYTES} a checkpoint can be")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:  # refuse zip bombs before numpy inflates anything
            inflated = sum(i.file_size for i in z.infolist())
        if inflated > MAX_BYTES:
            raise CheckpointError(f"{name}: entries inflate to {inflated} bytes, more than {MAX_BYTES}")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy raises many types on a damaged header; all mean corrupt
        raise CheckpointError(f"{name}: not a readable .npz checkpoint: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return _verify(arrays, name)


def _verify(arrays, name):
    if "meta" not in arrays:
        raise CheckpointError(f"{name}: no 'meta' entry")
    try:
        meta = json.loads(arrays["meta"].astype(np.uint8).tobytes().decode())
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except Exception:
        raise CheckpointError(f"{name}: 'meta' is not a JSON object") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{name}: format_version {version!r}, this program reads {FORMAT_VERSION}")
    for key in ("step", "epoch", "pos"):
        if not isinstance(meta.get(key), int) or meta[key] < 0:
            raise CheckpointError(f"{name}: meta.{key} must be an integer >= 0, got {meta.get(key)!r}")
    not_arrays = sorted(k for k, a in arrays.items() if not isinstance(a, np.ndarray))
    if not_arrays:
        raise CheckpointError(f"{name}: entries {', '.join(not_arrays)} are not .npy arrays")
    params = {}
    for pname, shape in PARAM_SPECS:
        a = arrays.get(pname)
        if a is None:
            raise CheckpointError(f"{name}: missing array {pname}")
        if a.dtype != np.float32 or a.shape != shape:
            raise CheckpointError(f"{name}: {pname} is {a.dtype}{a.shape}, expected float32{shape}")
        params[pname] = a
    v = arrays.get("optim.velocity")
    if v is None or v.dtype != np.float32 or v.shape != (NUM_PARAMS,):
        got = "missing" if v is None else f"{v.dtype}{v.shape}"
        raise CheckpointError(f"{name}: optim.velocity is {got}, expected float32({NUM_PARAMS},)")
    extra = sorted(set(arrays) - {n for n, _ in PARAM_SPECS} - {"optim.velocity", "optim.residual", "meta"})
    if extra:
        raise CheckpointError(f"{name}: unexpected arrays {', '.join(extra)}")
    r = arrays.get("optim.residual")
    if r is not None:
        ranks = meta.get("ranks")
        if not isinstance(ranks, int) or r.dtype != np.float32 or r.shape != (ranks, NUM_PARAMS):
            raise CheckpointError(f"{name}: optim.residual is {r.dtype}{r.shape}, expected float32"
                                  f"({ranks!r}, {NUM_PARAMS}) for meta.ranks {ranks!r}")
        if not isinstance(meta.get("allreduce"), dict):
            raise CheckpointError(f"{name}: optim.residual without meta.allreduce")
    if _content_hash(params, v, r) != meta.get("content_sha256"):
        raise CheckpointError(f"{name}: content sha256 does not match meta.content_sha256 (corrupt)")
    for pname, a in [*params.items(), ("optim.velocity", v), *([("optim.residual", r)] if r is not None else [])]:
        if not np.isfinite(a).all():
            raise CheckpointError(f"{name}: {pname} holds NaN or Inf")
        if a.size and np.abs(a).max() > MAX_ABS:
            raise CheckpointError(f"{name}: {pname} holds {float(np.abs(a).max()):.3g}, beyond the {MAX_ABS:g} a "
                                  f"trained network's values stay within")
    return Checkpoint(params=params, velocity=v, meta=meta, residual=r)


# ------------------------------------------------------------------------------------------- directories

def file_name(step):
    return f"ckpt-{step:09d}.npz"


def read_bounded(path, max_bytes=MAX_BYTES):
    """The bytes of `path` if it is a regular file of at most max_bytes; CheckpointError naming it if not.
    Never blocks on a FIFO and never reads a file whole before knowing its size (files.read_regular)."""
    try:
        return read_regular(path, max_bytes)
    except OSError as e:
        said = f"cannot read: {e.strerror}" if e.errno is not None else str(e).removeprefix(f"{path}: ")
        raise CheckpointError(f"{path}: {said}".replace(" allowed", " a checkpoint can be")) from None


def set_pointer(directory, entry, target, info=None):
    """Make `directory/<entry>.npz` (entry "last" or "best") the checkpoint file `target` of the same folder,
    and `<entry>.json` say which one: {"file": its name, **info}. The .npz is a hard link, a real file that
    any tool opens and that outlives the pruning of `target` (a copy where links are not supported); both
    are replaced atomically and durably (files.rename_durably, files.atomic_write). Their names do not match checkpoint names: resume and --watch ignore them."""
    d, target = Path(directory), Path(target)
    tmp = temp_name(d / f"{entry}.npz")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
        rename_durably(tmp, d / f"{entry}.npz")
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write(d / f"{entry}.npz", target.read_bytes())
    atomic_write(d / f"{entry}.json", json.dumps({"file": target.name, **(info or {})}).encode())


def list_checkpoints(directory):
    """[(step, path)] of the trainer's checkpoints in `directory`, newest first (copies named *best* and
    anything else are not ours and are ignored)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def load_file(path):
    return from_bytes(read_bounded(path), name=str(path))

