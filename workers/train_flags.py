"""lenet-train's flags: parsed, checked and turned into the run's TrainConfig (usage errors exit 2)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from lenet_dist import logformat
from lenet_dist.config import TrainConfig
from lenet_dist.files import check_writable_path
from lenet_dist.launcher_env import launcher_rank
from lenet_dist.parallel.timeline import DEFAULT_STEPS, parse_steps
from lenet_dist.transport import wire
from lenet_dist.transport.control import load_key as load_control_key

from lenet_dist.run.faults import FaultInjector
from lenet_dist.run.metrics import LAUNCH_RESTARTS_VAR
from lenet_dist.run.outcome import RunFacts
from lenet_dist.run.setup import FolderPlan
from lenet_dist.run.telemetry import DEFAULT_EVERY

from workers.common import add_data_flags, HelpFormatter, host_port

class Parser(argparse.ArgumentParser):
    """A usage error is one line and a pointer to --help (not the usage block), said once under mpirun: by
    the process the launcher made rank 0 (every rank exits 2)."""

    def error(self, message):
        if launcher_rank() in (None, 0):
            print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def cpus_available():
    """CPUs this process may run on (its affinity mask, a container's or Slurm's cpuset included)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Flags:
    """lenet-train's command line, parsed into what the library takes (no argparse object goes below workers/)."""
    args: argparse.Namespace    # the plain flags, for this process's own wiring
    config: TrainConfig         # the training configuration asked for
    plan: FolderPlan            # how the run uses its checkpoint folder
    facts: RunFacts             # what the end row says about its files and how to go on
    fault: FaultInjector        # --fault
    threads: int                # BLAS threads per rank (0: one)


def parse_args(argv=None):
    """lenet-train's flags, checked (a usage error exits 2 in one line) -> Flags."""
    d = TrainConfig()
    p = Parser(prog="lenet-train", description="lenet-train: one trainer rank. Flags, logging, signals and the epoch loop; the math is in lenet_dist.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("training (saved in every checkpoint)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="the GLOBAL batch, split across ranks")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (0: plain SGD)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=d.nesterov,
                   help="Nesterov momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 penalty on all parameters")
    g.add_argument("--schedule", choices=["constant", "step", "cosine", "plateau"], default=d.schedule,
                   help="learning-rate schedule after the warm-up (plateau: constant, times --plateau-factor "
                        "whenever validation has not improved for --plateau-patience epochs)")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help="linear warm-up of the learning rate over this many epochs")
    g.add_argument("--step-epochs", type=int, default=d.step_epochs, help="'step' schedule: decay period")
    g.add_argument("--gamma", type=float, default=d.gamma, help="'step' schedule: decay factor")
    g.add_argument("--augment-shift", type=int, default=d.augment_shift,
                   help="random shifts of up to this many pixels (0 = no augmentation)")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="train towards 1 - this on the label and this/10 on every class (0 = off); the "
                        "training loss shown is that smoothed loss, validation and test losses stay plain")
    g.add_argument("--seed", type=int, default=d.seed, help="initial weights, data order and augmentation")
    g.add_argument("--deterministic", action="store_true",
                   help="bit-identical parameters for any number of ranks (fixed-point gradient sums)")
    g.add_argument("--micro-batch", type=int, default=d.micro_batch, help="--deterministic chunk size")
    g.add_argument("--balance", action="store_true",
                   help="size each rank's shard by its measured speed, so that fast ranks do not wait for slow "
                        "ones (results then vary with the clock at float-rounding level; no change at all "
                        "with --deterministic)")
    g.add_argument("--train-subset", type=int, default=d.train_subset,
                   help="use only the first N training examples (0: all of them)")
    g.add_argument("--bucket-kb", type=int, default=d.bucket_kb,
                   help="reduce gradients in buckets of at least this many KiB, each started while backward "
                        "goes on (fully connected layers first); 0: one fused allreduce after backward; -1: 64, "
                        "or fused if the run's first 58 steps measure it faster (default: by placement: 64 when "
                        "the ranks span several nodes or --allreduce-dtype is half, else one non-blocking "
                        "allreduce after backward)")
    g.add_argument("--allreduce-dtype", choices=["float32", "float16", "bfloat16"], default=d.allreduce_dtype,
                   help="gradients travel in this precision (half: scaled, with error feedback; needs "
                        "--bucket-kb > 0, not --deterministic)")
    g.add_argument("--val-size", type=int, default=d.val_size,
                   help="examples held out of the training set for validation, drawn with --seed "
                        "(-1: 1/12 of them, 5,000 of MNIST's 60,000; 0: none)")
    g.add_argument("--lr-scaling", choices=["none", "linear"], default=d.lr_scaling,
                   help="linear: the learning rate is --lr * global batch / 64 (Goyal et al. 2017), after the "
                        "warm-up (docs/steering.md)")
    g = p.add_argument_group("steering from validation (saved in every checkpoint; docs/steering.md)")
    g.add_argument("--early-stop", type=int, default=d.early_stop, metavar="N",
                   help="stop when validation has not improved for N evaluations (each epoch's end, or each "
                        "verdict of the evaluator with --publish); 0: never")
    g.add_argument("--early-stop-metric", choices=["val_accuracy", "val_loss"], default=d.early_stop_metric,
                   help="what --early-stop and --schedule plateau watch")
    g.add_argument("--min-delta", type=float, default=d.min_delta,
                   help="an improvement must beat the best so far by more than this")
    g.add_argument("--plateau-factor", type=float, default=d.plateau_factor,
                   help="--schedule plateau: multiply the learning rate by this ...")
    g.add_argument("--plateau-patience", type=int, default=d.plateau_patience,
                   help="... after this many evaluations without improvement ...")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="... but never below this")
    g.add_argument("--learning-check", action=argparse.BooleanOptionalAction, default=d.learning_check,
                   help="stop, saying so, a run whose accuracy stays at chance level for 2 epochs or whose "
                        "training loss does not fall for 3 (exit status 72)")
    add_data_flags(p)
    g = p.add_argument_group("run")
    g.add_argument("--threads", type=int, default=0,
                   help="BLAS threads per rank (0: one; see docs/performance.md)")
    g.add_argument("--metrics", type=Path, help="append one JSON object per epoch to this file (rank 0)")
    g.add_argument("--checkpoint-dir", type=Path,
                   help="rank 0 writes checkpoints here (at epoch ends and every --checkpoint-every steps), "
                        "with last.npz and best.npz beside them (default: a new run folder runs/<time>-<id>/ "
                        "in the current directory, with metrics.jsonl too; 'none': as --no-save)")
    g.add_argument("--run-name", metavar="NAME",
                   help="the run folder is runs/NAME/ (refused if it holds another run; with --resume: "
                        "continue that run)")
    g.add_argument("--no-save", action="store_true",
                   help="write no checkpoint and no run folder (scripts, benchmarks)")
    g.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints "
                   "(0: only at epoch ends)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints kept in --checkpoint-dir")
    g.add_argument("--resume", nargs="?", const="on", default=None, metavar="auto",
                   help="continue the run in --checkpoint-dir from its newest usable checkpoint, with the "
                        "configuration saved there, or stop saying why (never a new run); --resume auto: the "
                        "same, but start a run when the folder is empty or absent (retries, requeues, restarts)")
    g.add_argument("--override", default="", metavar="NAMES",
                   help="with --resume: training flags (comma separated, e.g. epochs,lr) whose new values are "
                        "meant to replace the saved ones; the change is recorded in the checkpoints")
    g.add_argument("--start-over", action="store_true",
                   help="begin a new run in a --checkpoint-dir that holds another run's checkpoints (they are "
                        "moved into a superseded-* subfolder, not deleted); ignored with --resume")
    g.add_argument("--sync-every", type=int, default=100, help="steps between replica checksum checks")
    g.add_argument("--stall-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="under MPI, a rank that finishes no step for this long (a peer died or hangs) exits "
                        "with a one-line error so that the launcher ends the job; 0: wait forever")
    g.add_argument("--fault", default=os.environ.get("LENET_FAULT", ""),
                   help="inject a failure: RANK:STEP:KIND, KIND one of raise, exit, perturb, nan, slow, hang, term "
                        "(also $LENET_FAULT)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="rank 0 shows progress: a bar when stderr is a terminal, else a plain line every "
                        "--progress-every seconds (under mpirun stderr is a pipe)")
    g.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                   help="seconds between plain progress lines")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="WARNING: only problems and the epoch lines")
    g.add_argument("--log-format", default="text", choices=logformat.FORMATS,
                   help="json: one JSON object per line on stderr, with an ISO 8601 time and zone (for a log "
                        "collector)")
    g = p.add_argument_group("evaluator link (rank 0)")
    g.add_argument("--publish", metavar="ENDPOINT", help="serve checkpoints over ZeroMQ, e.g. tcp://127.0.0.1:5555")
    g.add_argument("--results", metavar="ENDPOINT",
                   help="also subscribe to an evaluator's --results-bind here (evaluators send their results "
                        "over the checkpoint connection anyway)")
    g.add_argument("--linger", type=float, default=30.0,
                   help="seconds to keep serving the final checkpoint after training until an evaluator "
                        "reports on it (5 s at most when no evaluator has been in touch)")
    g.add_argument("--curve-secret-key", type=Path, help="CurveZMQ: this server's secret key file")
    g.add_argument("--curve-public-key", type=Path,
                   help="CurveZMQ: this server's public key file, checked against the secret key")
    g.add_argument("--curve-authorized", type=Path, help="CurveZMQ: folder of clients' public keys")
    g.add_argument("--allow-control", action="store_true",
                   help="take live control actions (stop, pause, continue, checkpoint, scale the learning rate) "
                        "from an evaluator that signs them with --control-key-file (docs/steering.md); off: "
                        "every control message is refused and logged")
    g.add_argument("--control-key-file", type=Path, metavar="FILE",
                   help="the control secret shared with the evaluator (16 bytes or more)")
    g = p.add_argument_group("modes")
    g.add_argument("--test-mode", action="store_true",
                   help="a rehearsal of the whole system (under half a minute): train 3 epochs on the shipped "
                        "subset in this process while a real lenet-evaluator process evaluates the published "
                        "checkpoints; pass if both report the same final accuracy; temporary files removed")
    g.add_argument("--check", action="store_true", help="pre-flight checks only, then exit")
    g = p.add_argument_group("telemetry (rank 0)")
    g.add_argument("--log-every", type=int, default=DEFAULT_EVERY, metavar="K",
                   help="every K steps, a row of step figures for --metrics, --publish and --tensorboard (0: none)")
    g.add_argument("--tensorboard", type=Path, metavar="DIR",
                   help="write TensorBoard event files under DIR/trainer (needs the tensorboard extra)")
    g.add_argument("--metrics-port", metavar="[HOST:]PORT",
                   help="rank 0 serves Prometheus /metrics (steps, loss, images/s, per-rank compute and wait "
                        "seconds, the evaluator's lag) and /healthz, /readyz here (host 127.0.0.1 unless given; "
                        "0 picks a free port, logged)")
    g.add_argument("--metrics-public", action="store_true",
                   help="allow --metrics-port on a non-loopback address (anyone who can reach it reads the "
                        "run's figures)")
    g.add_argument("--timeline", type=Path, metavar="FILE",
                   help="write every rank's phases over a window of steps to FILE as a Chrome trace (open it in "
                        "https://ui.perfetto.dev or chrome://tracing; docs/performance.md)")
    g.add_argument("--timeline-steps", default="%d:%d" % DEFAULT_STEPS, metavar="A:B",
                   help="--timeline's window: steps A to B-1 of this start (a shorter run: its last B-A steps; "
                        "a run stopped by a signal: up to its last step)")
    args = p.parse_args(argv)
    try:
        args.timeline_steps = parse_steps(args.timeline_steps)
        if args.timeline:
            check_writable_path(args.timeline)
            if not args.timeline.parent.is_dir():
                raise ValueError(f"--timeline {args.timeline}: no folder {args.timeline.parent}")
    except ValueError as e:
        p.error(str(e))
    if args.log_every < 0:
        p.error(f"--log-every must be >= 0, got {args.log_every}")
    args.metrics_address = _metrics_address(p, args)
    if args.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        p.error("--tensorboard needs the tensorboard extra: pip install 'lenet-dist[tensorboard]'")
    try:
        config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    except ValueError as e:
        p.error(str(e))
    if args.checkpoint_every < 0 or args.sync_every < 0 or args.keep < 1 or args.threads < 0 \
            or not args.stall_timeout >= 0 or not args.progress_every >= 0:
        p.error("--checkpoint-every, --sync-every, --stall-timeout and --progress-every must be >= 0, --keep >= 1, "
                "--threads >= 0")
    if args.threads > cpus_available():
        p.error(f"--threads {args.threads}: more than the {cpus_available()} CPU(s) this process may use")
    if args.deterministic and args.threads > 1:
        p.error("--deterministic needs one BLAS thread per rank (a threaded GEMM sums in another order)")
    for flag in ("publish", "results"):
        if getattr(args, flag):
            try:
                setattr(args, flag, wire.check_endpoint(getattr(args, flag)))     # its normal form
            except ValueError as e:
                p.error(f"--{flag}: {e}")
    args.control_key = None
    if args.allow_control and not (args.publish and args.control_key_file):
        p.error("--allow-control needs --publish and --control-key-file")
    if args.control_key_file:
        try:
            args.control_key = load_control_key(args.control_key_file)
        except ValueError as e:
            p.error(f"--control-key-file {e}")
    if args.resume not in (None, "on", "auto"):
        p.error(f"--resume takes no value, or 'auto' (got {args.resume!r})")
    if args.checkpoint_dir is not None and str(args.checkpoint_dir).lower() == "none":
        args.checkpoint_dir, args.no_save = None, True
    if args.no_save and (args.checkpoint_dir or args.run_name or args.resume):
        p.error("--no-save keeps nothing: it goes with no --checkpoint-dir, --run-name or --resume")
    if args.run_name is not None:
        if args.checkpoint_dir:
            p.error("--run-name names a folder under runs/; --checkpoint-dir names one anywhere: give one of them")
        if args.run_name in ("", ".", "..") or "/" in args.run_name or os.sep in args.run_name:
            p.error(f"--run-name {args.run_name!r}: a plain folder name (it goes under runs/)")
    if args.resume and not (args.checkpoint_dir or args.run_name):
        p.error("--resume needs --checkpoint-dir (or --run-name)")
    override = frozenset(name.strip().replace("-", "_") for name in args.override.split(",") if name.strip())
    unknown = sorted(override - {f.name for f in fields(TrainConfig)})
    if unknown:
        p.error(f"--override: {', '.join(unknown)} not a training flag (see the 'training' group in --help)")
    if override and not args.resume:
        p.error("--override only applies with --resume")
    try:
        fault = FaultInjector.parse(args.fault)
    except ValueError as e:
        p.error(str(e))
    argv = tuple(sys.argv[1:] if argv is None else argv)        # for the resume command the run prints
    # a restart (lenet-launch adds --resume) continues what was started: --start-over is then ignored
    # no --checkpoint-dir: the run keeps its model in a run folder (a rehearsal keeps its temporary one)
    plan = FolderPlan(args.checkpoint_dir, args.keep, args.resume, args.start_over and not args.resume,
                      frozenset(_given_config(p, list(argv))), override,
                      run_folder=not (args.checkpoint_dir or args.no_save or args.test_mode),
                      run_name=args.run_name)
    restarts = os.environ.get(LAUNCH_RESTARTS_VAR, "")              # set by lenet-launch for its jobs
    facts = RunFacts(args.checkpoint_dir, args.metrics, argv, tuple(data_flags(args)), args.test_mode,
                     restarts=int(restarts) if restarts.isdigit() else None)
    return Flags(args, config, plan, facts, fault, 1 if args.deterministic else args.threads)


def _metrics_address(p, args):
    """--metrics-port -> (host, port) or None; a non-loopback host only with --metrics-public."""
    if args.metrics_public and not args.metrics_port:
        p.error("--metrics-public needs --metrics-port")
    if not args.metrics_port:
        return None
    host, port = host_port(p, "--metrics-port", args.metrics_port)
    if not wire.is_loopback(host):
        if not args.metrics_public:
            p.error(f"--metrics-port {args.metrics_port}: a non-loopback address serves the run's figures to "
                    f"anyone who can reach it; add --metrics-public to mean that")
        if launcher_rank() in (None, 0):
            print(f"lenet-train: warning: --metrics-port {args.metrics_port}: anyone who can reach this port "
                  f"reads the run's figures", file=sys.stderr, flush=True)
    return host, port


def data_flags(args):
    """The flags that name the data of `args`, for another program (lenet-evaluator) to read the same."""
    if args.subset:
        return ["--subset"]
    flags = [f"--dataset={args.dataset}"] if args.dataset != "mnist" else []
    return flags + ([f"--data-dir={args.data_dir}"] if args.data_dir else [])


def _given_config(parser, argv):
    """The TrainConfig fields the user typed on the command line (parsed again with no defaults at all)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        typed = vars(parser.parse_args(argv))
    finally:
        for a, d in saved:
            a.default = d
    return {f.name for f in fields(TrainConfig)} & set(typed)
