"""Flags that used to pass the parser and fail later (or silently do something else) are usage errors."""
import re

import pytest

from lenet_dist.transport import wire

from tests.mpiutil import launch


@pytest.mark.parametrize("flags, says", [
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--warmup-epochs", "inf"], "warmup_epochs must be a finite number"),
    (["--momentum", "0"], "momentum must be > 0 with Nesterov"),
    (["--publish", "tcp://127.0.0.1:99999"], "port '99999' is not in 1-65535"),
    (["--publish", "tcp://127.0.0.1:-5"], "is not in 1-65535"),
    (["--publish", "127.0.0.1:5555"], "expected TRANSPORT://ADDRESS"),
])
def test_bad_values_are_usage_errors(flags, says):
    p = launch(0, ["--subset", "--epochs", "1", *flags], check=False, timeout=60)
    assert p.returncode == 2, p.stderr
    assert says in p.stderr and "Traceback" not in p.stderr
    assert "training examples" not in p.stderr                     # refused before any data was loaded


def test_bad_value_under_mpirun_is_a_usage_error_on_every_rank_said_once():
    p = launch(2, ["--subset", "--lr", "inf"], check=False, timeout=60)
    assert p.returncode == 2 and p.stderr.count("lr must be a finite number") == 1, p.stderr   # said once (issue 21)


def test_evaluator_endpoints():
    p = launch(0, ["--connect", "tcp://127.0.0.1:70000", "--subset"], module="workers.evaluator", check=False)
    assert p.returncode == 2 and "not in 1-65535" in p.stderr
    p = launch(0, ["--connect", "tcp://127.0.0.1:*", "--subset"], module="workers.evaluator", check=False)
    assert p.returncode == 2 and "not in 1-65535" in p.stderr


def test_momentum_zero_without_nesterov_is_fine_and_a_random_port_only_when_asked():
    p = launch(0, ["--subset", "--epochs", "1", "--train-subset", "200", "--batch-size", "100", "--momentum", "0",
                   "--no-nesterov", "--no-progress", "--publish", "tcp://127.0.0.1:0", "--linger", "0", "--no-save"],
               timeout=120)
    port = re.search(r"serving checkpoints on tcp://127\.0\.0\.1:(\d+)", p.stderr)
    assert port and 1 <= int(port.group(1)) <= 65535, p.stderr


def test_check_endpoint():
    assert wire.check_endpoint("tcp://127.0.0.1:0") == "tcp://127.0.0.1:*"
    assert wire.check_endpoint("tcp://[::1]:5555") == "tcp://[::1]:5555"
    assert wire.check_endpoint("ipc:///tmp/x") == "ipc:///tmp/x"
    for bad in ("tcp://127.0.0.1:65536", "tcp://127.0.0.1:", "tcp://:5", "tcp://h:5x", 5555):
        with pytest.raises(ValueError):
            wire.check_endpoint(bad)
    with pytest.raises(ValueError):
        wire.check_endpoint("tcp://127.0.0.1:0", bind=False)
