"""The evaluator's library: what lenet-evaluator does between parsing its flags and exiting.

    scoring.py      Judge: one checkpoint's test and validation figures, only on the data it was trained for
    loop.py         run_loop: fetch the newest checkpoint from each source, check, score, report, run after run
    history.py      History: every evaluation by run, read back from --report at start
    best.py         BestKeeper: --best-dir's best.npz and best.json, chosen by lenet_dist.selection
    live.py         Live: the dashboard process, TensorBoard and the trainer's step telemetry feeding them
    health.py       /healthz, /readyz (and /metrics) for an orchestrator (--health), standard library only
    metrics.py      metrics_text: Prometheus' text format of the history by run, standard library only
    tensorboard.py  TensorBoard event files of both sides (EvaluatorBoard here, TrainerBoard for rank 0)
"""
