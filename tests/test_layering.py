"""The architecture's import rules, read from the source (docs/architecture.md): only the communicator knows
MPI, only the transport knows ZeroMQ, only the dashboard knows the web framework, and the library never
reaches into the processes."""
import ast
from pathlib import Path

import pytest

from tests.mpiutil import REPO

RULES = [                 # (imported top-level module, the only place allowed to import it)
    ("mpi4py", "lenet_dist/comm.py"),
    ("zmq", "lenet_dist/transport/"),
    ("starlette", "lenet_dist/dashboard/"),
    ("uvicorn", "lenet_dist/dashboard/"),
    ("workers", "workers/"),
    ("torch", None),
    ("tensorflow", None),
]


def imports(path):
    """Top-level names of every module `path` imports (absolute imports; relative ones stay in the package)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def sources():
    return sorted(p for d in ("lenet_dist", "workers") for p in (REPO / d).rglob("*.py"))


@pytest.mark.parametrize("module, home", RULES)
def test_only_its_home_imports(module, home):
    offenders = [str(p.relative_to(REPO)) for p in sources() if module in set(imports(p))
                 and not (home and str(p.relative_to(REPO)).startswith(home))]
    assert offenders == [], f"{module} imported outside {home or 'the package'}: {offenders}"


def test_the_rules_see_real_imports(tmp_path):
    """The checker is not blind: it finds each kind of import it is meant to find."""
    f = tmp_path / "m.py"
    f.write_text("import zmq.auth\nfrom mpi4py import MPI\nfrom .x import y\n\ndef f():\n    import uvicorn\n")
    assert set(imports(f)) == {"zmq", "mpi4py", "uvicorn"}
    assert any("zmq" in set(imports(p)) for p in sources())
