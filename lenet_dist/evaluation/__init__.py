"""The evaluator's library: what lenet-evaluator does between parsing its flags and exiting.

    scoring.py      Judge: one checkpoint's test and validation figures, only on the data it was trained for
    loop.py         run_loop: fetch the newest checkpoint, check, score, report, until the end or a signal
    best.py         BestKeeper: --best-dir's best.npz and best.json, chosen by lenet_dist.selection
    live.py         Live: the dashboard process, TensorBoard and the trainer's step telemetry feeding them
    health.py       /healthz and /readyz for an orchestrator's probes (--health), standard library only
    tensorboard.py  TensorBoard event files of both sides (EvaluatorBoard here, TrainerBoard for rank 0)
"""
