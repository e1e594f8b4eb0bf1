"""Checks on the deploy/ recipes: they parse, they hold together, and the scripts build the launch lines
they promise. Fast and offline: the MPI, Slurm and ssh commands are stand-ins that record their arguments.
"""
import functools
import gzip
import os
import re
import shlex
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCRIPTS = sorted([*DEPLOY.rglob("*.sh"), *DEPLOY.rglob("*.sbatch")])
PUBLISH_PORT, RESULTS_PORT = 5555, 5556
SYSTEM_PATH = "/usr/bin:/bin"

MPICH_VERSION = "HYDRA build details:\n    Version:                                 5.0.2\n"
OPENMPI_VERSION = "mpirun (Open MPI) 4.1.6\n\nReport bugs to https://www.open-mpi.org/community/help/\n"


# ---------------------------------------------------------------- helpers

def read(rel):
    return (DEPLOY / rel).read_text()


def yaml_docs(rel):
    return [d for d in yaml.safe_load_all(read(rel)) if d is not None]


def one(docs, kind):
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def flag(args, name):
    """The value after `name` in an argument list."""
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def host_port(url):
    m = re.fullmatch(r"tcp://([^:/]+):(\d+)", url)
    assert m, f"not a tcp://HOST:PORT address: {url}"
    return m.group(1), int(m.group(2))


def joined_lines(text):
    """Lines with backslash continuations joined, as a shell would read them."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def pip_install_args(line):
    """The arguments of the `pip install` command on a line, quotes kept, or None.

    Stops at a backtick (inline code in Markdown), a comment, or a shell operator."""
    m = re.search(r"\bpip install\s+([^`]*)", line)
    if not m:
        return None
    lexer = shlex.shlex(m.group(1), posix=False, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    args = []
    for tok in lexer:
        if tok in {";", "&", "&&", "|", "||"} or tok == "\\":
            break
        args.append(tok)
    return " ".join(args)


def fake_bin(tmp_path, **commands):
    """A directory of stand-in commands. Each records its argv (one argument a line) in its own file
    under calls/ (background calls may overlap) unless the body returns first."""
    bindir, calls = tmp_path / "bin", tmp_path / "calls"
    bindir.mkdir(exist_ok=True)
    calls.mkdir(exist_ok=True)
    for name, body in commands.items():
        script = bindir / name
        script.write_text(textwrap.dedent(f"""\
            #!/bin/bash
            {body}
            f=$(mktemp "{calls}/call.XXXXXX")
            printf '%s\\n' "{name}" "$@" > "$f"
            """))
        script.chmod(0o755)
    return bindir


def recorded_calls(tmp_path):
    out = []
    for f in sorted((tmp_path / "calls").iterdir()):
        argv = f.read_text().split("\n")[:-1]
        out.append(argv)
    return out


def system_path_without(tmp_path, *hidden):
    """A directory standing for /usr/bin:/bin with every command but `hidden` (a real srun may be installed)."""
    sysbin = tmp_path / "sysbin"
    sysbin.mkdir()
    for d in SYSTEM_PATH.split(":"):
        for exe in Path(d).iterdir():
            if exe.name not in hidden and not (sysbin / exe.name).exists():
                (sysbin / exe.name).symlink_to(exe)
    return str(sysbin)


def run_script(script, tmp_path, bindir, env_extra, args=(), system_path=SYSTEM_PATH):
    env = {"PATH": f"{bindir}:{system_path}", "HOME": str(tmp_path), "LANG": "C"}
    env.update(env_extra)
    return subprocess.run(["bash", str(script), *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=30)


# ---------------------------------------------------------------- shell scripts

def test_there_are_scripts():
    names = {p.relative_to(DEPLOY).as_posix() for p in SCRIPTS}
    assert {"launch-hostfile.sh", "slurm/train.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    assert script.read_text().startswith("#!"), "no shebang line"
    assert os.access(script, os.X_OK), f"{script.name} is not executable"


@pytest.mark.parametrize("flavor", ["mpich", "openmpi"])
def test_launch_hostfile_builds_the_right_mpirun_line(tmp_path, flavor):
    version = MPICH_VERSION if flavor == "mpich" else OPENMPI_VERSION
    bindir = fake_bin(tmp_path, mpirun=f'if [ "$1" = --version ]; then printf %s "{version}"; exit 0; fi')
    result = run_script(DEPLOY / "launch-hostfile.sh", tmp_path, bindir,
                        {"EVALUATOR": "evalhost", "KEYS_DIR": "/k", "LENET_DATA_DIR": "/d"},
                        args=["--epochs", "3"])
    assert result.returncode == 0, result.stderr
    calls = recorded_calls(tmp_path)
    assert len(calls) == 2, calls                       # pre-flight, then training
    check, train = (c for c in sorted(calls, key=lambda c: "--check" not in c))
    assert "--check" in check and "--check" not in train
    assert check[check.index("lenet-train") + 1:] == ["--check", *train[train.index("lenet-train") + 1:]]

    hostfile = DEPLOY / f"hosts.{flavor}"
    if flavor == "mpich":
        assert flag(train, "-f") == str(hostfile)
        assert flag(train, "-ppn") == "2"
        assert flag(train, "-launcher") == "ssh" and flag(train, "-launcher-exec") == "ssh"
        assert "--hostfile" not in train
    else:
        assert flag(train, "--hostfile") == str(hostfile)
        assert flag(train, "--map-by") == "ppr:2:node"
        assert "-x" in train and "LENET_DATA_DIR" in train
        assert "-ppn" not in train and "-f" not in train
    assert flag(train, "-n") == "4"                     # 2 hosts x 2 ranks
    assert host_port(flag(train, "--publish")) == ("0.0.0.0", PUBLISH_PORT)
    assert host_port(flag(train, "--results")) == ("evalhost", RESULTS_PORT)
    assert flag(train, "--curve-secret-key") == "/k/trainer.key_secret"
    assert flag(train, "--curve-authorized") == "/k/authorized"
    assert train[-2:] == ["--epochs", "3"]


def test_launch_hostfile_refuses_an_unknown_mpi(tmp_path):
    bindir = fake_bin(tmp_path, mpirun='echo "some other launcher 1.0"; exit 0')
    result = run_script(DEPLOY / "launch-hostfile.sh", tmp_path, bindir, {})
    assert result.returncode != 0
    assert "MPI_FLAVOR" in result.stderr


def test_launch_hostfile_dry_run_runs_nothing(tmp_path):
    bindir = fake_bin(tmp_path, mpirun=f'if [ "$1" = --version ]; then printf %s "{MPICH_VERSION}"; exit 0; fi')
    result = run_script(DEPLOY / "launch-hostfile.sh", tmp_path, bindir, {"DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    assert recorded_calls(tmp_path) == []
    assert result.stderr.count("+ mpirun") == 2


def slurm_env(tmp_path, nodes):
    return {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "mnist-a",
            "SLURM_SUBMIT_DIR": str(tmp_path),
            "FAKE_NODES": " ".join(nodes), "EVAL_GRACE": "2"}


SCONTROL = 'if [ "$1 $2" = "show hostnames" ]; then printf "%s\\n" $FAKE_NODES; exit 0; fi'


@pytest.mark.parametrize("nodes", [["n1", "n2", "n3"], ["n1"]], ids=["3 nodes", "1 node"])
def test_sbatch_with_srun(tmp_path, nodes):
    bindir = fake_bin(tmp_path, scontrol=SCONTROL,
                      srun='if [ "$1" = --mpi=list ]; then printf "MPI plugin types are...\\n\\tnone\\n\\tpmi2\\n"; exit 0; fi')
    result = run_script(DEPLOY / "slurm/train.sbatch", tmp_path, bindir, slurm_env(tmp_path, nodes),
                        args=["--epochs", "1"])
    assert result.returncode == 0, result.stderr
    calls = [c for c in recorded_calls(tmp_path) if c[0] == "srun"]
    evaluator = [c for c in calls if "lenet-evaluator" in c]
    train = [c for c in calls if "lenet-train" in c and "--check" not in c]
    check = [c for c in calls if "--check" in c]
    assert len(evaluator) == len(train) == len(check) == 1, calls
    (evaluator,), (train,) = evaluator, train
    rank0, eval_host = nodes[0], nodes[-1]
    train_nodes = nodes[:-1] or nodes

    assert "--mpi=pmi2" in train and "--kill-on-bad-exit=1" in train
    assert f"--nodelist={','.join(train_nodes)}" in train
    assert f"--ntasks={2 * len(train_nodes)}" in train
    assert host_port(flag(train, "--publish")) == ("0.0.0.0", PUBLISH_PORT)
    assert host_port(flag(train, "--results")) == (eval_host, RESULTS_PORT)
    assert train[-2:] == ["--epochs", "1"]

    assert "--nodes=1" in evaluator and "--ntasks=1" in evaluator
    assert f"--nodelist={eval_host}" in evaluator
    assert ("--overlap" if len(nodes) == 1 else "--exclusive") in evaluator
    assert host_port(flag(evaluator, "--connect")) == (rank0, PUBLISH_PORT)
    assert host_port(flag(evaluator, "--results-bind")) == ("0.0.0.0", RESULTS_PORT)
    # The run folder is named after the job, so that the same job submitted again resumes there.
    run_dir = tmp_path / "runs" / "mnist-a"
    assert flag(evaluator, "--report") == str(run_dir / "evaluator.jsonl")
    assert flag(train, "--checkpoint-dir") == str(run_dir / "checkpoints") and "--resume" in train
    assert "--resume" in check[0]


def test_sbatch_resume_can_be_turned_off_and_evaluator_flags_added(tmp_path):
    bindir = fake_bin(tmp_path, scontrol=SCONTROL,
                      srun='if [ "$1" = --mpi=list ]; then printf "MPI plugin types are...\\n\\tpmi2\\n"; exit 0; fi')
    result = run_script(DEPLOY / "slurm/train.sbatch", tmp_path, bindir,
                        dict(slurm_env(tmp_path, ["n1", "n2"]), RESUME="0", EVAL_ARGS="--no-download --timeout 60"))
    assert result.returncode == 0, result.stderr
    calls = [c for c in recorded_calls(tmp_path) if c[0] == "srun" and "--mpi=list" not in c]
    assert calls and not any("--resume" in c for c in calls), calls
    (evaluator,) = [c for c in calls if "lenet-evaluator" in c]
    assert evaluator[-3:] == ["--no-download", "--timeout", "60"]


def test_sbatch_header_makes_resuming_the_default():
    header = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", read("slurm/train.sbatch"), re.M))
    assert header["requeue"] == "" and header["dependency"] == "singleton"
    assert header["open-mode"] == "append" and "%x" in header["output"]


def test_sbatch_header_asks_for_a_warning_before_the_time_limit():
    header = re.findall(r"^#SBATCH --signal=(\S+)", read("slurm/train.sbatch"), re.M)
    # B: to the batch script alone (it passes the signal to the ranks), not to the evaluator's step.
    assert len(header) == 1 and re.fullmatch(r"B:USR1@\d+", header[0]), header


# A launcher that runs until a signal: it notes which one in marks/ and exits 128 + its number.
LONG_RUNNING = """
for a in "$@"; do [ "$a" = lenet-train ] && what=train; [ "$a" = lenet-evaluator ] && what=evaluator; done
for a in "$@"; do [ "$a" = --check ] && what=; done
if [ -n "$what" ]; then
    for sig in USR1:138 TERM:143; do
        trap "echo ${sig%:*} >> $MARKS/$what; exit ${sig#*:}" "${sig%:*}"
    done
    touch "$MARKS/$what.started"
    while :; do sleep 0.05; done
fi
"""


def test_sbatch_passes_the_time_limit_warning_to_the_ranks_and_requeues(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    bindir = fake_bin(tmp_path, scontrol=SCONTROL, srun='if [ "$1" = --mpi=list ]; then printf "\\tpmi2\\n"; exit 0; fi'
                      + LONG_RUNNING)
    env = {"PATH": f"{bindir}:{SYSTEM_PATH}", "HOME": str(tmp_path), "LANG": "C", "MARKS": str(marks),
           **slurm_env(tmp_path, ["n1", "n2", "n3"])}
    job = subprocess.Popen(["bash", str(DEPLOY / "slurm/train.sbatch"), "--epochs", "1"], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (marks / "train.started").exists():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)                 # Slurm's --signal=B:USR1@N, to the batch script
        out, err = job.communicate(timeout=20)
    finally:
        job.kill()
    assert (marks / "train").read_text() == "USR1\n", err        # passed on to the ranks, once
    assert (marks / "evaluator").read_text() == "USR1\n", err    # stopped (srun passes USR1 on, not warned)
    assert ["scontrol", "requeue", "42"] in recorded_calls(tmp_path), err
    assert job.returncode == 138, err
    train = [c for c in recorded_calls(tmp_path) if "--check" in c][0]
    assert train[train.index("--resume") + 1] == "auto", train


def test_sbatch_warned_before_training_requeues_without_starting_it(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    check = 'for a in "$@"; do [ "$a" = --check ] && { touch "$MARKS/check.started"; sleep 1; exit 0; }; done'
    bindir = fake_bin(tmp_path, scontrol=SCONTROL, srun='if [ "$1" = --mpi=list ]; then printf "\\tpmi2\\n"; exit 0; fi\n'
                      + check + LONG_RUNNING)
    env = {"PATH": f"{bindir}:{SYSTEM_PATH}", "HOME": str(tmp_path), "LANG": "C", "MARKS": str(marks),
           **slurm_env(tmp_path, ["n1", "n2", "n3"])}
    job = subprocess.Popen(["bash", str(DEPLOY / "slurm/train.sbatch")], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (marks / "check.started").exists():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.02)
        job.send_signal(signal.SIGUSR1)                 # during the pre-flight check
        out, err = job.communicate(timeout=20)
    finally:
        job.kill()
    assert not (marks / "train.started").exists(), err
    assert ["scontrol", "requeue", "42"] in recorded_calls(tmp_path), err


def test_sbatch_requeues_nothing_without_the_warning(tmp_path):
    bindir = fake_bin(tmp_path, scontrol=SCONTROL,
                      srun='if [ "$1" = --mpi=list ]; then printf "\\tpmi2\\n"; exit 0; fi')
    result = run_script(DEPLOY / "slurm/train.sbatch", tmp_path, bindir, slurm_env(tmp_path, ["n1", "n2", "n3"]))
    assert result.returncode == 0, result.stderr
    assert not [c for c in recorded_calls(tmp_path) if c[0] == "scontrol"], recorded_calls(tmp_path)


@pytest.mark.parametrize("flavor", ["mpich", "openmpi"])
def test_sbatch_falls_back_to_mpirun_without_srun(tmp_path, flavor):
    version = MPICH_VERSION if flavor == "mpich" else OPENMPI_VERSION
    bindir = fake_bin(tmp_path, scontrol=SCONTROL, ssh="",
                      mpirun=f'if [ "$1" = --version ]; then printf %s "{version}"; exit 0; fi')
    result = run_script(DEPLOY / "slurm/train.sbatch", tmp_path, bindir,
                        slurm_env(tmp_path, ["n1", "n2", "n3"]), system_path=system_path_without(tmp_path, "srun"))
    assert result.returncode == 0, result.stderr
    calls = recorded_calls(tmp_path)
    train = [c for c in calls if c[0] == "mpirun" and "lenet-train" in c and "--check" not in c]
    assert len(train) == 1, calls
    train = train[0]
    if flavor == "mpich":
        assert flag(train, "-hosts") == "n1,n2" and flag(train, "-ppn") == "2"
        assert flag(train, "-launcher") == "ssh"
    else:
        assert flag(train, "--host") == "n1:2,n2:2" and flag(train, "--map-by") == "ppr:2:node"
    assert flag(train, "-n") == "4"
    assert host_port(flag(train, "--results")) == ("n3", RESULTS_PORT)

    ssh = [c for c in calls if c[0] == "ssh"]
    assert len(ssh) == 1 and ssh[0][1] == "n3", calls
    remote = shlex.split(ssh[0][2])
    assert remote[0] == "env" and any(a.endswith("lenet-evaluator") for a in remote)
    assert host_port(flag(remote, "--connect")) == ("n1", PUBLISH_PORT)


# ---------------------------------------------------------------- hostfiles

def hostfile_lines(rel):
    return [ln.strip() for ln in read(rel).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_hostfiles_use_each_mpis_syntax():
    mpich, openmpi = hostfile_lines("hosts.mpich"), hostfile_lines("hosts.openmpi")
    assert mpich and all(re.fullmatch(r"[\w.-]+:\d+", ln) for ln in mpich), mpich
    assert openmpi and all(re.fullmatch(r"[\w.-]+ slots=\d+", ln) for ln in openmpi), openmpi
    assert [ln.split(":")[0] for ln in mpich] == [ln.split()[0] for ln in openmpi]


# ---------------------------------------------------------------- Kubernetes

def readme_secrets():
    """Secret name -> keys, from the `kubectl create secret generic` commands in deploy/README.md."""
    secrets = {}
    for line in joined_lines(read("README.md")):
        m = re.search(r"kubectl create secret generic (\S+)(.*)", line)
        if m:
            secrets[m.group(1)] = set(re.findall(r"--from-file=([^=\s]+)=", m.group(2)))
    return secrets


def check_secret_volume(pod_spec, container, secrets):
    """The container mounts a Secret created in the README, and every key file its flags name is in it."""
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    mounted = [(m, volumes[m["name"]]["secret"]) for m in container["volumeMounts"]
               if "secret" in volumes[m["name"]]]
    assert len(mounted) == 1, "expected one Secret volume"
    mount, secret = mounted[0]
    assert mount.get("readOnly") is True
    assert secret["secretName"] in secrets, f"{secret['secretName']} is not created in deploy/README.md"
    keys = secrets[secret["secretName"]]
    if "items" in secret:
        assert {i["key"] for i in secret["items"]} <= keys
        paths = {i["path"] for i in secret["items"]}
    else:
        paths = keys
    args = container.get("args", [])
    named = [a for a in args if a.startswith(mount["mountPath"] + "/")]
    assert named, "no flag uses the mounted keys"
    for path in named:
        rel = path[len(mount["mountPath"]) + 1:]
        assert rel in paths or any(p.startswith(rel + "/") for p in paths), f"{path} is not in the Secret"


def test_mpijob():
    job = one(yaml_docs("k8s/mpijob.yaml"), "MPIJob")
    assert job["apiVersion"] == "kubeflow.org/v2beta1"
    spec = job["spec"]
    slots = spec["slotsPerWorker"]
    assert isinstance(slots, int) and slots >= 1
    assert spec["mpiImplementation"] == "MPICH"          # the image's MPI
    replicas = spec["mpiReplicaSpecs"]
    assert set(replicas) == {"Launcher", "Worker"}
    assert replicas["Launcher"]["replicas"] == 1
    workers = replicas["Worker"]["replicas"]
    launcher = replicas["Launcher"]["template"]["spec"]["containers"][0]
    worker_pod = replicas["Worker"]["template"]["spec"]
    worker = worker_pod["containers"][0]
    assert launcher["image"] == worker["image"]

    line = launcher.get("command", []) + launcher.get("args", [])
    assert line[0] == "mpirun" and "lenet-train" in line
    assert int(flag(line, "-n")) == workers * slots
    threads = int(flag(line, "--threads"))
    assert float(worker["resources"]["requests"]["cpu"]) == slots * threads
    assert host_port(flag(line, "--publish")) == ("0.0.0.0", PUBLISH_PORT)
    assert host_port(flag(line, "--results"))[1] == RESULTS_PORT
    assert worker["command"][0].endswith("sshd")
    assert {p["containerPort"] for p in worker["ports"]} >= {2222, PUBLISH_PORT}
    # Ranks run on the workers: the trainer's key files must be mounted there.
    check_secret_volume(worker_pod, dict(worker, args=line), readme_secrets())


def test_evaluator_deployment_and_service():
    docs = yaml_docs("k8s/evaluator.yaml")
    deployment, service = one(docs, "Deployment"), one(docs, "Service")
    assert deployment["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    container = pod["spec"]["containers"][0]
    args = container["command"] + container["args"]
    assert args[0] == "lenet-evaluator"
    for name in ("--connect", "--data-dir", "--report", "--results-bind"):
        assert name in args
    bind_port = host_port(flag(args, "--results-bind"))[1]
    assert bind_port == RESULTS_PORT
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["port"] == RESULTS_PORT
    assert ports[svc_port["targetPort"]] == bind_port
    check_secret_volume(pod["spec"], container, readme_secrets())


# The MPI Operator's naming rule for the release the manifests require (deploy/README.md), read in its
# controller (kubeflow/mpi-operator, tag v0.5.0, pkg/controller/mpi_job_controller.go): worker i's pod and
# hostname are JOB-worker-i (workerName), every pod of the job gets the subdomain JOB (newWorker,
# newLauncherJob), the headless Service of that name is created for them (newJobService), and the hostfile
# lists the launcher first only with runLauncherAsWorker, then the workers in index order (newConfigMap).
# The launcher is the batch Job JOB-launcher; JOB-config and JOB-ssh hold the hostfile and the ssh keys.
# v0.4.0 and older named the Service and subdomain JOB-worker, which is why this is checked, not assumed.
MPI_OPERATOR_VERSION = "v0.5.0"
MPIJOB_CRD = ROOT / "tests" / "data" / f"mpi-operator-{MPI_OPERATOR_VERSION}-mpijobs-crd.yaml.gz"
CLUSTER_DOMAIN = "cluster.local"


def operator_names(job):
    """What the operator creates for an MPIJob: Service/subdomain, pod hostnames in hostfile order, others."""
    name = job["metadata"]["name"]
    specs = job["spec"]["mpiReplicaSpecs"]
    workers = [f"{name}-worker-{i}" for i in range(specs["Worker"].get("replicas", 1))]
    launcher_too = job["spec"].get("runLauncherAsWorker", False)
    return {"subdomain": name, "hostfile": [f"{name}-launcher"] * launcher_too + workers,
            "services": {name}, "jobs": {f"{name}-launcher"}, "configmaps": {f"{name}-config"},
            "secrets": {f"{name}-ssh"}}


def pod_dns_names(hostname, subdomain, namespace):
    """The names a pod with hostname and subdomain (under a headless Service of that name) answers to, from a
    pod in `namespace` (its DNS search list starts with NAMESPACE.svc.CLUSTER_DOMAIN)."""
    full = f"{hostname}.{subdomain}.{namespace}.svc.{CLUSTER_DOMAIN}"
    parts = full.split(".")
    return {".".join(parts[:k]) for k in range(2, len(parts) + 1)}


def test_evaluator_finds_rank_0_by_the_operators_names():
    job = one(yaml_docs("k8s/mpijob.yaml"), "MPIJob")
    names = operator_names(job)
    docs = yaml_docs("k8s/evaluator.yaml")
    deployment = one(docs, "Deployment")
    namespace = job["metadata"].get("namespace", "default")
    assert deployment["metadata"].get("namespace", "default") == namespace, "short names need one namespace"
    evaluator = deployment["spec"]["template"]["spec"]["containers"][0]["args"]

    # Rank 0 is the first host of the operator's hostfile (mpirun -n fills hosts in order).
    rank0 = names["hostfile"][0]
    host, port = host_port(flag(evaluator, "--connect"))
    assert host in pod_dns_names(rank0, names["subdomain"], namespace), \
        f"{host} is not rank 0 ({rank0} under Service {names['subdomain']}) for MPI Operator {MPI_OPERATOR_VERSION}"
    assert port == PUBLISH_PORT
    assert rank0.endswith("-worker-0"), "rank 0 should be a worker (runLauncherAsWorker off): it binds 5555"


def test_trainer_finds_the_evaluator_service_on_kubernetes():
    job = one(yaml_docs("k8s/mpijob.yaml"), "MPIJob")
    launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    train = launcher["command"] + launcher["args"]
    docs = yaml_docs("k8s/evaluator.yaml")
    service = one(docs, "Service")["metadata"]["name"]
    assert host_port(flag(train, "--results")) == (service, RESULTS_PORT)
    # Our objects must not take a name the operator creates for the job.
    names = operator_names(job)
    for doc in docs:
        taken = {"Service": names["services"], "Job": names["jobs"], "ConfigMap": names["configmaps"],
                 "Secret": names["secrets"]}.get(doc["kind"], set())
        assert doc["metadata"]["name"] not in taken, f"{doc['kind']} {doc['metadata']['name']} clashes"
    assert {*readme_secrets()}.isdisjoint(names["secrets"])


# ---------------------------------------------------------------- Kubernetes schemas (offline)

def strict(schema):
    """A CRD's OpenAPI schema with unknown fields rejected, as `kubectl apply --validate=strict` does."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def validate_builtin(doc):
    """Validate a built-in kind offline against the Kubernetes schema, unknown fields rejected."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    version = kv.latest_version()
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as e:
        pytest.fail(f"{doc['kind']} {doc['metadata'].get('name')}: {e.message} at {list(e.path)}")


@pytest.mark.parametrize("kind", ["Deployment", "Service"])
def test_evaluator_manifest_validates(kind):
    validate_builtin(one(yaml_docs("k8s/evaluator.yaml"), kind))


def mpijob_validator():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema comes with kubernetes-validate")
    return _mpijob_validator(jsonschema)


@functools.lru_cache(maxsize=1)
def _mpijob_validator(jsonschema):
    crd = yaml.load(gzip.decompress(MPIJOB_CRD.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v2beta1"]
    return jsonschema.Draft4Validator(strict(version["schema"]["openAPIV3Schema"]))


def test_mpijob_validates_against_the_operators_crd():
    job = one(yaml_docs("k8s/mpijob.yaml"), "MPIJob")
    errors = [f"{e.message} at {list(e.path)}" for e in mpijob_validator().iter_errors(job)]
    assert not errors, "\n".join(errors)
    # The CRD leaves metadata to the API server: check the job's and each pod template's against ObjectMeta.
    metas = [job["metadata"]] + [r["template"].get("metadata", {}) for r in job["spec"]["mpiReplicaSpecs"].values()]
    for meta in metas:
        validate_builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", **meta}})


def test_schema_validation_rejects_unknown_fields():
    """The validation above can fail: a misspelt field anywhere in the MPIJob or the Deployment is caught."""
    job = one(yaml_docs("k8s/mpijob.yaml"), "MPIJob")
    job["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resource"] = {}
    job["spec"]["slotPerWorker"] = 2
    paths = sorted(str(list(e.path)) for e in mpijob_validator().iter_errors(job))
    assert len(paths) == 2, paths
    job = one(yaml_docs("k8s/mpijob.yaml"), "MPIJob")
    job["spec"]["mpiImplementation"] = "MVAPICH"
    assert list(mpijob_validator().iter_errors(job))

    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    deployment = one(yaml_docs("k8s/evaluator.yaml"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, kv.latest_version(), strict=True)


# ---------------------------------------------------------------- systemd

def unit_sections(text):
    sections, current = {}, None
    for line in joined_lines(text):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit():
    text = read("systemd/lenet-evaluator.service")
    unit = unit_sections(text)
    assert {"Unit", "Service", "Install"} <= unit.keys()
    service = unit["Service"]
    assert service["Restart"] == ["on-failure"]
    assert service["User"] and service["User"][-1] not in ("root", "0")
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert "EnvironmentFile" in service
    assert unit["Install"]["WantedBy"]

    exec_start = shlex.split(service["ExecStart"][0])
    assert exec_start[0].endswith("/lenet-evaluator")
    report_dir = str(Path(flag(exec_start, "--report")).parent)
    writable = " ".join(service.get("ReadWritePaths", [])).split()
    assert report_dir in writable, f"{report_dir} is not in ReadWritePaths"

    # Every ${VAR} the command uses is set in the example environment file.
    env_file = read("systemd/lenet-evaluator.env")
    defined = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", env_file, re.M))
    used = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", service["ExecStart"][0]))
    assert used <= defined, f"not in lenet-evaluator.env: {used - defined}"


def systemd_analyze():
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed (Debian package systemd; scripts/setup-tests.sh needs it)")
    return analyze


def unit_for_analysis(tmp_path):
    # The real ExecStart lives in a virtualenv that is not here; every other line is checked as is.
    text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", read("systemd/lenet-evaluator.service"), flags=re.M)
    unit = tmp_path / "lenet-evaluator.service"
    unit.write_text(text)
    return unit


def test_systemd_unit_verifies(tmp_path):
    result = subprocess.run([systemd_analyze(), "verify", str(unit_for_analysis(tmp_path))],
                            capture_output=True, text=True, timeout=30)
    complaints = [ln for ln in result.stderr.splitlines() if "lenet-evaluator.service" in ln]
    assert not complaints, "\n".join(complaints)


# systemd-analyze's exposure score (0 = locked down, 10 = unprotected) of the unit; 1.9 before
# ProtectProc, SocketBindAllow, UMask=0077, PrivateUsers and the narrower system call filter.
MAX_EXPOSURE = 1.1


def test_systemd_unit_exposure(tmp_path):
    result = subprocess.run([systemd_analyze(), "security", "--offline=yes", "--no-pager",
                             str(unit_for_analysis(tmp_path))], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for lenet-evaluator.service: (\d+\.\d+)", result.stdout)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, result.stdout
    # The port the unit may bind is the results port of the example environment file.
    service = unit_sections(read("systemd/lenet-evaluator.service"))["Service"]
    env = dict(re.findall(r"^([A-Z_]+)=(.*)$", read("systemd/lenet-evaluator.env"), re.M))
    assert service["SocketBindAllow"] == [f"tcp:{host_port(env['LENET_RESULTS_BIND'])[1]}"]
    assert service["SocketBindDeny"] == ["any"]


# ---------------------------------------------------------------- container

def dockerfile_instructions():
    """(instruction, arguments) of each Dockerfile line, continuations joined, comments left out."""
    lines = [ln.strip() for ln in joined_lines(read("Dockerfile")) if ln.strip() and not ln.lstrip().startswith("#")]
    return [tuple(ln.split(None, 1)) for ln in lines]


def lock_pins():
    """name -> (version, [sha256...]) from deploy/requirements.lock."""
    pins = {}
    for line in joined_lines(read("requirements.lock")):
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
            assert m, f"requirements.lock: not NAME==VERSION --hash=sha256:...: {line}"
            pins[m.group(1).lower().replace("_", "-")] = (m.group(2), re.findall(r"sha256:(\w+)", m.group(3)))
    return pins


def test_dockerfile_pins_its_base_and_fetches_no_frontend():
    text = read("Dockerfile")
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I), "a # syntax= line fetches a frontend"
    steps = dockerfile_instructions()
    froms = [args for op, args in steps if op == "FROM"]
    assert froms == ["${BASE_IMAGE}"], froms
    (base,) = [args for op, args in steps if op == "ARG" and args.startswith("BASE_IMAGE=")]
    assert re.fullmatch(r"BASE_IMAGE=python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    assert [args for op, args in steps if op == "USER"][-1] not in ("root", "0"), "the image should not run as root"


def test_dockerfile_installs_only_the_lock_offline():
    runs = " ; ".join(args for op, args in dockerfile_instructions() if op == "RUN")
    installs = re.findall(r"pip install ([^;&|]*)", runs)
    assert len(installs) == 2, installs
    lock, project = installs
    assert "--no-index" in lock and "--require-hashes" in lock and "requirements.lock" in lock
    assert "--no-index" in project and "--no-deps" in project and "--no-build-isolation" in project
    assert "lenet-data fetch" not in runs and "curl" not in runs and "wget" not in runs


def test_lock_pins_every_requirement_of_the_image():
    """The lock holds exactly what `pip install ".[mpich]"` needs (and the build backend), each version
    allowed by pyproject.toml, each with a wheel hash."""
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11")
    req = pytest.importorskip("packaging.requirements", reason="packaging comes with pip's tooling")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = [req.Requirement(r) for r in (*project["project"]["dependencies"],
                                           *project["project"]["optional-dependencies"]["mpich"],
                                           *project["build-system"]["requires"])]
    pins = lock_pins()
    names = {r.name.lower().replace("_", "-") for r in needed}
    assert set(pins) == names, f"lock pins {sorted(pins)}, the image needs {sorted(names)}"
    for r in needed:
        version, hashes = pins[r.name.lower().replace("_", "-")]
        assert r.specifier.contains(version, prereleases=True), f"{r.name}=={version} is outside '{r}'"
        assert hashes


def test_the_installed_package_has_every_subpackage():
    """The image installs the project non-editable (pip install --no-deps .): a package folder missing from
    pyproject.toml's list is left out of it, and every command fails to import."""
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("lenet_dist", "workers")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found <= listed, f"not installed: {sorted(found - listed)}"


def test_dockerfile_copies_what_exists():
    copies = [args.split() for op, args in dockerfile_instructions() if op == "COPY"]
    assert copies
    for args in copies:
        for src in [a for a in args[:-1] if not a.startswith("--")]:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"


def test_dockerfile_leaves_only_data_in_the_image_data_folder():
    """deploy/mnist's own files (README, .gitignore) are copied with the data and removed in the next step."""
    steps = dockerfile_instructions()
    (i, dest), = [(i, args.split()[-1]) for i, (op, args) in enumerate(steps)
                  if op == "COPY" and args.split()[0].rstrip("/") == "deploy/mnist"]
    op, removal = steps[i + 1]
    assert op == "RUN" and removal.startswith("rm -f "), steps[i + 1]
    removed = set(removal.split("&&")[0].split()[2:])
    ours = {p.name for p in (DEPLOY / "mnist").iterdir() if p.is_file() and "-ubyte" not in p.name}
    assert {".gitignore", "README.md"} <= ours
    assert {dest.rstrip("/") + "/" + name for name in ours} <= removed, (ours, removed)


# ---------------------------------------------------------------- the guide

def test_readme_covers_every_recipe():
    text = read("README.md")
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md" and not path.name.startswith("."):
            assert path.relative_to(DEPLOY).as_posix() in text, f"deploy/README.md never mentions {path.name}"
    for needle in ("mpirun", "srun", "MPIJob", "lenet-keys generate", "OMP_NUM_THREADS", "pip download",
                   "--threads", "--watch", str(PUBLISH_PORT), str(RESULTS_PORT),
                   "see README.md Performance section"):
        assert needle in text, f"deploy/README.md does not mention {needle}"
