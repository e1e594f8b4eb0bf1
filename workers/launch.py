"""lenet-launch: runs `mpirun ... lenet-train ...` and restarts it from the newest checkpoint when a rank dies.

    lenet-launch -n 2 -- --checkpoint-every 200                  # restarts resume from a run folder runs/<time>-<id>/
    lenet-launch -n 2 -- --checkpoint-dir ckpt --checkpoint-every 200 --metrics runs/metrics.jsonl
    lenet-launch -n 4 --hostfile hosts --min-ranks 2 --max-restarts 5 -- --checkpoint-dir ckpt --stall-timeout 30
    lenet-launch -n 2 --mpirun-args "-launcher ssh -launcher-exec ./agent" --hostfile hosts -- --subset

Everything after `--` goes to lenet-train. A job that fails because a rank died (a signal, a non-zero exit,
the stall guard) starts again with --resume, up to --max-restarts times within --restart-window seconds,
after a back-off; a failure that would recur (a usage error, bad data, a diverged loss, replicas out of
sync, a config refused on resume) ends the launch at once. With --hostfile, hosts that no longer answer are
left out of the restart, down to --min-ranks ranks (same global batch). SIGTERM, SIGUSR1 / Ctrl-C stop the
job cleanly: the ranks agree on the stop, write one checkpoint and exit; the launcher exits 128 + signal. One
stop is passed on however many signals arrive (Slurm's time limit sends SIGTERM twice); only a second
Ctrl-C kills the job at once.
The decisions are in lenet_dist/run/restart_policy.py; this module only runs processes. It never imports MPI.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

from lenet_dist import logformat
from lenet_dist.checkpoints.resume import newest_usable
from lenet_dist.run import exitcodes, metrics
from lenet_dist.run.procs import descendants, local_ranks
from lenet_dist.run.setup import RUNS, run_folder_name
from lenet_dist.stopsignal import signal_name, StopSignal

from lenet_dist.run.restart_policy import classify, fit_hosts, format_hostfile, parse_hostfile, RestartPolicy

log = logging.getLogger("lenet.launch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="lenet-launch", description=__doc__.split("\n\n")[0],
                                usage="lenet-launch [options] -- [lenet-train flags]",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=2, help="ranks to start")
    p.add_argument("--hostfile", type=Path, help="MPICH (host:slots) or Open MPI (host slots=N) hostfile")
    p.add_argument("--min-ranks", type=int, help="continue on fewer ranks, down to this many, when hosts stop "
                                                 "answering (default: --ranks, never fewer)")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts allowed within --restart-window")
    p.add_argument("--restart-window", type=float, default=3600.0, metavar="SECONDS",
                   help="the window --max-restarts counts in (0: the whole run)")
    p.add_argument("--backoff", type=float, default=1.0, metavar="SECONDS",
                   help="wait before a restart; doubles for each failure in a row that came less than a "
                        "minute after its start")
    p.add_argument("--backoff-max", type=float, default=30.0, metavar="SECONDS")
    p.add_argument("--mpirun", default=os.environ.get("MPIRUN", "mpirun"))
    p.add_argument("--mpirun-args", default="", help="more mpirun flags, one shell-quoted string")
    p.add_argument("--trainer", default=f"{shlex.quote(sys.executable)} -m workers.trainer",
                   help="the lenet-train command each rank runs (the same path on every host)")
    p.add_argument("--exit-grace", type=float, default=15.0, metavar="SECONDS",
                   help="after a rank's error line, how long mpirun may take to end the job before it is "
                        "killed (it can wait forever for a lost host)")
    p.add_argument("--probe-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="--hostfile: a host whose `mpirun -n 1 true` does not finish in this long is lost")
    p.add_argument("--log-format", default="text", choices=logformat.FORMATS,
                   help="json: one JSON object per line with an ISO 8601 time and zone, here and in lenet-train "
                        "(unless its flags say otherwise)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then lenet-train's flags")
    args = p.parse_args(argv)
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    if args.log_format != "text" and not any(a.startswith("--log-format") for a in args.train_args):
        args.train_args.append(f"--log-format={args.log_format}")
    args.min_ranks = args.ranks if args.min_ranks is None else args.min_ranks
    if not 1 <= args.min_ranks <= args.ranks:
        p.error(f"--min-ranks {args.min_ranks}: need 1 <= --min-ranks <= --ranks ({args.ranks})")
    try:
        args.policy = RestartPolicy(args.max_restarts, args.restart_window, args.backoff, args.backoff_max)
    except ValueError as e:
        p.error(str(e))
    args.checkpoint_dir = _flag_value(args.train_args, "--checkpoint-dir")
    args.metrics = _flag_value(args.train_args, "--metrics")
    if args.max_restarts and not args.checkpoint_dir:
        if "--no-save" in args.train_args:
            p.error("restarts resume from checkpoints, and --no-save keeps none: drop it, or --max-restarts 0")
        _own_run_folder(args)
    try:
        args.hosts = parse_hostfile(args.hostfile.read_text()) if args.hostfile else None
    except (OSError, ValueError) as e:
        p.error(f"--hostfile {args.hostfile}: {e}")
    return args


def _own_run_folder(args):
    """Restarts without --checkpoint-dir: the run gets its folder as lenet-train gives one (runs/<name>/, its
    checkpoints and, without --metrics, metrics.jsonl), named here so that every start of the job uses it:
    --run-name NAME is passed to lenet-train unless given."""
    name = _flag_value(args.train_args, "--run-name")
    if name is None:
        name = run_folder_name()
        args.train_args += ["--run-name", name]
    args.checkpoint_dir = str(RUNS / name)
    args.metrics = args.metrics or str(RUNS / name / "metrics.jsonl")


def _flag_value(argv, flag):
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def detect_flavor(mpirun):
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SystemExit(f"lenet-launch: error: cannot run '{mpirun} --version': {e}")
    text = out.stdout + out.stderr
    if "Open MPI" in text or "OpenRTE" in text or "Open RTE" in text:
        return "openmpi"
    if "HYDRA" in text or "MPICH" in text or "Intel(R) MPI" in text:
        return "mpich"
    raise SystemExit(f"lenet-launch: error: cannot tell MPICH from Open MPI by '{mpirun} --version'")


class Job:
    """One mpirun: its output passed through to ours and kept for classify() (Hydra reports a rank's death
    on stdout, the ranks their errors on stderr); ends on its own or is ended."""

    def __init__(self, argv, env=None):
        log.info("starting: %s", shlex.join(argv))
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                     env=env)
        self.lines = deque(maxlen=500)
        self.first_error = None             # when a rank's error line went by
        self.stop_sent = 0
        self.pumps = [threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                      for src, dst in ((self.proc.stdout, sys.stdout), (self.proc.stderr, sys.stderr))]
        for t in self.pumps:
            t.start()

    def _pump(self, src, dst):
        for raw in iter(src.readline, b""):
            dst.buffer.write(raw)
            dst.buffer.flush()
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if self.first_error is None and ": error: " in line:
                self.first_error = time.monotonic()

    def signal_ranks(self, signum):
        """Pass a stop on to the ranks (they agree on it in the next step's allreduce, so the local ones are
        enough); Hydra would kill them on its own SIGTERM, so mpirun gets it only when none runs here."""
        ranks = local_ranks(self.proc.pid)
        for pid in ranks:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        if not ranks:
            self.proc.send_signal(signal.SIGINT)
        self.stop_sent += 1
        log.warning("passed %s on to %s", signal_name(signum),
                    f"{len(ranks)} local rank(s)" if ranks else "mpirun (no rank runs on this host)")

    def kill(self):
        """mpirun and everything it started here (proxies, ssh clients, ranks: they have groups of their own)."""
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        for s, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 30.0)):
            for pid in pids:
                try:
                    os.kill(pid, s)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                pass

    def wait(self, stop, exit_grace):
        while True:
            try:
                self.proc.wait(0.05)
                break
            except subprocess.TimeoutExpired:
                pass
            if stop.signum and not self.stop_sent:     # one stop, however many signals: more never escalate
                self.signal_ranks(stop.signum)
            if self.first_error and not stop and time.monotonic() - self.first_error > exit_grace:
                log.warning("mpirun has not ended the job %g s after a rank's error; killing it", exit_grace)
                self.kill()
        for t in self.pumps:
            t.join(5)                       # a rank left on a lost host may hold the pipe open
        return self.proc.returncode


class Launcher:
    def __init__(self, args):
        self.args = args
        self.flavor = detect_flavor(args.mpirun)
        self.hosts = args.hosts
        self.ranks = args.ranks
        self.stop = StopSignal()
        self.tmp = tempfile.TemporaryDirectory(prefix="lenet-launch-")
        self.job = None
        self.job_offset = 0                 # the --metrics file's size when the job started

    def mpirun_argv(self, extra):
        return [self.args.mpirun, *shlex.split(self.args.mpirun_args), *extra]

    def command(self, resume):
        a, extra = self.args, ["-n", str(self.ranks)]
        if self.hosts:
            path = Path(self.tmp.name) / "hostfile"
            path.write_text(format_hostfile(self.hosts, self.flavor))
            extra += ["-f" if self.flavor == "mpich" else "--hostfile", str(path)]
        given = any(t == "--resume" or t.startswith("--resume=") for t in a.train_args)
        train = list(a.train_args) + (["--resume"] if resume and not given else [])
        return self.mpirun_argv(extra) + shlex.split(a.trainer) + train

    def answering(self):
        """The hosts of the hostfile on which mpirun can start a process now (all probed at once)."""
        probes = {}
        for host, _ in self.hosts:
            extra = ["-hosts", host] if self.flavor == "mpich" else ["--host", f"{host}:1"]
            probes[host] = subprocess.Popen(self.mpirun_argv(extra + ["-n", "1", "true"]), start_new_session=True,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, up = time.monotonic() + self.args.probe_timeout, set()
        for host, proc in probes.items():
            try:
                if proc.wait(max(deadline - time.monotonic(), 0.01)) == 0:
                    up.add(host)
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return up

    def record(self, event, **fields):
        """One row in lenet-train's --metrics file (the trainer does not run while we write). An "end" row only
        when the job ended without writing its own: the file gets one."""
        if not self.args.metrics:
            return
        if event == "end" and "end" in metrics.events_since(self.args.metrics, self.job_offset):
            return
        row = {"event": event, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields}
        metrics.append(self.args.metrics, row)

    def resume_point(self):
        """(file name, step) of the checkpoint a restart continues from: the trainer's own rule, so that both
        name the same one; (None, 0) when there is none."""
        found = newest_usable(self.args.checkpoint_dir, None, log.warning) if self.args.checkpoint_dir else None
        return (found[0].name, found[1].meta["step"]) if found else (None, 0)

    def run(self):
        a, attempt, reason, failure = self.args, 0, "first start", None
        while True:
            # a restart continues from the newest usable checkpoint, or starts again when none was written
            ckpt, step = self.resume_point() if attempt > 0 else (None, 0)
            resume = ckpt is not None
            where = f" from {ckpt} (step {step})" if ckpt else ""
            log.info("%s %d on %d rank(s)%s: %s", "restart" if attempt else "start", attempt, self.ranks,
                     where, reason)
            self.record("restart" if attempt else "start", attempt=attempt, ranks=self.ranks,
                        asked_ranks=a.ranks, reason=reason, failure=failure, resume_step=step if resume else None)
            started = time.monotonic()
            self.job_offset = metrics.size(a.metrics) if a.metrics else 0
            job = self.job = Job(self.command(resume), env={**os.environ, metrics.LAUNCH_RESTARTS_VAR: str(attempt)})
            code = job.wait(self.stop, a.exit_grace)
            if code == 0:                   # finished, even if a stop came at the very end
                log.info("the job finished (%d restart(s))", attempt)
                self.record("end", outcome="finished", restarts=attempt, code=0)
                return 0
            if self.stop:
                ckpt, step = self.resume_point()
                log.warning("stopped by %s: the job ended with code %d; newest checkpoint: %s (step %d); not a "
                            "failure, no restart", self.stop.name, code, ckpt, step)
                self.record("end", outcome="stopped", signal=self.stop.signum, code=code, step=step)
                return 128 + self.stop.signum
            f = classify(code, job.lines)
            if f.kind == "stopped":         # a rank's stop signal, or live control: its checkpoint is written
                ckpt, step = self.resume_point()
                log.warning("the job stopped with code %d: %s; newest checkpoint: %s (step %d); no restart",
                            code, f.why, ckpt, step)
                self.record("end", outcome="stopped", code=code, step=step, reason=f.why)
                return code if code == exitcodes.STOPPED else 128 + exitcodes.stop_signal(code)
            restart, delay, why = a.policy.decide(f, time.time(), ran=time.monotonic() - started)
            if restart and self.hosts:
                restart, why = self._refit(why)
            log.log(logging.WARNING if restart else logging.ERROR, "mpirun exited with code %d: %s", code, why)
            if not restart:
                self.record("end", outcome="gave up", failure=f.kind, reason=why, code=code)
                return code if f.retry and code > 0 else 2 if code == exitcodes.USAGE else 1
            if self.stop.sleep(delay):
                self.record("end", outcome="stopped", signal=self.stop.signum, code=code)
                return 128 + self.stop.signum
            attempt, reason, failure = attempt + 1, why, f.kind

    def _refit(self, why):
        """Before a restart on a hostfile: leave out hosts that no longer answer, down to --min-ranks."""
        up = self.answering()
        try:
            hosts, n = fit_hosts(self.args.hosts, up, self.args.ranks, self.args.min_ranks)
        except ValueError as e:
            return False, f"not restarting: {e}"
        lost = [h for h, _ in self.args.hosts if h not in up]
        if n != self.ranks or lost:
            why += (f"; hosts not answering: {', '.join(lost) or 'none'}: continuing on {n} rank(s) "
                    f"(asked {self.args.ranks}, --min-ranks {self.args.min_ranks}), same global batch")
        self.hosts, self.ranks = hosts, n
        return True, why


def main(argv=None):
    args = parse_args(argv)
    logformat.setup("lenet-launch", "INFO", args.log_format)
    launcher = Launcher(args)
    try:
        code = launcher.run()
        launcher.stop.settled()             # the exit status is decided: a late SIGTERM must not replace it
        return code
    except KeyboardInterrupt:               # Ctrl-C twice: the person at the terminal means now
        if launcher.job is not None:
            launcher.job.kill()
        log.error("interrupted twice: the job was killed without its stop checkpoint")
        return 130
    finally:
        launcher.tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
