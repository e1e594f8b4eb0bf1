"""Checkpoints are data: round trip, atomic save and pruning, skipping broken files, and every kind of bad
file refused with a CheckpointError that says what is wrong. Also TrainConfig.from_dict's checks."""
import io
import json
import os
import tracemalloc
import zipfile

import numpy as np
import pytest

from lenet_dist.checkpoints import folder as ckptdir, format as checkpoint, resume
from lenet_dist.checkpoints.format import CheckpointError, from_bytes, MAX_BYTES, to_bytes
from lenet_dist.config import TrainConfig
from lenet_dist.files import atomic_write
from lenet_dist.nn.model import LeNet5, NUM_PARAMS, PARAM_SPECS

NAMES = [n for n, _ in PARAM_SPECS]


def content(seed=0, step=5):
    params = {k: v.copy() for k, v in LeNet5(seed).named_params().items()}
    velocity = np.random.default_rng(seed).normal(size=NUM_PARAMS).astype(np.float32)
    meta = {"step": step, "epoch": 0, "pos": step, "ranks": 1, "config": TrainConfig(seed=seed).to_dict()}
    return params, velocity, meta


def arrays_of(data):
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def npz(arrays, compressed=False):
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def meta_array(meta):
    return np.frombuffer(json.dumps(meta).encode(), np.uint8)


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def good():
    return to_bytes(*content())


# ------------------------------------------------------------------------------------------ round trip

def test_round_trip(good):
    params, velocity, meta = content()
    ck = from_bytes(good)
    assert list(ck.params) == NAMES
    for name, shape in PARAM_SPECS:
        assert ck.params[name].shape == shape and ck.params[name].dtype == np.float32
        np.testing.assert_array_equal(ck.params[name], params[name])
    np.testing.assert_array_equal(ck.velocity, velocity)
    assert ck.velocity.dtype == np.float32
    assert ck.step == 5 and ck.meta["epoch"] == 0 and ck.meta["pos"] == 5
    assert ck.meta["config"] == meta["config"]
    assert TrainConfig.from_dict(ck.meta["config"]) == TrainConfig(seed=0)
    assert ck.meta["format_version"] == checkpoint.FORMAT_VERSION
    assert len(ck.meta["content_sha256"]) == 64


def test_layout_is_the_documented_one(good):
    arrays = arrays_of(good)
    assert set(arrays) == set(NAMES) | {"optim.velocity", "meta"}     # ten parameters at top level
    for name, shape in PARAM_SPECS:
        assert arrays[name].shape == shape and arrays[name].dtype == np.float32
    json.loads(arrays["meta"].tobytes().decode())


def test_round_trip_is_byte_stable():
    params, velocity, meta = content(1)
    a = to_bytes(params, velocity, meta)
    ck = from_bytes(a)
    assert to_bytes(ck.params, ck.velocity, {k: v for k, v in ck.meta.items()}) == a


def test_float64_params_are_stored_as_float32():
    params, velocity, meta = content(2)
    ck = from_bytes(to_bytes({k: v.astype(np.float64) for k, v in params.items()}, velocity, meta))
    np.testing.assert_array_equal(ck.params["fc1.weight"], params["fc1.weight"])
    assert ck.params["fc1.weight"].dtype == np.float32


# ------------------------------------------------------------------------------------- corrupt input

def test_truncated_bytes(good):
    for cut in (len(good) // 2, len(good) - 1, 100, 0):
        with pytest.raises(CheckpointError) as e:
            from_bytes(good[:cut], name="ckpt-x")
        msg = one_line(e)
        assert "ckpt-x" in msg and "not a readable .npz" in msg


def test_random_bytes():
    data = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        from_bytes(data)


def test_plain_npy_is_not_a_checkpoint():
    buf = io.BytesIO()
    np.save(buf, np.zeros(10, np.float32))
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        from_bytes(buf.getvalue())


@pytest.mark.parametrize("name", ["fc2.bias", "conv1.weight", "optim.velocity", "meta"])
def test_missing_array(good, name):
    arrays = arrays_of(good)
    del arrays[name]
    with pytest.raises(CheckpointError) as e:
        from_bytes(npz(arrays))
    msg = one_line(e)
    assert name in msg and ("missing" in msg or "no " in msg), msg


def test_unexpected_extra_array(good):
    arrays = arrays_of(good)
    arrays["fc4.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected arrays fc4\.weight"):
        from_bytes(npz(arrays))


def test_wrong_shape(good):
    arrays = arrays_of(good)
    arrays["fc1.weight"] = np.ascontiguousarray(arrays["fc1.weight"].T)     # (400,120) instead of (120,400)
    with pytest.raises(CheckpointError) as e:
        from_bytes(npz(arrays))
    msg = one_line(e)
    assert "fc1.weight" in msg and "(400, 120)" in msg and "(120, 400)" in msg


def test_wrong_velocity_shape(good):
    arrays = arrays_of(good)
    arrays["optim.velocity"] = arrays["optim.velocity"][:-1]
    with pytest.raises(CheckpointError, match=rf"optim\.velocity.*{NUM_PARAMS - 1}"):
        from_bytes(npz(arrays))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, ">f4"])
def test_wrong_dtype(good, dtype):
    arrays = arrays_of(good)
    arrays["conv2.weight"] = arrays["conv2.weight"].astype(dtype)
    with pytest.raises(CheckpointError) as e:
        from_bytes(npz(arrays))
    msg = one_line(e)
    assert "conv2.weight" in msg and "float32" in msg


class _Trap:
    """Unpickling this runs os.mkdir(path): proof that a loader unpickled something."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_object_array_is_refused_without_unpickling(good, tmp_path):
    marker = tmp_path / "unpickled"
    for victim in ("fc3.bias", "meta"):
        arrays = arrays_of(good)
        arrays[victim] = np.array([_Trap(str(marker)), 1], dtype=object)
        data = npz(arrays)                          # np.savez pickles object arrays (allow_pickle=True)
        with pytest.raises(CheckpointError) as e:
            from_bytes(data)
        assert victim == "meta" or "not a readable .npz" in one_line(e)
        assert not marker.exists(), "the checkpoint loader unpickled an object array"
    # the trap is live: a pickle-enabled load would have run it
    with np.load(io.BytesIO(data), allow_pickle=True) as z:
        z["meta"]
    assert marker.exists()


def test_entry_that_is_not_an_npy_array(good):
    # a zip member under a parameter's name whose bytes are not an .npy array (np.load hands back bytes)
    arrays = arrays_of(good)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in arrays.items():
            if k == "fc2.weight":
                z.writestr("fc2.weight.npy", b"definitely not an npy array")
            else:
                inner = io.BytesIO()
                np.save(inner, v)
                z.writestr(k + ".npy", inner.getvalue())
    with pytest.raises(CheckpointError) as e:
        from_bytes(buf.getvalue())
    assert "fc2.weight" in one_line(e) or "not a readable" in one_line(e)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_parameter(bad):
    params, velocity, meta = content(3)
    params["fc2.weight"][3, 4] = bad
    data = to_bytes(params, velocity, meta)            # a consistent hash: only the NaN check can refuse it
    with pytest.raises(CheckpointError) as e:
        from_bytes(data)
    msg = one_line(e)
    assert "fc2.weight" in msg and "NaN" in msg


def test_content_hash_mismatch(good):
    arrays = arrays_of(good)
    arrays["fc3.weight"] = arrays["fc3.weight"].copy()
    arrays["fc3.weight"][0, 0] = np.nextafter(arrays["fc3.weight"][0, 0], np.float32(np.inf))  # one ulp
    with pytest.raises(CheckpointError, match="sha256"):
        from_bytes(npz(arrays))
    # the same for the velocity, which the hash covers too
    arrays = arrays_of(good)
    arrays["optim.velocity"] = -arrays["optim.velocity"]
    with pytest.raises(CheckpointError, match="sha256"):
        from_bytes(npz(arrays))


def test_future_format_version(good):
    arrays = arrays_of(good)
    meta = json.loads(arrays["meta"].tobytes().decode())
    meta["format_version"] = checkpoint.FORMAT_VERSION + 1
    arrays["meta"] = meta_array(meta)
    with pytest.raises(CheckpointError) as e:
        from_bytes(npz(arrays))
    msg = one_line(e)
    assert "format_version" in msg and str(checkpoint.FORMAT_VERSION + 1) in msg


@pytest.mark.parametrize("field,value", [("step", -1), ("epoch", "3"), ("pos", None), ("step", 2.5)])
def test_bad_position_in_meta(good, field, value):
    arrays = arrays_of(good)
    meta = json.loads(arrays["meta"].tobytes().decode())
    meta[field] = value
    arrays["meta"] = meta_array(meta)
    with pytest.raises(CheckpointError, match=rf"meta\.{field}"):
        from_bytes(npz(arrays))


def test_meta_that_is_not_json(good):
    arrays = arrays_of(good)
    arrays["meta"] = np.frombuffer(b"{not json", np.uint8)
    with pytest.raises(CheckpointError, match="meta"):
        from_bytes(npz(arrays))
    arrays["meta"] = meta_array([1, 2, 3])
    with pytest.raises(CheckpointError, match="JSON object"):
        from_bytes(npz(arrays))


def test_zip_bomb_is_refused_before_inflating(good):
    arrays = arrays_of(good)
    arrays["bomb"] = np.zeros(MAX_BYTES + 1, np.uint8)             # deflates to a few kB
    data = npz(arrays, compressed=True)
    assert len(data) < MAX_BYTES // 16
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as e:
            from_bytes(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = one_line(e)
    assert "inflate" in msg and str(MAX_BYTES) in msg
    assert peak < MAX_BYTES // 4, f"{peak} bytes allocated while refusing a bomb"


def test_oversized_input():
    with pytest.raises(CheckpointError, match=str(MAX_BYTES)):
        from_bytes(b"\0" * (MAX_BYTES + 1))


def test_single_flipped_bytes_never_pass_as_a_different_checkpoint(good):
    """Flip one byte at many places (headers, npy headers, data, central directory): the result is either
    refused with a CheckpointError or, where zip ignores the byte, loads the very same content."""
    ref = from_bytes(good)
    rng = np.random.default_rng(5)
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        starts = [i.header_offset for i in z.infolist()]
    # every byte of the first entry's zip and .npy headers, a sample of the other entries' headers, of the
    # central directory at the end, and of the data
    positions = set(range(0, 200))
    for s in starts[1:]:
        positions |= {s + int(i) for i in rng.choice(200, 50, replace=False)}
    positions |= {len(good) - 1 - int(i) for i in rng.choice(1200, 300, replace=False)}
    positions |= {int(p) for p in rng.integers(0, len(good), 60)}
    problems = []
    for pos in sorted(positions):
        bad = bytearray(good)
        bad[pos] ^= 0x5A
        try:
            ck = from_bytes(bytes(bad))
        except CheckpointError:
            continue
        except Exception as e:                      # collect them all: the report names every byte
            problems.append(f"byte {pos}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        same = (all(np.array_equal(ck.params[n], ref.params[n]) for n in NAMES)
                and np.array_equal(ck.velocity, ref.velocity) and ck.meta == ref.meta)
        if not same:
            problems.append(f"byte {pos}: accepted with different content")
    kinds = sorted({p.split(": ")[1] for p in problems})
    assert not problems, f"{len(problems)} of {len(positions)} flips ({', '.join(kinds)}): " + "; ".join(problems[:5])


# --------------------------------------------------------------------------------------- directories

def test_save_names_and_prunes(tmp_path):
    d = tmp_path / "ckpts"
    d.mkdir()
    others = ["best.npz", "ckpt-000000002-best.npz", "model_best_acc.npz", "notes.txt", "ckpt-2.npz"]
    for name in others:
        (d / name).write_bytes(b"not ours " + name.encode())
    params, velocity, meta = content(4)
    written = {}
    for step in (1, 2, 3, 4, 5, 6):
        path, data = ckptdir.save(d, params, velocity, dict(meta, step=step, pos=step), keep=3)
        assert path == d / f"ckpt-{step:09d}.npz"
        assert path.read_bytes() == data
        assert from_bytes(data).step == step
        written[step] = path
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(others + [f"ckpt-{s:09d}.npz" for s in (4, 5, 6)])   # no temp file left either
    for name in others:
        assert (d / name).read_bytes() == b"not ours " + name.encode()
    assert [s for s, _ in checkpoint.list_checkpoints(d)] == [6, 5, 4]
    assert "created" in from_bytes(written[6].read_bytes()).meta


def test_save_creates_the_directory_and_overwrites_the_same_step(tmp_path):
    d = tmp_path / "a" / "b"
    params, velocity, meta = content(5)
    ckptdir.save(d, params, velocity, dict(meta, step=7, pos=7))
    params["fc3.bias"][:] = 1.0
    path, _ = ckptdir.save(d, params, velocity, dict(meta, step=7, pos=7))
    np.testing.assert_array_equal(checkpoint.load_file(path).params["fc3.bias"], 1.0)
    assert [p.name for p in d.iterdir()] == ["ckpt-000000007.npz"]


def test_save_atomic_leaves_no_temp_and_replaces(tmp_path):
    target = tmp_path / "x.npz"
    target.write_bytes(b"old")
    atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]


def _write_steps(d, steps):
    params, velocity, meta = content(6)
    for s in steps:
        ckptdir.save(d, params, velocity, dict(meta, step=s, pos=s), keep=10)
    return {s: d / checkpoint.file_name(s) for s in steps}


def test_newest_usable_returns_the_newest(tmp_path):
    paths = _write_steps(tmp_path, [10, 20, 30])
    warnings = []
    path, ck = resume.newest_usable(tmp_path, warn=warnings.append)
    assert path == paths[30] and ck.step == 30 and warnings == []


def test_newest_usable_skips_a_truncated_newest(tmp_path):
    paths = _write_steps(tmp_path, [10, 20, 30])
    data = paths[30].read_bytes()
    paths[30].write_bytes(data[:len(data) // 3])
    warnings = []
    path, ck = resume.newest_usable(tmp_path, warn=warnings.append)
    assert path == paths[20] and ck.step == 20
    assert len(warnings) == 1 and paths[30].name in warnings[0]


def test_newest_usable_skips_a_flipped_byte(tmp_path):
    paths = _write_steps(tmp_path, [10, 20, 30])
    data = bytearray(paths[30].read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        info = z.getinfo("fc1.weight.npy")
    pos = info.header_offset + 30 + len(info.filename) + 128 + 1000    # inside fc1.weight's numbers
    assert pos < info.header_offset + info.compress_size
    data[pos] ^= 0x01
    paths[30].write_bytes(bytes(data))
    warnings = []
    path, ck = resume.newest_usable(tmp_path, warn=warnings.append)
    assert path == paths[20] and ck.step == 20
    assert len(warnings) == 1 and paths[30].name in warnings[0]


def test_newest_usable_skips_several_and_gives_none_when_all_are_bad(tmp_path):
    paths = _write_steps(tmp_path, [10, 20, 30])
    paths[30].write_bytes(b"")
    paths[20].write_bytes(b"garbage" * 100)
    warnings = []
    path, ck = resume.newest_usable(tmp_path, warn=warnings.append)
    assert path == paths[10] and ck.step == 10 and len(warnings) == 2
    paths[10].write_bytes(paths[10].read_bytes()[:-10])
    assert resume.newest_usable(tmp_path, warn=warnings.append) is None
    assert resume.newest_usable(tmp_path / "nonexistent", warn=warnings.append) is None


def test_load_file_missing(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        checkpoint.load_file(tmp_path / "ckpt-000000001.npz")


# ------------------------------------------------------------------------------------------ config

def test_config_round_trip():
    cfg = TrainConfig(epochs=3, lr=0.01, schedule="step", seed=9, deterministic=True)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig.from_dict({}) == TrainConfig()


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError) as e:
        TrainConfig.from_dict({"epochs": 2, "learning_rate": 0.1, "zzz": 1})
    assert "learning_rate" in str(e.value) and "zzz" in str(e.value)


@pytest.mark.parametrize("field,value", [
    ("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("lr", -0.1), ("lr", float("nan")), ("momentum", 1.0),
    ("momentum", -0.5), ("weight_decay", -1e-4), ("schedule", "linear"), ("warmup_epochs", -1.0),
    ("step_epochs", 0), ("gamma", 0.0), ("gamma", 1.5), ("augment_shift", 5), ("augment_shift", -1),
    ("micro_batch", 0), ("train_subset", -1),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError) as e:
        TrainConfig.from_dict({field: value})
    assert field in str(e.value) and repr(value) in str(e.value)


@pytest.mark.parametrize("field,value", [("epochs", "5"), ("batch_size", 2.5), ("lr", "0.1"), ("seed", "0")])
def test_config_rejects_wrong_types(field, value):
    # a config read back from JSON (a checkpoint, a file) can carry the wrong type: that is the world's
    # mistake, so a ValueError naming the field, not a TypeError from deep inside or a silent acceptance
    with pytest.raises(ValueError) as e:
        TrainConfig.from_dict({field: value})
    assert field in str(e.value)


# ----------------------------------------------------------------------- half-precision runs' residuals

def with_residual(ranks=2, seed=4):
    params, velocity, meta = content(seed)
    residual = np.random.default_rng(seed).normal(scale=1e-4, size=(ranks, NUM_PARAMS)).astype(np.float32)
    meta = dict(meta, ranks=ranks, allreduce={"dtype": "float16", "scale": [2.0 ** 10, None],
                                               "buckets": [[44426, NUM_PARAMS], [0, 44426]]})
    return params, velocity, meta, residual


def test_residuals_round_trip_and_are_in_the_content_hash():
    params, velocity, meta, residual = with_residual(3)
    data = to_bytes(params, velocity, meta, residual)
    ck = from_bytes(data)
    np.testing.assert_array_equal(ck.residual, residual)
    assert ck.meta["allreduce"]["scale"] == [1024.0, None]
    assert ck.meta["content_sha256"] != from_bytes(to_bytes(params, velocity, meta)).meta["content_sha256"]
    assert from_bytes(to_bytes(params, velocity, meta)).residual is None        # plain runs: no entry at all
    arrays = arrays_of(data)
    arrays["optim.residual"] = arrays["optim.residual"].copy()
    arrays["optim.residual"][2, 7] += np.float32(1e-3)
    with pytest.raises(CheckpointError, match="sha256"):
        from_bytes(npz(arrays))


@pytest.mark.parametrize("what", ["shape", "ranks", "dtype", "nan", "no-allreduce"])
def test_a_bad_residual_is_refused_in_one_line(what):
    params, velocity, meta, residual = with_residual(2)
    if what == "shape":
        residual = residual[:, :-1]
    elif what == "ranks":
        meta = dict(meta, ranks=3)
    elif what == "dtype":
        residual = residual.astype(np.float64)
    elif what == "nan":
        residual[1, 5] = np.nan
    else:
        meta = {k: v for k, v in meta.items() if k != "allreduce"}
    arrays = arrays_of(to_bytes(params, velocity, meta, residual))
    if what == "dtype":                                 # to_bytes stores float32: put the float64 back in
        arrays["optim.residual"] = residual
    with pytest.raises(CheckpointError) as e:
        from_bytes(npz(arrays))
    assert "optim.residual" in one_line(e) or "sha256" in one_line(e)
