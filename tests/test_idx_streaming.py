"""--dataset idx reads the IDX header first and streams the data it announces: a sparse file or a gzip bomb
is refused after at most the implied size + 1 byte, and peak memory stays near the real data size
(measured in a subprocess, by the growth of its peak resident size, under an address-space cap so that a
reader that loads the whole file fails instead of taking the machine's memory)."""
import gzip
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from lenet_dist.data import DataError, read_idx
from lenet_dist.data.idx import content_sha256

from tests.idxdata import idx_bytes, write_dir
from tests.mpiutil import REPO

MiB = 1 << 20
HEADER = bytes([0, 0, 8, 3]) + struct.pack(">3I", 60000, 28, 28)   # 60,000 images: 47,040,000 bytes of data
IMPLIED = 60000 * 28 * 28

PROG = r"""
import json, resource, sys
from lenet_dist.data import DataError
from lenet_dist.data.own import load_idx_dir

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

cap = status("VmSize") + 1024 * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
before = status("VmHWM")
try:
    load_idx_dir(sys.argv[1])
    outcome = "loaded"
except DataError as e:
    outcome = str(e)
except MemoryError:
    outcome = "MemoryError"
print(json.dumps({"outcome": outcome, "growth": status("VmHWM") - before}))
"""


def load_in_subprocess(d):
    p = subprocess.run([sys.executable, "-c", PROG, str(d)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def gzip_bomb(zeros_mib: int) -> bytes:
    """A gzip file of HEADER and then `zeros_mib` MiB of zeros, ~1 KiB per MiB: each MiB is one deflate block
    after a full flush, so one block repeated is the whole stream."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(HEADER) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(HEADER)
    zeros = bytes(MiB)
    for _ in range(zeros_mib):
        crc = zlib.crc32(zeros, crc)
    size = (len(HEADER) + zeros_mib * MiB) & 0xFFFFFFFF
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + first + block * zeros_mib + c.flush()
            + struct.pack("<II", crc, size))


def own_dir(tmp_path):
    return write_dir(tmp_path / "d", n_train=60, n_test=20, gz=())


def test_a_gzip_bomb_is_refused_after_the_implied_size(tmp_path):
    d = own_dir(tmp_path)
    bomb = gzip_bomb(1500)                                          # 1.5 MB holding 1.5 GB
    assert len(bomb) < 1.6e6
    (d / "train-images-idx3-ubyte").unlink()
    (d / "train-images-idx3-ubyte.gz").write_bytes(bomb)
    r = load_in_subprocess(d)
    assert r["outcome"] == (f"{d / 'train-images-idx3-ubyte.gz'}: trailing garbage: header says 60000x28x28 = "
                            f"{IMPLIED} bytes of data, file has more than {IMPLIED}")
    assert r["growth"] < IMPLIED + 64 * MiB, r                      # the array it claims, not the 1.5 GB


def test_a_gzip_header_claiming_more_than_deflate_can_hold_is_refused_unread(tmp_path):
    d = own_dir(tmp_path)
    big = bytes([0, 0, 8, 3]) + struct.pack(">3I", 4_000_000, 28, 28)        # 3.1 GB in a file of ~1 KB
    (d / "train-images-idx3-ubyte").unlink()
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(big + bytes(MiB)))
    r = load_in_subprocess(d)
    assert "header says 4000000x28x28 = 3136000000 bytes of data, more than the" in r["outcome"]
    assert "a gzip file of this size can hold" in r["outcome"] and r["growth"] < 16 * MiB, r


def test_a_sparse_file_is_refused_from_its_size_without_reading_it(tmp_path):
    d = own_dir(tmp_path)
    path = d / "train-images-idx3-ubyte"
    with open(path, "wb") as f:
        f.write(HEADER)
        f.truncate(2 << 30)                                         # 2 GB, sparse: no disk used
    r = load_in_subprocess(d)
    assert r["outcome"] == (f"{path}: trailing garbage: header says 60000x28x28 = {IMPLIED} bytes of data, "
                            f"file has {(2 << 30) - 16}")
    assert r["growth"] < 16 * MiB, r


def test_a_short_gzip_stream_costs_only_what_it_holds(tmp_path):
    d = own_dir(tmp_path)
    (d / "train-images-idx3-ubyte").unlink()
    noise = np.random.default_rng(0).integers(0, 256, 65536, dtype=np.uint8).tobytes()  # incompressible
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(HEADER + noise))
    r = load_in_subprocess(d)
    assert r["outcome"].endswith(f"truncated: header says 60000x28x28 = {IMPLIED} bytes of data, file has 65536")
    assert r["growth"] < 16 * MiB, r


def test_real_sized_data_is_read_at_about_its_size(tmp_path):
    """Streaming keeps the peak near the data: 47 MB of images (raw) and labels, well under twice that."""
    d = tmp_path / "full"
    d.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60000, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 60000).astype(np.uint8)
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels), compresslevel=1))
    (d / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images[:100]))
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:100]))
    r = load_in_subprocess(d)
    assert r["outcome"] == "loaded"
    assert r["growth"] < 1.5 * IMPLIED, r


def test_content_sha256_streams_and_matches_the_array(tmp_path):
    a = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    p = tmp_path / "a.gz"
    p.write_bytes(gzip.compress(idx_bytes(a)))
    import hashlib
    assert content_sha256(p) == hashlib.sha256(idx_bytes(a)).hexdigest()
    with pytest.raises(DataError, match="not a regular file"):
        read_idx(tmp_path)                                          # a folder, refused in one line


def test_a_fifo_or_a_folder_in_place_of_a_file_is_refused_at_once(tmp_path):
    import os
    from lenet_dist.data.own import load_idx_dir
    d = own_dir(tmp_path)
    (d / "t10k-labels-idx1-ubyte").unlink()
    os.mkfifo(d / "t10k-labels-idx1-ubyte")                       # no writer: a plain open would block forever
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: not a regular file \(a FIFO\)$"):
        load_idx_dir(d)
    (d / "t10k-labels-idx1-ubyte").unlink()
    (d / "t10k-labels-idx1-ubyte").mkdir()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: not a regular file \(a folder\)$"):
        load_idx_dir(d)
