"""A bare lenet-train keeps its model: without --checkpoint-dir a run writes into a new run folder
runs/<time>-<id>/ under the current directory (checkpoints, last.npz, best.npz, metrics.jsonl) and says
where; --no-save (or --checkpoint-dir none) writes nothing; under mpirun the ranks share one folder."""
import json
import re
import shlex

from lenet_dist.checkpoints import format as checkpoint
from lenet_dist.run import exitcodes
from lenet_dist.run.setup import run_folder_name

from tests.mpiutil import launch

RUN = ["--subset", "--epochs", "1", "--no-progress"]
NAME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d-[0-9a-f]{4}$")


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_bare_run_keeps_its_model_in_one_run_folder_and_says_where(tmp_path):
    p = launch(0, RUN, cwd=tmp_path)
    [folder] = list((tmp_path / "runs").iterdir())
    assert NAME.match(folder.name), folder.name
    names = {f.name for f in folder.iterdir()}
    assert {"last.npz", "best.npz", "metrics.jsonl"} <= names, names
    assert checkpoint.list_checkpoints(folder), names
    assert [x for x in files(tmp_path) if not x.startswith("runs")] == []       # nothing beside it
    rel = f"runs/{folder.name}"
    assert f"model: {rel}/best.npz" in p.stdout and f"metrics: {rel}/metrics.jsonl" in p.stdout, p.stdout
    [start] = [x for x in p.stderr.splitlines() if "run folder" in x]
    assert f"run folder {rel}/" in start and f"--checkpoint-dir {rel} --resume" in start, start
    # the command it gives goes on with this run: a finished one says so, and nothing changes
    before = contents(folder)
    command = shlex.split(start.split("continue: ", 1)[1].split(";")[0])
    assert command[0] == "lenet-train"
    q = launch(0, command[1:], cwd=tmp_path)
    assert "has already finished" in q.stdout, q.stdout + q.stderr
    assert contents(folder) == before and len(list((tmp_path / "runs").iterdir())) == 1


def test_no_save_writes_nothing(tmp_path):
    for flags in (["--no-save"], ["--checkpoint-dir", "none"]):
        p = launch(0, [*RUN, *flags, "--checkpoint-every", "5"], cwd=tmp_path)
        assert "finished 1 epochs" in p.stdout and "model:" not in p.stdout, p.stdout
        assert files(tmp_path) == [], files(tmp_path)


def test_two_ranks_share_one_run_folder(tmp_path):
    launch(2, RUN, cwd=tmp_path)
    [folder] = list((tmp_path / "runs").iterdir())
    assert (folder / "best.npz").exists() and checkpoint.list_checkpoints(folder)
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["ranks"] for r in rows if r["event"] == "epoch"] == [2]


def test_a_named_run_folder_is_refused_when_it_holds_another_run(tmp_path):
    launch(0, [*RUN, "--run-name", "first"], cwd=tmp_path)
    folder = tmp_path / "runs" / "first"
    before = contents(folder)
    assert {"best.npz", "metrics.jsonl"} <= set(before)
    p = launch(0, [*RUN, "--run-name", "first"], cwd=tmp_path, check=False)
    assert p.returncode == exitcodes.RESUME_REFUSED and "holds 1 checkpoint(s) of another run" in p.stderr, \
        p.stderr
    assert contents(folder) == before and [f.name for f in (tmp_path / "runs").iterdir()] == ["first"]
    q = launch(0, ["--subset", "--epochs", "2", "--no-progress", "--run-name", "first", "--resume", "--override",
                   "epochs"], cwd=tmp_path)
    assert "resumed from runs/first/" in q.stderr and "finished 2 epochs" in q.stdout, q.stderr


def test_flags_that_contradict_each_other_are_one_line(tmp_path):
    for flags, says in ((["--no-save", "--checkpoint-dir", "x"], "--no-save keeps nothing"),
                        (["--no-save", "--resume"], "--no-save keeps nothing"),
                        (["--run-name", "a", "--checkpoint-dir", "x"], "give one of them"),
                        (["--run-name", "../a"], "a plain folder name"),
                        (["--resume"], "--resume needs --checkpoint-dir (or --run-name)")):
        p = launch(0, [*RUN, *flags], cwd=tmp_path, check=False)
        assert p.returncode == 2 and says in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert files(tmp_path) == []


def test_run_folder_names_sort_by_their_start():
    a, b = run_folder_name(1_000_000_000), run_folder_name(1_000_000_061)
    assert NAME.match(a) and a.startswith("2001-09-09T01-46-40-") and sorted([b, a]) == [a, b]


def test_a_stopped_bare_run_prints_a_resume_command_that_continues_it(tmp_path):
    p = launch(0, ["--subset", "--epochs", "2", "--no-progress", "--fault", "0:3:term"], cwd=tmp_path, check=False)
    assert p.returncode == 143, p.stderr
    [folder] = list((tmp_path / "runs").iterdir())
    resume = next(x for x in p.stdout.splitlines() if x.strip().startswith("resume: ")).split("resume: ", 1)[1]
    argv = [a for a in shlex.split(resume)[1:] if a not in ("--fault", "0:3:term")]
    assert argv[-3:] == ["--checkpoint-dir", f"runs/{folder.name}", "--resume"], argv
    q = launch(0, argv, cwd=tmp_path)
    assert "resumed from" in q.stderr and "finished 2 epochs" in q.stdout, q.stderr
    assert [f.name for f in (tmp_path / "runs").iterdir()] == [folder.name]
