"""The evaluator's two /metrics (--health, and the dashboard's on --http) never disagree: every family the
dashboard serves under a conventional name is the evaluator's, with the same type, labels and values, for
two runs on one evaluator; the dashboard's older unlabelled names are exactly the deprecated aliases
docs/dashboard.md lists. Real evaluator process, real TrainerLinks, prometheus_client's parser."""
import re
import signal
import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from lenet_dist.dashboard.metrics import DEPRECATED
from lenet_dist.transport import TrainerLink

from tests.mpiutil import env, REPO
from tests.test_e2e import free_port
from tests.test_evaluator_daemon import run_ckpt
from tests.test_evaluator_metrics import until


def scrape(url):
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def samples(family):
    return sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in family.samples)


def test_the_evaluator_and_the_dashboard_serve_one_set_of_figures(tmp_path):
    report, health, http = tmp_path / "eval.jsonl", free_port(), free_port()
    with TrainerLink("tcp://127.0.0.1:*") as one, TrainerLink("tcp://127.0.0.1:*") as two:
        err = open(tmp_path / "err.txt", "w")
        ev = subprocess.Popen([sys.executable, "-m", "workers.evaluator", "--subset", "--poll-ms", "100", "--report",
                               str(report), "--health", f"127.0.0.1:{health}", "--http", f"127.0.0.1:{http}",
                               "--connect", one.endpoint, "--connect", two.endpoint], cwd=REPO, env=env(),
                              stdout=subprocess.DEVNULL, stderr=err)
        try:
            one.publish(20, 0, run_ckpt(20, "aaaaaaaa-one", final=True), final=True)
            two.publish(10, 0, run_ckpt(10, "bbbbbbbb-two", seed=1))
            until("both runs' evaluations", lambda: report.exists() and len(report.read_text().splitlines()) == 2)
            two.publish(30, 0, run_ckpt(30, "bbbbbbbb-two", seed=2))
            until("the third evaluation", lambda: len(report.read_text().splitlines()) == 3)

            def both():
                ev_fams, page_fams = scrape(f"http://127.0.0.1:{health}"), scrape(f"http://127.0.0.1:{http}")
                steps = {s.labels["run"]: s.value for s in page_fams["lenet_evaluator_step"].samples}
                return (ev_fams, page_fams) if steps == {"aaaaaaaa": 20, "bbbbbbbb": 30} else None
            evaluator, dashboard = until("the dashboard's figures of both runs", both)
        finally:
            ev.send_signal(signal.SIGTERM)
            assert ev.wait(30) == 0, (tmp_path / "err.txt").read_text()
    conventional = {n for n in dashboard if n.startswith("lenet_evaluator_")}
    assert conventional >= {"lenet_evaluator_evaluations", "lenet_evaluator_step", "lenet_evaluator_val_accuracy_ratio",
                            "lenet_evaluator_test_accuracy_ratio", "lenet_evaluator_runs"}
    for name in conventional:
        assert dashboard[name].type == evaluator[name].type, name
        assert samples(dashboard[name]) == samples(evaluator[name]), name
    assert {s.labels["run"] for s in dashboard["lenet_evaluator_evaluations"].samples} == {"aaaaaaaa", "bbbbbbbb"}
    old = set(dashboard) - conventional
    assert old == {name for name, _, _ in DEPRECATED}
    docs = (REPO / "docs" / "dashboard.md").read_text()
    section = docs[docs.index("Deprecated names on the dashboard's /metrics"):]
    listed = set(re.findall(r"`(lenet_(?:eval|evaluations|train)\w*)`", section.split("\n\n")[0]))
    assert listed == old
