"""One process's training step (lenet_dist/nn/) of this checkout against an older commit's, interleaved in one job.

    git worktree add --detach /tmp/old HEAD
    LENET_DATA_DIR=/path/to/mnist python bench/model_interleaved.py --old /tmp/old [--batch 64] [--blocks 10]

The older tree's lenet_dist/nn/ is imported under another name, so both models live in this process; blocks
of steps of each alternate (old, new, new, old, ...) on the same batches, one BLAS thread, the default
recipe (bench/timing.py). Prints one JSON line: median ms per step (CPU time) of each and old / new as the
median over blocks, and whether the parameters are still equal bit for bit after the warm-up and at the
end (both models see the same batches; a change of summation order makes them differ in the last bits). For layer changes; bench/torch_interleaved.py compares PyTorch.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def import_nn(tree, name="old_nn"):
    """`tree`/lenet_dist/nn as the package `name`, its `lenet_dist.nn.` imports pointed at itself."""
    src = Path(tree) / "lenet_dist" / "nn"
    if not (src / "model.py").is_file():
        raise SystemExit(f"model_interleaved: no lenet_dist/nn/model.py under {tree}")
    pkg = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None, is_package=True))
    pkg.__path__ = []
    sys.modules[name] = pkg
    for mod in ("layers", "conv", "optim", "model"):
        path = src / f"{mod}.py"
        if not path.is_file():
            continue
        code = path.read_text().replace("lenet_dist.nn.", f"{name}.")
        m = importlib.util.module_from_spec(importlib.util.spec_from_loader(f"{name}.{mod}", loader=None))
        m.__file__ = str(path)
        sys.modules[f"{name}.{mod}"] = m
        exec(compile(code, str(path), "exec"), m.__dict__)
        setattr(pkg, mod, m)
    return pkg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="a checkout (git worktree) of the older commit")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--images", type=int, default=3200, help="images per block")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.blocks < 2 or args.images < args.batch:
        ap.error("need --batch >= 1, --blocks >= 2, --images >= --batch")
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from threadpoolctl import threadpool_limits

    from bench.timing import Batches, load_data, recipe
    from lenet_dist.nn import model as new_model, optim as new_optim

    old = import_nn(args.old)
    ds, kind = load_data(prog="model_interleaved.py")
    cfg, B = recipe(), args.batch

    def make(model_mod, optim_mod):
        m = model_mod.LeNet5(seed=cfg.seed)
        o = optim_mod.SGD(m.params, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        batches, inv_b = Batches(ds, cfg, B), np.float32(1.0 / B)

        def step(idx):
            m.loss_and_grad(*batches(idx), 1.0)
            m.grads *= inv_b
            o.step(m.grads, cfg.lr)
        return step, m

    (s_old, m_old), (s_new, m_new) = make(old.model, old.optim), make(new_model, new_optim)
    rng, steps = np.random.default_rng(0), max(1, args.images // B)
    times = {"old": [], "new": []}
    with threadpool_limits(1, "blas"):
        for _ in range(10):
            idx = rng.integers(0, len(ds.train_images), B)
            s_old(idx)
            s_new(idx)
        same = bool(np.array_equal(m_old.params.view(np.uint32), m_new.params.view(np.uint32)))   # bit for bit
        for k in range(args.blocks):
            todo = [rng.integers(0, len(ds.train_images), B) for _ in range(steps)]
            for name, fn in ((("old", s_old), ("new", s_new)) if k % 2 == 0 else (("new", s_new), ("old", s_old))):
                t = time.process_time()
                for idx in todo:
                    fn(idx)
                times[name].append((time.process_time() - t) / steps)
    same_end = bool(np.array_equal(m_old.params.view(np.uint32), m_new.params.view(np.uint32)))
    ratios = [o / n for o, n in zip(times["old"], times["new"])]
    print(json.dumps({"bench": "model_interleaved", "data": kind, "batch": B, "blocks": args.blocks,
                      "old_ms": round(1e3 * statistics.median(times["old"]), 3),
                      "new_ms": round(1e3 * statistics.median(times["new"]), 3),
                      "speedup": round(statistics.median(ratios), 3), "speedup_all": [round(r, 3) for r in ratios],
                      "params_equal_after_warmup": same, "params_equal_at_end": same_end}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
