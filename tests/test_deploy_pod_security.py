"""Every pod the deploy/k8s manifests make meets the Pod Security Standards' "restricted" profile (the
baseline rules and the restricted ones), checked offline by a table of the documented rules:
https://kubernetes.io/docs/concepts/security/pod-security-standards/ (the policies as of Kubernetes 1.30).

A pod is any object with `containers`: a Deployment's template, each MPIJob replica's template. Each rule
is one row: its name and a function from (pod spec, pod metadata) to the violations it finds. The table is
checked against pods that break each rule once, so every row can fail.
"""
import copy
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))

# Baseline: the capabilities a container may add; restricted narrows it to NET_BIND_SERVICE.
BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                 "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
APPARMOR_PREFIX = "container.apparmor.security.beta.kubernetes.io/"


def containers(spec):
    """(kind, container) of every container, init and ephemeral container of a pod spec."""
    return [(kind, c) for kind in ("containers", "initContainers", "ephemeralContainers") for c in spec.get(kind, [])]


def ctx(c):
    return c.get("securityContext") or {}


def each(spec, check):
    """Violations of a per-container rule: check(container) -> message or None."""
    return [f"{kind} {c.get('name')}: {why}" for kind, c in containers(spec) if (why := check(c))]


def host_process(spec, meta):
    found = [(spec.get("securityContext") or {}).get("windowsOptions", {}).get("hostProcess")]
    found += [ctx(c).get("windowsOptions", {}).get("hostProcess") for _, c in containers(spec)]
    return ["windowsOptions.hostProcess is true"] if any(found) else []


def host_namespaces(spec, meta):
    return [f"{k} is true" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]


def privileged(spec, meta):
    return each(spec, lambda c: "privileged" if ctx(c).get("privileged") else None)


def baseline_capabilities(spec, meta):
    def check(c):
        extra = set(ctx(c).get("capabilities", {}).get("add", [])) - BASELINE_CAPS
        return f"adds {sorted(extra)}" if extra else None
    return each(spec, check)


def host_path(spec, meta):
    return [f"volume {v['name']} is a hostPath" for v in spec.get("volumes", []) if "hostPath" in v]


def host_ports(spec, meta):
    return each(spec, lambda c: "hostPort set" if any(p.get("hostPort") for p in c.get("ports", [])) else None)


def apparmor(spec, meta):
    bad = [f"annotation {k}: {v}" for k, v in (meta.get("annotations") or {}).items()
           if k.startswith(APPARMOR_PREFIX) and v != "runtime/default" and not v.startswith("localhost/")]
    profiles = [(spec.get("securityContext") or {}).get("appArmorProfile")]
    profiles += [ctx(c).get("appArmorProfile") for _, c in containers(spec)]
    bad += [f"appArmorProfile {p['type']}" for p in profiles if p and p.get("type") not in ("RuntimeDefault", "Localhost")]
    return bad


def selinux(spec, meta):
    options = [(spec.get("securityContext") or {}).get("seLinuxOptions")]
    options += [ctx(c).get("seLinuxOptions") for _, c in containers(spec)]
    bad = []
    for o in filter(None, options):
        if o.get("type", "") not in SELINUX_TYPES:
            bad.append(f"seLinuxOptions.type {o['type']}")
        bad += [f"seLinuxOptions.{k} set" for k in ("user", "role") if o.get(k)]
    return bad


def proc_mount(spec, meta):
    return each(spec, lambda c: f"procMount {ctx(c)['procMount']}" if ctx(c).get("procMount", "Default") != "Default"
                else None)


def sysctls(spec, meta):
    return [f"sysctl {s['name']}" for s in (spec.get("securityContext") or {}).get("sysctls", [])
            if s["name"] not in SAFE_SYSCTLS]


def volume_types(spec, meta):
    bad = []
    for v in spec.get("volumes", []):
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"volume {v['name']}: {sorted(kinds - RESTRICTED_VOLUMES)}")
    return bad


def privilege_escalation(spec, meta):
    return each(spec, lambda c: None if ctx(c).get("allowPrivilegeEscalation") is False
                else "allowPrivilegeEscalation is not false")


def run_as_non_root(spec, meta):
    pod = (spec.get("securityContext") or {}).get("runAsNonRoot")
    bad = ["runAsNonRoot false in the pod"] if pod is False else []
    return bad + each(spec, lambda c: None if ctx(c).get("runAsNonRoot", pod) is True else "runAsNonRoot not true")


def non_root_user(spec, meta):
    bad = ["runAsUser 0 in the pod"] if (spec.get("securityContext") or {}).get("runAsUser") == 0 else []
    return bad + each(spec, lambda c: "runAsUser 0" if ctx(c).get("runAsUser") == 0 else None)


def baseline_seccomp(spec, meta):
    profiles = [(spec.get("securityContext") or {}).get("seccompProfile")]
    profiles += [ctx(c).get("seccompProfile") for _, c in containers(spec)]
    return ["seccompProfile Unconfined" for p in profiles if p and p.get("type") == "Unconfined"]


def seccomp(spec, meta):
    pod = ((spec.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
    bad = [f"pod seccompProfile {pod}"] if pod not in (None, "RuntimeDefault", "Localhost") else []

    def check(c):
        own = (ctx(c).get("seccompProfile") or {}).get("type")
        return None if (own or pod) in ("RuntimeDefault", "Localhost") else f"seccompProfile {own or pod or 'unset'}"
    return bad + each(spec, check)


def restricted_capabilities(spec, meta):
    def check(c):
        caps = ctx(c).get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            return "does not drop ALL capabilities"
        extra = set(caps.get("add", [])) - {"NET_BIND_SERVICE"}
        return f"adds {sorted(extra)}" if extra else None
    return each(spec, check)


# (profile, rule, check): the documented controls, in the documentation's order.
RULES = [
    ("baseline", "HostProcess", host_process),
    ("baseline", "Host Namespaces", host_namespaces),
    ("baseline", "Privileged Containers", privileged),
    ("baseline", "Capabilities", baseline_capabilities),
    ("baseline", "HostPath Volumes", host_path),
    ("baseline", "Host Ports", host_ports),
    ("baseline", "AppArmor", apparmor),
    ("baseline", "SELinux", selinux),
    ("baseline", "/proc Mount Type", proc_mount),
    ("baseline", "Seccomp", baseline_seccomp),
    ("baseline", "Sysctls", sysctls),
    ("restricted", "Volume Types", volume_types),
    ("restricted", "Privilege Escalation", privilege_escalation),
    ("restricted", "Running as Non-root", run_as_non_root),
    ("restricted", "Running as Non-root user", non_root_user),
    ("restricted", "Seccomp", seccomp),
    ("restricted", "Capabilities", restricted_capabilities),
]


def violations(spec, meta):
    return [f"{profile} {rule}: {why}" for profile, rule, check in RULES for why in check(spec, meta)]


def pods(doc, where):
    """(where, pod spec, pod metadata) of every pod template (or pod) in a manifest object."""
    if isinstance(doc, dict):
        if isinstance(doc.get("spec"), dict) and "containers" in doc["spec"]:
            yield where, doc["spec"], doc.get("metadata") or {}
        for k, v in doc.items():
            yield from pods(v, f"{where}.{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from pods(v, f"{where}[{i}]")


def manifest_pods():
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out += [(f"{path.name} {doc['kind']} {doc['metadata']['name']}{w}", s, m)
                        for w, s, m in pods(doc, "")]
    return out


def test_every_pod_of_the_manifests_is_found():
    where = sorted(w for w, _, _ in manifest_pods())
    assert where == ["evaluator.yaml Deployment lenet-evaluator.spec.template",
                     "mpijob.yaml MPIJob lenet.spec.mpiReplicaSpecs.Launcher.template",
                     "mpijob.yaml MPIJob lenet.spec.mpiReplicaSpecs.Worker.template"], where


@pytest.mark.parametrize("where,spec,meta", manifest_pods(), ids=lambda v: v if isinstance(v, str) else "")
def test_pod_meets_the_restricted_profile(where, spec, meta):
    assert violations(spec, meta) == [], where


def compliant():
    return {"securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "image": "x", "securityContext": {
                "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
            "volumes": [{"name": "v", "emptyDir": {}}]}


def c0(spec):
    return spec["containers"][0].setdefault("securityContext", {})


# (rule the change breaks, change to a compliant pod spec): one row per way a pod can fail.
BREAKS = [
    ("HostProcess", lambda s: c0(s).update(windowsOptions={"hostProcess": True})),
    ("Host Namespaces", lambda s: s.update(hostNetwork=True)),
    ("Host Namespaces", lambda s: s.update(hostPID=True)),
    ("Privileged Containers", lambda s: c0(s).update(privileged=True)),
    ("Capabilities", lambda s: c0(s)["capabilities"].update(add=["SYS_ADMIN"])),
    ("Capabilities", lambda s: c0(s)["capabilities"].update(drop=["NET_RAW"])),
    ("HostPath Volumes", lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
    ("Host Ports", lambda s: s["containers"][0].update(ports=[{"containerPort": 80, "hostPort": 80}])),
    ("AppArmor", lambda s: c0(s).update(appArmorProfile={"type": "Unconfined"})),
    ("SELinux", lambda s: s["securityContext"].update(seLinuxOptions={"type": "spc_t"})),
    ("/proc Mount Type", lambda s: c0(s).update(procMount="Unmasked")),
    ("Seccomp", lambda s: s["securityContext"].pop("seccompProfile")),
    ("Seccomp", lambda s: c0(s).update(seccompProfile={"type": "Unconfined"})),
    ("Sysctls", lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}])),
    ("Volume Types", lambda s: s["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}})),
    ("Privilege Escalation", lambda s: c0(s).pop("allowPrivilegeEscalation")),
    ("Running as Non-root", lambda s: s["securityContext"].pop("runAsNonRoot")),
    ("Running as Non-root", lambda s: c0(s).update(runAsNonRoot=False)),
    ("Running as Non-root user", lambda s: c0(s).update(runAsUser=0)),
    ("Capabilities", lambda s: c0(s).pop("capabilities")),
    ("Privilege Escalation", lambda s: s.update(initContainers=[dict(s["containers"][0], name="init",
                                                                     securityContext={"capabilities": {"drop": ["ALL"]}})])),
]


def test_a_compliant_pod_passes():
    assert violations(compliant(), {}) == []


@pytest.mark.parametrize("rule,change", BREAKS, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BREAKS)])
def test_each_rule_catches_what_it_forbids(rule, change):
    spec = copy.deepcopy(compliant())
    change(spec)
    found = violations(spec, {})
    assert any(f" {rule}: " in v for v in found), found


def test_an_apparmor_annotation_other_than_the_default_is_caught():
    meta = {"annotations": {APPARMOR_PREFIX + "c": "unconfined"}}
    assert any("AppArmor" in v for v in violations(compliant(), meta))
