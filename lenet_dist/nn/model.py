"""LeNet-5 from layers.py, with every parameter a view into one flat vector (and every gradient too).

    input (B,28,28) normalized float, seen by the layers as (1,28,28,B): batch last (see layers.py)
    C1  conv 6@5x5, padding 2   (6,2,2,14,14,B)  S2 max 2x2 + ReLU  (6,14,14,B)
    C3  conv 16@5x5             (16,2,2,5,5,B)   S4 max 2x2 + ReLU  (16,5,5,B)
    flatten in (C,H,W) order    (400,B)
    F5  dense 120, ReLU   F6 dense 84, ReLU   output dense 10 -> logits (10,B)   61,706 parameters

The convolutions hand the pools their output "pool-major": (C, row parity, column parity, H/2, W/2, B), the
four members of every 2x2 window in four contiguous blocks (StripConv2D for conv1, BandedConv2D for conv2;
see conv.py). Pooling runs before the ReLU, in the same layer: max and ReLU are both monotone,
so relu(max(x)) == max(relu(x)) value for value and gradient for gradient, and the ReLU then touches a
quarter of the elements. It also keeps the pool free of the ties that a ReLU's zeros would create.
forward() is inference (no masks kept); loss_and_grad() runs the training forward and the backward.
"""
from __future__ import annotations

import numpy as np

from lenet_dist.data import normalize
from lenet_dist.nn.conv import BandedConv2D, StripConv2D
from lenet_dist.nn.layers import Dense, Flatten, MaxPool2D, ReLU, SoftmaxCrossEntropy

# Named parameter layout (PyTorch's), in the order they sit in the flat vector.
PARAM_SPECS = [
    ("conv1.weight", (6, 1, 5, 5)), ("conv1.bias", (6,)),
    ("conv2.weight", (16, 6, 5, 5)), ("conv2.bias", (16,)),
    ("fc1.weight", (120, 400)), ("fc1.bias", (120,)),
    ("fc2.weight", (84, 120)), ("fc2.bias", (84,)),
    ("fc3.weight", (10, 84)), ("fc3.bias", (10,)),
]
NUM_PARAMS = sum(int(np.prod(s)) for _, s in PARAM_SPECS)  # 61,706


class LeNet5:
    def __init__(self, seed=0, dtype=np.float32, grad_tail=0, label_smoothing=0.0):
        """`grad_tail` extra slots after the gradients in `grad_buffer`: the trainer puts its step figures
        there so that one allreduce carries gradients and statistics together. `label_smoothing`: training's
        loss only (layers.SoftmaxCrossEntropy); evaluate() reports the plain cross-entropy."""
        rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.conv1 = StripConv2D(1, 6, 5, padding=2, rng=rng, dtype=dtype)
        self.conv2 = BandedConv2D(6, 16, 5, rng=rng, dtype=dtype)
        self.fc1 = Dense(400, 120, rng=rng, dtype=dtype)
        self.fc2 = Dense(120, 84, rng=rng, dtype=dtype)
        self.fc3 = Dense(84, 10, rng=rng, dtype=dtype)
        self.layers = [self.conv1, MaxPool2D(dtype, relu=True),
                       self.conv2, MaxPool2D(dtype, relu=True),
                       Flatten(), self.fc1, ReLU(), self.fc2, ReLU(), self.fc3]
        self.loss = SoftmaxCrossEntropy(label_smoothing)       # what training minimizes and reports
        self.plain_loss = SoftmaxCrossEntropy()                 # evaluation's, comparable across recipes
        self.grad_buffer = np.zeros(NUM_PARAMS + grad_tail, self.dtype)
        self.params, self.grads = self._bind_flat(self.grad_buffer[:NUM_PARAMS])

    def _bind_flat(self, grads):
        """Move every parameter and gradient into one contiguous vector; layers keep views into it."""
        owners = {"conv1": self.conv1, "conv2": self.conv2, "fc1": self.fc1, "fc2": self.fc2, "fc3": self.fc3}
        params = np.empty(NUM_PARAMS, self.dtype)
        self.grad_offset = {}           # layer -> flat offset of its first gradient (backward's ready() calls)
        off = 0
        for full, shape in PARAM_SPECS:
            layer, name = owners[full.split(".")[0]], full.split(".")[1]
            self.grad_offset.setdefault(layer, off)
            n = int(np.prod(shape))
            assert layer.params[name].shape == shape, (full, layer.params[name].shape)
            pv, gv = params[off:off + n].reshape(shape), grads[off:off + n].reshape(shape)
            pv[...] = layer.params[name]
            layer.params[name], layer.grads[name] = pv, gv
            off += n
        return params, grads

    def workspaces(self):
        """The layers' scratch (layers.Workspace): a caller may back them with a shared ScratchArena."""
        return [layer.ws for layer in self.layers if hasattr(layer, "ws")]

    def named_params(self):
        """name -> view into the flat vector, in PARAM_SPECS order."""
        out, off = {}, 0
        for name, shape in PARAM_SPECS:
            n = int(np.prod(shape))
            out[name] = self.params[off:off + n].reshape(shape)
            off += n
        return out

    def load_named(self, arrays):
        """Copy named arrays (PARAM_SPECS names and shapes) into the flat vector."""
        for name, view in self.named_params().items():
            a = np.asarray(arrays[name])
            if a.shape != view.shape:
                raise ValueError(f"{name}: expected shape {view.shape}, got {a.shape}")
            view[...] = a

    def forward(self, x, train=False, before=None):
        """x (B,28,28) normalized -> logits (10,B). `train=True` keeps what backward needs. `before(offset)`,
        if given, is called before each layer with parameters (flat offset of its first one): the pipelined
        reducer applies the previous update's last layers there (parallel/reducers.py).           [dist]"""
        h = x.transpose(1, 2, 0)[None]  # (1,28,28,B) view; conv1 copies it into its padded buffer
        for layer in self.layers:
            if before is not None and layer in self.grad_offset:
                before(self.grad_offset[layer])
            h = layer.forward(h, train)
        return h

    def backward(self, dlogits, ready=None):
        """`ready(offset)`, if given, is called as soon as every gradient from flat `offset` to the end is
        final: after fc3, fc2, fc1, conv2, conv1 in turn (the layers run last to first), so that the caller
        can send them off while the rest of backward computes (parallel/reducers.py).             [dist]"""
        d = dlogits
        for layer in reversed(self.layers):
            d = layer.backward(d)
            if ready is not None and layer in self.grad_offset:
                ready(self.grad_offset[layer])

    def loss_and_grad(self, x, y, scale, ready=None, before=None):
        """Fill self.grads with the gradient of `scale * sum of per-example losses` on (x, y); `ready`: see
        backward(), `before`: forward().

        Returns (sum of losses, number correct) over the batch, for logging.
        """
        logits = self.forward(x, train=True, before=before)
        losses = self.loss.forward(logits, y)
        self.backward(self.loss.backward(self.dtype.type(scale)), ready)
        return float(losses.sum(dtype=np.float64)), int((logits.argmax(axis=0) == y).sum())

    def evaluate(self, images, labels, batch_size=128):
        """Mean loss and accuracy over uint8 images (N,28,28) and labels (N,).

        batch_size 128: larger batches' im2col matrices no longer fit in cache (docs/performance.md)."""
        total_loss, correct = 0.0, 0
        buf = None
        for lo in range(0, len(images), batch_size):
            u8 = images[lo:lo + batch_size]
            if buf is None or len(buf) != len(u8):
                buf = np.empty(u8.shape, self.dtype)
            x = normalize(u8, out=buf)
            y = labels[lo:lo + batch_size].astype(np.intp)
            logits = self.forward(x)
            total_loss += float(self.plain_loss.forward(logits, y).sum(dtype=np.float64))
            correct += int((logits.argmax(axis=0) == y).sum())
        n = max(len(images), 1)
        return total_loss / n, correct / n
