"""A real Slurm cluster on one machine for tests: slurmctld on a host of its own and one slurmd per compute
node, each in a network namespace with its own hostname and address (tests/netns.py), authenticated by one
munged. Debian's slurm-wlm 22.05 and munge; no cgroups (proctrack/linuxproc, task/none), no accounting.

    with SlurmCluster.made(tmp_path, "lenet123", ["n1", "n2", "n3"]) as cluster:
        job = cluster.sbatch(["--nodes=3", "script.sbatch"], cwd=tmp_path)
        cluster.wait_state(job, {"COMPLETED"})

Everything it makes lives under one directory (configuration, keys, state, logs, spool) and in its
namespaces; close() stops the daemons it started (by their pids) and deletes the namespaces, also when the
test failed halfway.
"""
import contextlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.netns import Hosts, unavailable as netns_unavailable

SUBNET = "10.78.0"                  # private, only inside our namespaces
CONTROLLER = "ctl"
# Job states on the way to running again (a requeued job passes COMPLETING and REQUEUED, then PENDING).
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"}
COMMANDS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "scancel", "sinfo")


def unavailable():
    """Why a Slurm cluster cannot be made here (a reason to skip), or None."""
    why = netns_unavailable()
    if why:
        return why
    missing = [c for c in COMMANDS if not shutil.which(c)]
    if missing:
        return (f"no {', '.join(missing)}: Debian's slurm-wlm and munge are not installed "
                "(scripts/setup-tests.sh installs them as root)")
    return None


# cred_expire: a requeued job waits this long before it starts again (120 s by default).
SLURM_CONF = """\
ClusterName=lenet
SlurmctldHost={controller}({controller_addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=15
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MailProg=/bin/true
KillWait=30
InactiveLimit=0
SlurmdTimeout=60
{nodes}
PartitionName=test Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, root, tag, nodes, cpus=None):
        self.root = Path(root)
        addresses = {CONTROLLER: f"{SUBNET}.100", **{n: f"{SUBNET}.{i}" for i, n in enumerate(nodes, 1)}}
        self.hosts = Hosts(tag, addresses)
        self.nodes = list(nodes)
        self.cpus = cpus or os.cpu_count()
        self.conf = self.root / "slurm.conf"
        self.daemons = []               # (name, Popen) of what we started, in order
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    @classmethod
    @contextlib.contextmanager
    def made(cls, root, tag, nodes):
        c = cls(root, tag, nodes)
        try:
            c.start()
            yield c
        finally:
            c.close()

    def start(self):
        d = self.root
        for sub in ("state", "run", "log", "munge", *(f"spool/{n}" for n in self.nodes)):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses group/world-writable directories on the way to its files: keep ours 0700.
        (d / "munge").chmod(0o700)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket = d / "munge" / "munge.socket"
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.hosts.addresses[n]} CPUs={self.cpus} State=UNKNOWN"
                          for n in self.nodes)
        self.conf.write_text(SLURM_CONF.format(
            controller=CONTROLLER, controller_addr=self.hosts.addresses[CONTROLLER], munge_socket=socket,
            d=d, nodes=nodes, node_list=",".join(self.nodes)))
        self.hosts.create()
        self.hosts.write_hosts_files()
        # One munged for all: its socket is a file, which every namespace sees.
        self._daemon("munged", ["munged", "--foreground", "--force", f"--socket={socket}", f"--key-file={key}",
                                f"--pid-file={d}/munge/munged.pid", f"--seed-file={d}/munge/munged.seed",
                                f"--log-file={d}/log/munged.log"])
        self._wait(lambda: socket.exists(), "munged's socket", d / "log" / "munged.log")
        self._daemon("slurmctld", ["slurmctld", "-D", "-i"], host=CONTROLLER)
        for n in self.nodes:
            self._daemon(f"slurmd {n}", ["slurmd", "-D", "-N", n], host=n)
        self._wait(lambda: self.node_states() == {n: "idle" for n in self.nodes}, "every node idle",
                   d / "log" / "slurmctld.log", timeout=60)

    def _daemon(self, name, argv, host=None):
        log = open(self.root / "log" / f"{name.replace(' ', '-')}.out", "w")
        with log:
            if host:
                p = self.hosts.popen_keeping_sys(host, argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
            else:
                p = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.daemons.append((name, p))

    def _wait(self, ready, what, log, timeout=30):
        deadline = time.monotonic() + timeout
        while not ready():
            for name, p in self.daemons:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited {p.returncode} while waiting for {what}:\n"
                                       + self.logs())
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} within {timeout} s:\n{self.logs()}")
            time.sleep(0.2)

    def logs(self):
        out = []
        for f in sorted((self.root / "log").iterdir()):
            text = f.read_text(errors="replace").splitlines()[-40:]
            out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)

    def run(self, argv, host=CONTROLLER, timeout=30, check=True, **kw):
        """A Slurm client command, run on `host` (the controller by default)."""
        p = self.hosts.popen(host, argv, env=self.env, cwd=kw.pop("cwd", None), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, **kw)
        out, err = p.communicate(timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} exited {p.returncode}: {err.strip()}")
        return out

    def node_states(self):
        try:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10)
        except subprocess.TimeoutExpired:
            return {}
        return dict(line.split() for line in out.splitlines() if line.strip())

    def sbatch(self, args, cwd, env=None):
        """Submit from `cwd` on the controller's host; returns the job id."""
        p = self.hosts.popen(CONTROLLER, ["sbatch", "--parsable", *args], cwd=cwd, env=dict(self.env, **(env or {})),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = p.communicate(timeout=30)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} exited {p.returncode}: {err.strip()}")
        return out.strip().split(";")[0]

    def job(self, job_id):
        """scontrol's fields of a job (JobState, NodeList, ExitCode, ...); {} once slurmctld forgot it."""
        out = self.run(["scontrol", "show", "-o", "job", job_id], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, ready, what, job_id, timeout):
        """Wait until ready() while the job is pending or running; fail with its state and the logs."""
        deadline = time.monotonic() + timeout
        while not ready():
            state = self.job(job_id).get("JobState")
            if state not in LIVE_STATES or time.monotonic() > deadline:
                raise AssertionError(f"no {what} (job {job_id} {state}, {timeout} s at most)\n{self.logs()}")
            time.sleep(0.3)

    def wait_state(self, job_id, states, timeout):
        """Wait until the job reaches one of `states`; returns its fields."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if fields.get("JobState") in states:
                return fields
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not {states} within {timeout} s: {fields}\n{self.logs()}")
            time.sleep(0.3)

    def close(self):
        """Stop our daemons (by pid), then kill whatever still runs in our namespaces and delete them."""
        for _, p in reversed(self.daemons):
            if p.poll() is None:
                p.terminate()
        for _, p in reversed(self.daemons):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.daemons.clear()
        self.hosts.destroy()
