"""docs/architecture.md is the map of the code (STYLE point 21): it names every module of lenet_dist/ and
workers/ by its path, and names no module that does not exist. Adding, moving or removing a module without
the map fails here."""
import re
from pathlib import Path

from tests.mpiutil import REPO

MAP = REPO / "docs" / "architecture.md"
PATH = re.compile(r"\b((?:lenet_dist|workers)/[A-Za-z0-9_/]+\.py)\b")


def modules():
    """Every module by its path; an __init__.py counts only when it holds code beyond a docstring."""
    out = set()
    for d in ("lenet_dist", "workers"):
        for p in (REPO / d).rglob("*.py"):
            if p.name == "__init__.py" and not _has_code(p):
                continue
            out.add(str(p.relative_to(REPO)))
    return out


def _has_code(p: Path):
    lines = [l for l in p.read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")]
    text = "\n".join(lines)
    text = re.sub(r'^(?:"""|\'\'\').*?(?:"""|\'\'\')', "", text, count=1, flags=re.S).strip()
    return bool(text)


def named():
    return set(PATH.findall(MAP.read_text()))


def test_every_module_is_on_the_map():
    missing = sorted(modules() - named())
    assert missing == [], f"docs/architecture.md does not name: {missing}"


def test_the_map_names_no_missing_module():
    ghosts = sorted(p for p in named() if not (REPO / p).is_file())
    assert ghosts == [], f"docs/architecture.md names modules that do not exist: {ghosts}"


def test_the_checker_sees_paths(tmp_path):
    """Not blind: a path in prose or code spans is found, a bare name is not."""
    text = "see `lenet_dist/parallel/step.py`: the step; workers/trainer.py runs it; data.py alone is no path"
    assert set(PATH.findall(text)) == {"lenet_dist/parallel/step.py", "workers/trainer.py"}
    assert modules(), "no modules found: the checker looks in the wrong place"
