"""lenet-train --check: what a launch needs, verified on every rank before any training starts (the checks;
workers/trainer.py fills their CheckPlan from the flags).

    lenet-train --check --subset                                        # one process
    mpirun -n 2 lenet-train --check --data-dir ~/mnist --checkpoint-dir runs/ckpt --publish tcp://127.0.0.1:5555
    mpirun -f deploy/hosts.mpich -ppn 2 -n 4 lenet-train --check --publish tcp://0.0.0.0:5555 \\
        --results tcp://evalhost:5556 --curve-secret-key keys/trainer.key_secret --curve-authorized keys/authorized

Give it the flags of the real launch. The checks, each `ok`, `FAIL` or `skip` with its reason:

    every rank   mpi             an allreduce of ones over the ranks gives their number
                 data            MNIST (or --subset) on this rank's host, sha256-verified; nothing is downloaded
    rank 0       checkpoint-dir  can be created and written (rank 0 alone writes checkpoints)
                 keys            the CurveZMQ key files are readable and parse; authorized/ holds client keys
                 publish         the --publish endpoint can be bound (and is released again)
                 results         the evaluator's --results address accepts a TCP connection (retried a few s)

Every rank's results reach rank 0 in one allgather of JSON (comm.allgather_json: bytes, never pickle);
rank 0 prints every line and a summary naming the failing ranks and their hosts. Exit 0 when nothing
failed, 1 otherwise, on every rank. No training, no download, nothing left behind.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from lenet_dist.comm import allgather_json
from lenet_dist.launcher_env import SIZE_VARS

from lenet_dist.run.text import one_line
from lenet_dist.transport.wire import is_loopback

REASON_CHARS = 900              # a longer reason is cut: the report stays a line per check
RESULTS_WAIT_S = 4.0            # how long the --results address may take to accept a connection
HANG_TIMEOUT_S = 60.0           # a check run that has not finished by then ends the job: never hang


@dataclass(frozen=True)
class CheckPlan:
    """What the real launch would use: lenet-train's flags of the same names (workers/trainer.py fills it)."""
    subset: bool = False
    dataset: str = "mnist"
    data_dir: Optional[str] = None
    no_download: bool = False
    read_idx: Optional[Callable] = None     # --dataset idx: reads the given files (workers.common.read_dataset)
    checkpoint_dir: Optional[str] = None
    resume: object = None
    curve_secret_key: Optional[str] = None
    curve_public_key: Optional[str] = None
    curve_authorized: Optional[str] = None
    publish: Optional[str] = None
    results: Optional[str] = None


def _ok(name, why):
    return [name, "ok", why]


def _fail(name, why):
    return [name, "FAIL", why]


def _skip(name, why):
    return [name, "skip", why]


# ------------------------------------------------------------------------------------------------ checks

def check_mpi(comm):
    """Every rank takes part in an allreduce of ones; under a launcher, MPI sees as many ranks as it started."""
    started = next((int(os.environ[v]) for v in SIZE_VARS if os.environ.get(v, "").isdigit()), None)
    if not comm.is_mpi:
        return _ok("mpi", "one process, not started by an MPI launcher")
    total = int(comm.allreduce_(np.ones(1, np.int64))[0])
    if total != comm.size:
        return _fail("mpi", f"an allreduce of ones over {comm.size} ranks gave {total}")
    if started is not None and started != comm.size:
        # The classic mismatch: mpi4py built for one MPI, launched by another's mpirun: N singletons.
        return _fail("mpi", f"the launcher started {started} processes but MPI sees {comm.size}: mpi4py's MPI "
                            f"is not the one of this mpirun (see deploy/README.md, Install)")
    return _ok("mpi", f"an allreduce of ones over {comm.size} ranks gave {total}")


def check_data(args: CheckPlan):
    from lenet_dist.data import DataError, fetch_mnist, load_subset
    try:
        if args.subset:
            ds = load_subset()
            return _ok("data", f"{ds.source}: {len(ds.train_images)} train + {len(ds.test_images)} test "
                               f"images, sha256 verified")
        if args.dataset == "idx":
            ds = args.read_idx()
            return _ok("data", f"{ds.source}: {len(ds.train_images)} train + {len(ds.test_images)} test images, "
                               f"structure checked")
        paths = fetch_mnist(args.data_dir, download=False, log=lambda msg: None, dataset=args.dataset,
                            strict_dir=args.data_dir is not None)
    except DataError as e:
        hint = "" if args.no_download or args.data_dir else \
            " (training would try to download it; `lenet-data fetch` on this host does it beforehand)"
        return _fail("data", f"{e}{hint}")
    where = ", ".join(sorted({str(p.parent) for p in paths.values()}))
    return _ok("data", f"the 4 {args.dataset} files in {where}, sha256 verified")


def check_checkpoint_dir(directory, resume):
    d = Path(directory)
    created = [p for p in (d, *d.parents) if not p.exists()]      # removed again afterwards
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".lenet-check-") as f:
            f.write(b"lenet-train --check\n")
            f.flush()
            os.fsync(f.fileno())
        free_gb = shutil.disk_usage(d).free / 1e9
    except OSError as e:
        return _fail("checkpoint-dir", f"{d}: not writable: {e.strerror or e}")
    finally:
        for p in created:                                           # deepest first
            try:
                p.rmdir()
            except OSError:
                pass
    why = f"{d} is writable, {free_gb:.1f} GB free"
    if resume:
        from lenet_dist.checkpoints.resume import newest_usable
        found = newest_usable(d, None, lambda msg: None) if d.is_dir() else None
        why += (f"; --resume continues from {found[0].name} (step {found[1].step})" if found else
                "; --resume finds no usable checkpoint there and would stop (--resume auto: start a run)")
    return _ok("checkpoint-dir", why)


def check_keys(args: CheckPlan):
    from lenet_dist.transport import TransportError, load_key, load_key_pair
    secret, authorized = args.curve_secret_key, args.curve_authorized
    public = args.curve_public_key
    if not (secret or authorized or public):
        return _skip("keys", "no CurveZMQ keys given: checkpoints are served unencrypted to anyone who connects")
    try:
        if bool(secret) != bool(authorized):
            raise TransportError("CurveZMQ needs both --curve-secret-key and --curve-authorized")
        load_key_pair(secret, public)
        folder = Path(authorized)
        if not folder.is_dir():
            raise TransportError(f"{folder}: not a folder (--curve-authorized takes the folder of clients' .key files)")
        clients = sorted(folder.glob("*.key"))
        if not clients:
            raise TransportError(f"{folder}: no public keys (*.key) there, so no evaluator could connect")
        for key in clients:
            load_key(key)
    except TransportError as e:
        return _fail("keys", str(e))
    return _ok("keys", f"{secret} holds a key pair; {len(clients)} authorized client key(s) in {folder}")


def check_publish(args: CheckPlan):
    if not args.publish:
        return _skip("publish", "no --publish: no evaluator can fetch checkpoints")
    from lenet_dist.transport import TrainerLink, TransportError
    try:
        link = TrainerLink(args.publish, log=lambda msg: None)     # the trainer's own bind, without keys
    except TransportError as e:
        return _fail("publish", str(e))
    bound = link.endpoint
    link.close()
    why = f"{bound} can be bound"
    if not is_loopback(bound) and not args.curve_secret_key:
        why += "; not loopback and no CurveZMQ keys: anyone who reaches it can download the model"
    return _ok("publish", why)


def check_results(endpoint, wait=RESULTS_WAIT_S):
    if not endpoint:
        return _skip("results", "no --results: evaluators' results arrive on the checkpoint channel only")
    m = re.fullmatch(r"tcp://(?:\[([^\]]+)\]|([^:/]+)):(\d+)", endpoint)
    if not m:
        return _skip("results", f"{endpoint}: only tcp://HOST:PORT addresses are checked")
    host, port = m.group(1) or m.group(2), int(m.group(3))
    if host in ("*", "0.0.0.0", "::"):
        return _fail("results", f"{endpoint} is a bind address: name the evaluator's host")
    deadline, last = time.monotonic() + wait, None
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return _ok("results", f"{endpoint} accepts connections")
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    why = last.strerror if isinstance(last, OSError) and last.strerror else one_line(last)
    return _fail("results", f"{endpoint}: no TCP connection in {wait:.0f} s ({why}); is lenet-evaluator "
                            f"running there with --results-bind?")


# ----------------------------------------------------------------------------------------- run and report

def _guarded(check, *a):
    """A check that crashes is a failed check, never a rank that skips the allgather (which would hang)."""
    try:
        return check(*a)
    except Exception as e:  # noqa: BLE001 - reported, with the exception, as this check's failure
        return _fail(getattr(check, "__name__", "check").removeprefix("check_").replace("_", "-"), one_line(e))


def _shorten(record):
    for item in record["checks"]:
        if len(item[2]) > REASON_CHARS:
            item[2] = item[2][:REASON_CHARS - 3] + "..."
    return record


def _watchdog(comm):
    def fire():
        print(f"lenet-train --check: FAIL rank {comm.rank}/{comm.size} on {comm.processor_name()}: the checks "
              f"did not finish within {HANG_TIMEOUT_S:.0f} s (a rank unreachable over MPI?)",
              file=sys.stderr, flush=True)
        os._exit(1)
    timer = threading.Timer(HANG_TIMEOUT_S, fire)
    timer.daemon = True
    timer.start()
    return timer


def run_checks(args: CheckPlan, comm, out=None):
    """Run the checks on this rank, gather every rank's at rank 0, print them there; the exit code."""
    out = out or sys.stdout
    timer = _watchdog(comm)
    try:
        checks = [_guarded(check_mpi, comm), _guarded(check_data, args)]
        if comm.rank == 0:                                          # rank 0's duties, checked where they happen
            if args.checkpoint_dir:
                checks.append(_guarded(check_checkpoint_dir, args.checkpoint_dir, args.resume))
            else:
                checks.append(_skip("checkpoint-dir", "no --checkpoint-dir: no checkpoints on disk"))
            checks += [_guarded(check_keys, args), _guarded(check_publish, args),
                       _guarded(check_results, args.results)]
        record = {"rank": comm.rank, "host": comm.processor_name(), "checks": checks}
        records = allgather_json(comm, _shorten(record))
    finally:
        timer.cancel()
    failed = [(r["rank"], r["host"], name) for r in records for name, status, _ in r["checks"] if status == "FAIL"]
    if comm.rank == 0:
        _report(records, failed, out)
    return 1 if failed else 0


def _report(records, failed, out):
    hosts = {}
    for r in records:
        hosts.setdefault(r["host"], []).append(r["rank"])
    where = ", ".join(f"{h} (rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))})" for h, rs in hosts.items())
    print(f"lenet-train --check: {len(records)} rank(s) on {len(hosts)} host(s): {where}", file=out)
    for r in records:
        for name, status, why in r["checks"]:
            print(f"{status:<4}  rank {r['rank']} on {r['host']}  {name}: {why}", file=out)
    n = sum(status != "skip" for r in records for _, status, _ in r["checks"])
    if failed:
        names = "; ".join(f"{name} on rank {rank} ({host})" for rank, host, name in failed)
        print(f"lenet-train --check: FAIL: {len(failed)} of {n} checks failed: {names}", file=out)
    else:
        print(f"lenet-train --check: ok: all {n} checks passed", file=out)
    out.flush()
