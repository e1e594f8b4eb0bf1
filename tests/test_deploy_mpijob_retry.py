"""deploy/k8s/mpijob.yaml's retries continue the run: the MPI Operator reruns a failed launcher (runPolicy's
backoffLimit) with the same command on workers that keep their volume. Emulated here with real processes:
the launcher's command line read from the manifest runs under this machine's mpirun twice on one folder
standing for the workers' volume; the first attempt loses a rank mid-run (rank 1 exits), the second, the
same command, must continue from the newest checkpoint and end bit-identical to an attempt never
interrupted (run on an empty volume with the same command, which --resume auto starts).

What differs from the cluster, and only that: `-n` (2 ranks: this machine's cores), the shipped subset for
/opt/mnist, short epochs and checkpoints for the subset's 8 steps an epoch, loopback ports for the pods'
addresses, a temporary folder for the volume, generated keys for the Secret.
"""
import shutil
import subprocess

import numpy as np
import pytest

from lenet_dist.transport import generate_keys

from tests.mpiutil import env, final_params, launch, mpirun_cmd, python
from tests.test_e2e import free_port

yaml = pytest.importorskip("yaml")

from tests.test_deploy_recipes import flag, one, yaml_docs  # noqa: E402

RANKS, EPOCHS, EVERY, FAULT_STEP = 2, 3, 5, 12
STEPS = EPOCHS * 8                      # 1,834 subset images (166 held out) in global batches of 256


def launcher_line():
    job = one(yaml_docs("k8s/mpijob.yaml"), "MPIJob")
    c = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    return c["command"] + c["args"]


def replace(argv, name, value):
    out = list(argv)
    out[out.index(name) + 1] = value
    return out


def local_argv(volume, keys):
    """The manifest's lenet-train arguments with this machine's stand-ins for the cluster's paths and names."""
    line = launcher_line()
    assert line[0] == "mpirun" and "lenet-train" in line, line
    argv = line[line.index("lenet-train") + 1:]
    mount = str(flag(argv, "--checkpoint-dir")).rsplit("/", 1)[0]         # the workers' volume
    secret = flag(argv, "--curve-authorized").rsplit("/", 1)[0]             # the Secret's mount
    argv = [a.replace(mount, str(volume)).replace(secret, str(keys)) for a in argv]
    data = argv.index("--data-dir")
    argv[data:data + 2] = ["--subset"]
    argv = replace(argv, "--epochs", str(EPOCHS))
    argv = replace(argv, "--checkpoint-every", str(EVERY))
    argv = replace(argv, "--publish", f"tcp://127.0.0.1:{free_port()}")
    argv = replace(argv, "--results", f"tcp://127.0.0.1:{free_port()}")
    return argv + ["--no-progress"]


def keys_as_the_secret(d):
    """The trainer's key files in the layout the manifest's Secret volume gives them."""
    generate_keys(d, "trainer")
    evaluator_public, _ = generate_keys(d / "other", "evaluator")
    (d / "authorized").mkdir()
    shutil.copy(evaluator_public, d / "authorized" / "evaluator.key")
    return d


def test_a_retried_launcher_continues_the_run(tmp_path):
    keys = keys_as_the_secret(tmp_path / "keys")
    volume, reference = tmp_path / "volume", tmp_path / "reference"
    argv = local_argv(volume, keys)
    assert "--resume" in argv, "the launcher's retries need --resume auto"

    # The first attempt loses rank 1 before step FAULT_STEP (it exits at once): mpirun fails, the pod too.
    first = subprocess.run([*mpirun_cmd(RANKS), python(), "-m", "workers.trainer", *argv], capture_output=True,
                           text=True, timeout=180, env=dict(env(), LENET_FAULT=f"1:{FAULT_STEP}:exit"))
    assert first.returncode != 0, first.stdout + first.stderr
    before, meta_before = final_params(volume / "checkpoints")
    assert 0 < meta_before["step"] < FAULT_STEP, meta_before["step"]

    retry = launch(RANKS, argv, timeout=180, check=False)          # the operator's next launcher pod
    out = retry.stdout + retry.stderr
    assert retry.returncode == 0, out
    assert "resumed from" in out and f"at step {meta_before['step']}/" in out, out
    healed, meta = final_params(volume / "checkpoints")
    assert meta["step"] == STEPS and meta["run_id"] == meta_before["run_id"], (meta, meta_before)

    launch(RANKS, local_argv(reference, keys), timeout=180)        # never interrupted, on an empty volume
    expected, ref_meta = final_params(reference / "checkpoints")
    assert ref_meta["step"] == STEPS
    assert np.array_equal(healed, expected), "the retried run's parameters differ from the uninterrupted run's"
