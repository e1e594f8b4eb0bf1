"""How launcher_env.py reads the launcher's environment: ranks and cores on the node, Slurm, a foreign mpirun. No MPI."""
import pytest

from lenet_dist.launcher_env import (LauncherMismatch, check_launcher, launcher_rank, launcher_size, node_layout,
                                     oversubscribed)

OMPI = "Open MPI v5.0.11"
MPICH = "MPICH Version: 5.0.2"


@pytest.mark.parametrize("env, local", [
    ({"MPI_LOCALNRANKS": "2"}, 2),                                    # MPICH's Hydra
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_LOCAL_SIZE": "2"}, 2),  # Open MPI's mpirun
    ({"PMIX_LOCAL_SIZE": "3"}, 3),                                    # srun --mpi=pmix
])
def test_launchers_own_local_count(env, local):
    assert node_layout(env, cpu_count=2)[0] == local


def test_cores_are_the_nodes_not_the_affinity_mask(monkeypatch):
    # Open MPI binds each rank to one core: the mask says 1, the node has 2 for 2 ranks
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert not oversubscribed({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert oversubscribed({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"})


# srun --mpi=pmi2 sets no local-rank count, only PMI_* and SLURM_*
SRUN = {"PMI_RANK": "0", "PMI_SIZE": "4", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4"}


@pytest.mark.parametrize("extra, cores, over", [
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "1"}, 2, False),   # 2 ranks on 2 cores
    ({"SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_NODEID": "0"}, 2, True),      # 3 on 2
    ({"SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_NODEID": "1"}, 2, False),     # the second node: 1 on 2
    ({"SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "0"}, 2, False),        # the job's count
    ({"SLURM_NTASKS_PER_NODE": "2"}, 2, False),
    ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "1"}, 8, True),      # the job holds 1 of 8 cores
    ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "2"}, 4, False),    # 2 ranks x 2 cores on 4
    ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "2"}, 3, True),
    ({}, 2, True),                                                             # nobody says: the safe side
])
def test_slurm_tasks_per_node(extra, cores, over):
    assert oversubscribed({**SRUN, **extra}, cpu_count=cores) is over


def test_slurm_layout_names_its_source():
    env = {**SRUN, "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3", "SLURM_CPUS_ON_NODE": "4"}
    assert node_layout(env, cpu_count=8) == (1, 4, "Slurm tasks per node")


def test_launcher_size():
    assert launcher_size({"OMPI_COMM_WORLD_SIZE": "4"}) == (4, "OMPI_COMM_WORLD_SIZE")
    assert launcher_size({"SLURM_NTASKS": "4"}) == (None, None)     # a batch script is not a step of 4


def test_launcher_rank_from_any_launcher_srun_included():
    assert launcher_rank({"PMI_RANK": "3"}) == 3
    assert launcher_rank({"OMPI_COMM_WORLD_RANK": "1"}) == 1
    assert launcher_rank({"PMIX_RANK": "2"}) == 2
    assert launcher_rank({"SLURM_PROCID": "5"}) == 5               # srun without PMI
    assert launcher_rank({"PMI_RANK": "x"}) is None and launcher_rank({}) is None


@pytest.mark.parametrize("library, env", [
    (OMPI, {"PMI_SIZE": "2", "PMI_RANK": "0", "MPI_LOCALNRANKS": "2"}),   # MPICH's mpirun, Open MPI's mpi4py
    (MPICH, {"OMPI_COMM_WORLD_SIZE": "2", "PMIX_RANK": "0"}),             # the other way round
])
def test_a_foreign_launcher_is_refused_before_init(library, env):
    with pytest.raises(LauncherMismatch, match=r"the launcher started 2 ranks .* MPI library \(" + library):
        check_launcher(library, env=env)


def test_n_ranks_that_each_see_one_are_refused_after_init():
    env = {"PMIX_SIZE": "3", "PMIX_RANK": "0"}
    check_launcher(OMPI, env=env)                                         # nothing to judge before Init
    with pytest.raises(LauncherMismatch, match=r"started 3 ranks \(PMIX_SIZE=3\) .* sees 1"):
        check_launcher(OMPI, size=1, env=env)
    check_launcher(OMPI, size=3, env=env)


def test_matching_launchers_pass():
    check_launcher(MPICH, env={"PMI_SIZE": "2", "PMI_RANK": "0"}, size=2)
    check_launcher(OMPI, env={"OMPI_COMM_WORLD_SIZE": "2", "PMIX_RANK": "0"}, size=2)
    check_launcher(OMPI, env={"PMI_SIZE": "2", "PMIX_RANK": "0"}, size=2)   # srun --mpi=pmix sets both
    check_launcher(MPICH, env={}, size=1)


def cgroup_tree(tmp_path, membership, files):
    for rel, text in files.items():
        (tmp_path / "fs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / rel).write_text(text)
    (tmp_path / "cgroup").write_text(membership)
    return str(tmp_path / "fs"), str(tmp_path / "cgroup")


@pytest.mark.parametrize("membership, files, cores", [
    ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1/cpu.max": "150000 100000\n"}, 2),     # 1.5 CPUs: 2 cores
    ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1/cpu.max": "max 100000\n"}, None),
    ("0::/\n", {"cpu.max": "100000 100000\n"}, 1),
    ("4:cpu,cpuacct:/docker/abc\n1:memory:/x\n", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
                                                   "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 3),
    ("4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ("0::/gone\n", {}, None),                                                            # no file: no quota
    ("0::/x\n", {"x/cpu.max": "garbage\n"}, None),
])
def test_cgroup_cpu_quota(tmp_path, membership, files, cores):
    from lenet_dist.launcher_env import cgroup_cores
    root, member = cgroup_tree(tmp_path, membership, files)
    assert cgroup_cores(root, member) == cores


def test_a_quota_or_a_stated_core_count_caps_the_nodes_cores():
    """A pod limited to 2 CPUs on a 64-core host runs 4 ranks oversubscribed; LENET_NODE_CORES says so by hand."""
    env = {"MPI_LOCALNRANKS": "4"}
    assert node_layout(env, cpu_count=64, cgroup=2)[1] == 2 and oversubscribed(env, cpu_count=64, cgroup=2)
    assert not oversubscribed(env, cpu_count=64, cgroup=0)                               # 0: no quota
    assert oversubscribed({**env, "LENET_NODE_CORES": "2"}, cpu_count=64, cgroup=0)
    assert not oversubscribed({**env, "LENET_NODE_CORES": "0"}, cpu_count=64, cgroup=0)      # 0: not a count
    assert node_layout({**env, "LENET_NODE_CORES": "8", "SLURM_CPUS_ON_NODE": "6"}, cpu_count=64, cgroup=0)[1] == 6
