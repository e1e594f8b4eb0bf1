"""Hosts on one machine for tests and benchmarks: network namespaces joined by a bridge, each with a veth
link, its own address and port space; tests/netns_agent.sh plays ssh into them. Needs root and iproute2.

    with Hosts.made("lenet123", {"h1": "10.77.0.1", "h2": "10.77.0.2"}) as hosts:
        hosts.run("h1", ["hostname"])   # or: mpirun -launcher-exec tests/netns_agent.sh, LENET_NETNS_HOSTS=hosts.agent_map()

Only private addresses that exist inside these namespaces are used; nothing appears in the machine's own
namespace, and destroy() kills what still runs inside them before deleting them. shape(host, rate) caps a
host's link with tc tbf (bench/multihost.py).
"""
import contextlib
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

AGENT = Path(__file__).resolve().parent / "netns_agent.sh"
NETNS_ETC = Path("/etc/netns")            # per-namespace files that `ip netns exec` mounts over /etc


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=True).stdout


def unavailable():
    """Why namespaces cannot be made here (a reason to skip), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool in ("ip", "unshare"):
        if not shutil.which(tool):
            return f"network namespaces need '{tool}' (iproute2, util-linux)"
    return None


def tbf_burst(rate_bits):
    """The token bucket of a shaped link, in bytes: 1 ms of traffic, at least 16 KiB (bench/cost_model.py
    models it: after an idle millisecond that much passes at once)."""
    return max(16 * 1024, int(rate_bits / 8 / 1000))


class Hosts:
    """Network namespaces acting as hosts (name -> address in one /24), joined by a bridge in one more."""

    def __init__(self, tag, addresses, mtu=1500):
        self.addresses, self.mtu = dict(addresses), mtu
        self.ns = {h: f"{tag}-{h}" for h in self.addresses}
        self.switch = f"{tag}-sw"
        self.made = []
        self.etc_dirs = []

    @classmethod
    @contextlib.contextmanager
    def made(cls, tag, addresses, mtu=1500):
        h = cls(tag, addresses, mtu)
        try:
            h.create()
            yield h
        finally:
            h.destroy()

    def create(self):
        for ns in (self.switch, *self.ns.values()):
            _ip("netns", "add", ns)
            self.made.append(ns)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, (h, ns) in enumerate(self.ns.items(), 1):
            # One veth pair per host: eth0 in the host, pN on the bridge. Created in place, so no
            # interface ever appears in the machine's own namespace.
            _ip("-n", self.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.switch, "link", "set", f"p{i}", "mtu", str(self.mtu), "master", "br0", "up")
            _ip("-n", ns, "link", "set", "eth0", "mtu", str(self.mtu))
            _ip("-n", ns, "addr", "add", f"{self.addresses[h]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def write_hosts_files(self):
        """Let the hosts find each other by name: /etc/netns/NS/hosts, which `ip netns exec` (and so the
        agent) mounts over /etc/hosts inside NS. Removed again by destroy()."""
        lines = ["127.0.0.1 localhost"] + [f"{a} {h}" for h, a in self.addresses.items()]
        for ns in self.ns.values():
            d = NETNS_ETC / ns
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text("\n".join(lines) + "\n")
            self.etc_dirs.append(d)

    def agent_map(self):
        """$LENET_NETNS_HOSTS for tests/netns_agent.sh."""
        return " ".join(f"{ns}:{h}:{self.addresses[h]}" for h, ns in self.ns.items())

    def eth0_bytes(self, host):
        """(received, sent) bytes on host's eth0 so far."""
        stats = json.loads(_ip("-n", self.ns[host], "-s", "-j", "link", "show", "dev", "eth0"))[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]

    def shape(self, host, rate_bits):
        """Cap host's link at `rate_bits` bit/s both ways, with a token bucket (tc tbf; netem is not in
        every kernel): on its eth0 for what it sends, on its bridge port for what it receives. Calling it
        again replaces the cap; destroy() removes it with the namespaces."""
        i = list(self.ns).index(host) + 1
        rate_bytes = rate_bits / 8
        burst = tbf_burst(rate_bits)
        limit = max(4 << 20, int(rate_bytes * 0.05))         # a queue that holds every step's messages
        for ns, dev in ((self.ns[host], "eth0"), (self.switch, f"p{i}")):
            subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                            f"{int(rate_bits)}bit", "burst", str(burst), "limit", str(limit)],
                           capture_output=True, text=True, timeout=20, check=True)

    def link_down(self, host):
        """Cut host off the network (its end of the bridge goes down), as a lost host would be."""
        i = list(self.ns).index(host) + 1
        _ip("-n", self.switch, "link", "set", f"p{i}", "down")

    def popen(self, host, argv, cwd=None, **popen):
        """Start argv on `host` through the agent, as `ssh host argv` would."""
        line = (f"cd {shlex.quote(str(cwd))} && " if cwd else "") + f"exec {shlex.join(map(str, argv))}"
        env = dict(popen.pop("env", None) or os.environ)
        env.setdefault("LENET_NETNS_HOSTS", self.agent_map())
        return subprocess.Popen([str(AGENT), host, line], env=env, **popen)

    def popen_keeping_sys(self, host, argv, cwd=None, **popen):
        """Start argv on `host` like popen(), but with the machine's /sys, which `ip netns exec` replaces by
        a fresh sysfs without /sys/fs/cgroup (slurmd needs its cgroup mounts even when it uses no cgroups):
        only the network namespace is entered; hostname and /etc/hosts (see write_hosts_files) are private."""
        hosts_file = NETNS_ETC / self.ns[host] / "hosts"
        script = ('[ ! -f "$1" ] || mount --bind "$1" /etc/hosts && hostname "$0" && cd "$2" && shift 2 '
                  '&& exec "$@"')
        return subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns[host]}", "unshare", "--uts", "--mount",
                                 "sh", "-c", script, host, str(hosts_file), str(cwd or "/"), *map(str, argv)],
                                **popen)

    def destroy(self):
        """Kill what still runs in our namespaces (only processes this test started), then delete them."""
        for ns in self.made:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()
        for d in self.etc_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.etc_dirs.clear()


@contextlib.contextmanager
def made_or_skip(make, unmake, why=None):
    """Run `make()` (which builds namespaces), yield, `unmake()` afterwards; pytest.skip saying exactly why
    where they cannot be made: `why` (a reason known beforehand) or the command that failed."""
    import pytest
    if why:
        pytest.skip(why)
    try:
        try:
            make()
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot make network namespaces here: '{shlex.join(e.cmd)}' failed: {e.stderr.strip()}")
        yield
    finally:
        unmake()


@contextlib.contextmanager
def hosts_or_skip(tag, addresses):
    """Hosts for one test, destroyed afterwards; pytest.skip saying exactly why where they cannot be made."""
    why = unavailable()
    h = None if why else Hosts(tag, addresses)
    with made_or_skip(lambda: h.create(), lambda: h and h.destroy(), why):
        yield h
