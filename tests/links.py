"""A TrainerLink on a free loopback port that records its log lines: the fixture of the transport tests."""
import pytest

from lenet_dist.transport import TrainerLink

ANY = "tcp://127.0.0.1:*"


@pytest.fixture
def link():
    lines = []
    with TrainerLink(ANY, log=lines.append) as ln:
        ln.lines = lines
        yield ln
