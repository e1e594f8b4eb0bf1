"""The evaluator's live outputs: the web dashboard (a process of its own), TensorBoard event files, and the
trainer's step telemetry that feeds the dashboard. The evaluator's loop calls on_evaluation and close.

    live = start(LiveConfig(http_address=("127.0.0.1", 8080)), test_images, test_labels, stop)
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from lenet_dist.evaluation.history import MAX_ROWS, History, run_key
from lenet_dist.evaluation.metrics import run_figures
from lenet_dist.rowstore import RowStore

log = logging.getLogger("lenet.evaluator")

TELEMETRY_POLL_S = 0.5


@dataclass(frozen=True)
class LiveConfig:
    """What the live outputs need, from the evaluator's flags."""
    http_address: tuple | None = None       # (host, port) of the dashboard, or None
    http_token: str | None = None           # every HTTP request must carry it, when given
    tensorboard: Path | None = None         # event files under tensorboard/evaluator
    connect: tuple = ()                     # the trainers' endpoints: the shown run's step telemetry feeds the page
    curve_secret_key: Path | None = None
    curve_public_key: Path | None = None
    curve_server_key: Path | None = None


def start(cfg, images, labels, stop, history=None):
    """A Live for this configuration, or None when it asks for no live output. `history` (history.History):
    the runs the evaluator knows, already holding each result when on_evaluation is called."""
    if not (cfg.http_address or cfg.tensorboard):
        return None
    return Live(cfg, images, labels, stop, history or History())


class Live:
    """The dashboard knows every run (its evaluations, step rows, marks and models, kept apart by run) and
    shows one first: the run of the newest evaluation at start (from the history), then the newest run to
    start (its first evaluation); an older run evaluated while the shown one is still going (several trainers
    at once) is kept and listed (/api/runs), and the page may overlay or focus it, but it does not take the
    page over until the shown run ends. A trainer's rows are the run's its checkpoints name: each (endpoint,
    trainer process) is matched to a run by the first evaluation that names both."""

    def __init__(self, cfg, images, labels, stop, history):
        self.dashboard = self.tb = None
        self.followers = {}                         # endpoint -> TelemetryFollower
        self.sources = {}                           # (endpoint, trainer server id) -> run key
        self.pending = {}                           # (endpoint, trainer server id) -> rows before its run is named
        self._lock = threading.Lock()               # the followers' threads vs the loop's
        self.history, self.shown, self.shown_source = history, None, None
        try:
            if cfg.http_address:
                from lenet_dist.dashboard.process import DashboardProcess
                self.dashboard = DashboardProcess(images, labels, *cfg.http_address, token=cfg.http_token)
                log.info("dashboard on %s%s", self.dashboard.url, " (bearer token required)" if cfg.http_token else "")
                runs = sorted(history.runs(), key=lambda r: r.last["time"] or 0)
                for run in runs:                    # a restarted evaluator: every run's history, the newest shown
                    self._show(run, run.evaluations)
                    self._rows_to_page(run.key, [*run.steps, *run.marks, *([run.timeline] if run.timeline else [])])
                if runs:
                    self.dashboard.set_runs([dict(r.to_dict(), metrics=run_figures(r)) for r in history.runs()])
            if cfg.tensorboard:
                from lenet_dist.evaluation.tensorboard import EvaluatorBoard
                self.tb = EvaluatorBoard(cfg.tensorboard)
            if self.dashboard is not None:          # the trainer's own --tensorboard logs its steps
                for endpoint in cfg.connect:
                    self.followers[endpoint] = TelemetryFollower(
                        cfg, endpoint, lambda rows, server, e=endpoint: self._on_rows(e, server, rows), stop)
        except BaseException:
            self.close()
            raise

    def _on_rows(self, endpoint, server, rows):
        # rows of a trainer no evaluation has named yet wait here (and are asked for again) until one does;
        # meanwhile the only trainer's are shown as the page's first, unnamed run
        with self._lock:
            key = self.sources.get((endpoint, server))
            if key is None:
                self.pending.setdefault((endpoint, server), RowStore(MAX_ROWS)).extend(rows)
        if key is not None:
            self._rows_to_page(key, self.history.add_rows(key, rows))
        elif len(self.followers) == 1 and not self.sources:
            self.dashboard.add_steps(rows)

    def _rows_to_page(self, key, rows):
        if self.dashboard is not None and rows:
            self.dashboard.add_steps([dict(r, run=key) for r in rows])

    def _show(self, run, results):
        self.shown, self.shown_source = run, (run.last or {}).get("source")
        self.dashboard.start_run(run.to_dict(), results, keep_steps=True)

    def restore_best(self, keeper, model, judge):
        """A restarted evaluator: the shown run's best checkpoint from --best-dir (`keeper`, a BestKeeper)
        scored again and given to the dashboard, so drawing works before the run's next evaluation (there may
        be none: a finished run). Nothing when the best kept there is another run's."""
        from lenet_dist.checkpoints import format as checkpoint
        from lenet_dist.evaluation.scoring import DataRefused
        got = keeper.kept() if self.dashboard is not None and self.shown is not None else None
        if got is None or got[0].get("run_id") != self.shown.run_id or self.shown.run_id is None:
            return False
        result, config, data = got
        try:
            ckpt = checkpoint.from_bytes(data, name=str(keeper.dir / "best.npz"))
            model.load_named(ckpt.params)
            _, detail = judge.score(model, ckpt, f"the best checkpoint in {keeper.dir}")
        except (checkpoint.CheckpointError, DataRefused) as e:     # drawing waits for the next evaluation
            log.warning("could not restore the best model from %s: %s", keeper.dir, e)
            return False
        self.dashboard.add_evaluation(result, ckpt.params, detail, config, replayed=True)
        log.info("drawing with the best checkpoint of run %s (step %s) from %s", self.shown.name, result.get("step"),
                 keeper.dir)
        return True

    def on_evaluation(self, result, params, detail, config):
        if self.dashboard is not None:
            key = run_key(result)
            run = self.history.run(key)
            if run is not self.shown and (self.shown is None or self.shown.finished or run.count == 1):
                self._show(run, run.evaluations[:-1])     # a new run, or the shown one has ended
            source = (result.get("source"), result.get("server"))
            if source not in self.sources:          # this trainer's rows are this run's: asked for from the start
                with self._lock:
                    self.sources[source], waiting = key, list(self.pending.pop(source, ()))
                self._rows_to_page(key, self.history.add_rows(key, waiting))
                if source[0] in self.followers:
                    self.followers[source[0]].rewind()
            if run.config is None and isinstance(config, dict):      # --watch: no step row names it
                self._rows_to_page(key, self.history.add_rows(key, [{"event": "config", "step": result["step"],
                                                                     "config": config}]))
            self.dashboard.add_evaluation(result, params, detail, config)
            self.dashboard.set_runs([dict(r.to_dict(), metrics=run_figures(r)) for r in self.history.runs()])
        if self.tb is not None:
            self.tb.add_evaluation(result, detail)

    def close(self):
        for part in (*self.followers.values(), self.dashboard, self.tb):
            if part is not None:
                part.close()


class TelemetryFollower:
    """A thread with a connection of its own to the trainer, asking for its step rows twice a second,
    so that the curves move while the evaluator's loop is busy evaluating; on_rows(rows, the trainer
    process's server id)."""

    def __init__(self, cfg, endpoint, on_rows, stop):
        from lenet_dist.transport import CheckpointClient
        self.client = CheckpointClient(endpoint, secret_key=cfg.curve_secret_key,
                                       public_key=cfg.curve_public_key, server_key=cfg.curve_server_key,
                                       interrupted=stop.__bool__)
        self.on_rows, self.stop = on_rows, stop
        self._done = threading.Event()
        self._rewind = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="lenet-telemetry")
        self._thread.start()

    def _run(self):
        from lenet_dist.transport.wire import MAX_TELEMETRY_ROWS, BadMessage
        since, server = -1, None
        while not self._done.is_set() and not self.stop:
            if self._rewind:
                self._rewind, since = False, -1
            try:
                got = self.client.fetch_telemetry(since)
            except BadMessage as e:
                log.warning("rejected telemetry from %s: %s", self.client.endpoint, e)
                got = None
            if got is not None:
                rows, seq = got
                restarted = server is not None and self.client.server != server
                server = self.client.server
                if restarted or seq < since:            # a new trainer numbers its rows afresh
                    since = -1
                    continue
                since = seq
                if rows:
                    self.on_rows(rows, server)
                if len(rows) == MAX_TELEMETRY_ROWS:     # more waiting: ask again at once
                    continue
            self._done.wait(TELEMETRY_POLL_S)

    def rewind(self):
        """Ask for the trainer's rows again from the oldest it keeps (an evaluation has named their run)."""
        self._rewind = True

    def close(self):
        self._done.set()
        self._thread.join(5)
        self.client.close()
