"""SGD with momentum (optionally Nesterov) and weight decay over the flat parameter vector, and LR schedules.

The update, with g the averaged gradient, v the velocity (PyTorch's convention, so recipes carry over):
    g <- g + weight_decay * w
    v <- momentum * v + g
    w <- w - lr * (g + momentum * v)   if nesterov else   w - lr * v
"""
from __future__ import annotations

import math

import numpy as np


class SGD:
    def __init__(self, params, *, momentum=0.9, nesterov=False, weight_decay=0.0):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if nesterov and momentum == 0.0:
            raise ValueError("nesterov needs momentum > 0")
        self.params = params                       # the model's flat vector, updated in place
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        self.velocity = np.zeros_like(params)
        self._g = np.empty_like(params)            # scratch: the step is a few fused in-place ops,
        self._t = np.empty_like(params)            # with no temporary array allocated per step

    def step(self, grads, lr, part=slice(None)):
        """Update the parameters in `part` (a slice of the flat vector; all by default) from `grads`, the
        whole gradient vector. Element by element: updating two parts in turn gives the same bits as one."""
        if not (lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"learning rate must be finite and >= 0, got {lr}")
        w, g, v, t = self.params[part], self._g[part], self.velocity[part], self._t[part]
        np.multiply(w, self.weight_decay, out=g)
        g += grads[part]
        v *= self.momentum
        v += g
        if self.nesterov:
            g += np.multiply(v, self.momentum, out=t)
            w -= np.multiply(g, lr, out=t)
        else:
            w -= np.multiply(v, lr, out=t)

    def state_dict(self):
        return {"velocity": self.velocity.copy()}

    def load_state_dict(self, state):
        v = np.asarray(state["velocity"])
        if v.shape != self.velocity.shape or v.dtype != self.velocity.dtype:
            raise ValueError(f"optimizer velocity: expected {self.velocity.dtype}{self.velocity.shape}, "
                             f"got {v.dtype}{v.shape}")
        self.velocity[...] = v


SCHEDULES = ("constant", "step", "cosine", "plateau")   # plateau: constant; its drops are the caller's scale


class LRSchedule:
    """Learning rate as a function of the global step: linear warm-up, then constant, step or cosine decay.

    `step` multiplies by `gamma` every `step_epochs` epochs; `cosine` decays to `min_lr` at the last step.
    """

    def __init__(self, base_lr, *, kind, total_steps, steps_per_epoch, warmup_steps=0,
                 gamma=0.1, step_epochs=2, min_lr=0.0):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
        if not base_lr > 0:
            raise ValueError(f"learning rate must be > 0, got {base_lr}")
        if warmup_steps < 0 or total_steps < 1 or steps_per_epoch < 1:
            raise ValueError(f"bad schedule lengths: warmup={warmup_steps}, total={total_steps}, "
                             f"per epoch={steps_per_epoch}")
        self.base_lr, self.kind, self.total, self.per_epoch = base_lr, kind, total_steps, steps_per_epoch
        self.warmup, self.gamma, self.step_epochs, self.min_lr = warmup_steps, gamma, step_epochs, min_lr

    def __call__(self, step):
        """LR for the update that takes the model from `step` to `step + 1` (step counts from 0)."""
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        if self.kind in ("constant", "plateau"):
            return self.base_lr
        if self.kind == "step":
            return self.base_lr * self.gamma ** ((step // self.per_epoch) // self.step_epochs)
        span = max(self.total - self.warmup, 1)
        frac = min((step - self.warmup) / span, 1.0)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * frac))
