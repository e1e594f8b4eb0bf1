"""Does the dashboard's state stop growing once its bounded history is full? A LiveState is fed a long run's
worth of step rows (as a 2-rank trainer sends them) and evaluations (a real analysis and model each), in
blocks of 800 evaluations and 4,000 rows; this process's RSS after each block.

    python bench/dashboard_memory.py
"""
import gc
import sys
import time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
import numpy as np
from lenet_dist.dashboard.state import LiveState, MAX_EVALUATIONS, MAX_STEPS
from lenet_dist.data import load_subset
from lenet_dist.evaluation import analysis
from lenet_dist.nn.model import LeNet5

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
data = load_subset()
state = LiveState(data.test_images, data.test_labels)
m = LeNet5(seed=1)
detail = analysis.analyse(m, data.test_images, data.test_labels)
params = m.named_params()
print(f"baseline {rss():.1f} MB; bounds: {MAX_STEPS} steps, {MAX_EVALUATIONS} evaluations")
step = 0
for block in range(8):
    for _ in range(800):                      # 800 evaluations and 4,000 step rows a block
        rows = []
        for _ in range(5):
            step += 1
            rows.append({"event": "step", "step": step, "epoch": step // 1000, "loss": 1.0 / step, "acc": 0.9,
                         "lr": 0.05, "images_per_s": 8000.0, "rank_images_per_s": [4000.0, 4000.0],
                         "rank_compute_s": [0.01, 0.011], "rank_wait_s": [0.001, 0.002], "time": time.time()})
        state.add_steps(rows)
        state.add_evaluation({"step": step, "epoch": 0, "accuracy": detail.accuracy, "loss": detail.loss,
                              "val_accuracy": 0.9, "val_loss": 0.3, "n_val": 166, "eval_seconds": 0.2,
                              "lag_steps": 3, "trainer_step": step, "n_test": 1000, "final": False,
                              "time": time.time()}, params, detail)
    gc.collect()
    h = state.history()
    print(f"after {step:6d} steps, {len(h['evaluations']) :4d} evaluations kept, {len(h['steps']):5d} rows kept: "
          f"RSS {rss():.1f} MB")
