"""The README's promises that can be checked without running them: CI runs exactly its test command, its
links lead to files that exist, and the text speaks of the project, not of how its work was organised."""
import re

from tests.mpiutil import REPO

README = (REPO / "README.md").read_text()
TEST_COMMAND = "bash scripts/setup-tests.sh && python -m pytest -q"
MAIN_COMMAND = ('pip install ".[mpich]" && mpirun -n 2 lenet-train --checkpoint-dir runs/ckpt '
                '--metrics runs/metrics.jsonl')


def test_ci_runs_the_readme_test_command():
    assert f"\n    {TEST_COMMAND}\n" in README and f"\n    {MAIN_COMMAND}\n" in README
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == TEST_COMMAND


def test_readme_and_docs_links_exist():
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_readme_is_short_and_speaks_of_the_project():
    assert len(README.splitlines()) < 260
    for doc in [REPO / "README.md", REPO / "docs" / "performance.md"]:
        assert not re.search(r"\bsessions?\b", doc.read_text(), re.I), doc.name
