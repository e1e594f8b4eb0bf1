"""lenet-export: the ONNX model, run by onnxruntime on raw pixels, predicts what lenet-dist's own forward pass
predicts on every test example; and the PyTorch snippet of docs/export.md, run against a stand-in for torch built
here from NumPy (torch itself is never imported), loads a real checkpoint and predicts the same."""
import re
import sys
import types

import numpy as np
import onnxruntime as ort
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from lenet_dist.checkpoints import folder as ckptdir, format as checkpoint
from lenet_dist.comm import LocalComm
from lenet_dist.config import TrainConfig
from lenet_dist.data import load_subset, normalize
from lenet_dist.nn.model import LeNet5, PARAM_SPECS
from lenet_dist.parallel.step import DataParallelTrainer

from tests.mpiutil import REPO, launch


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of three epochs on the shipped subset (a trained net: no near-ties between classes; the
    default recipe's shifts reach 57% after two, 87% after three), the test images and lenet-dist's own
    predictions and logits for them."""
    data = load_subset()
    t = DataParallelTrainer(TrainConfig(epochs=3, batch_size=64, seed=5), LocalComm(), data)
    while not t.done:
        t.train_step()
    d = tmp_path_factory.mktemp("ckpt")
    path, _ = ckptdir.save(d, *t.checkpoint_content())
    logits = t.model.forward(normalize(data.test_images)).T                     # (N,10)
    return path, data.test_images, data.test_labels, logits


def test_onnx_model_predicts_like_lenet_dist_on_every_test_example(trained, tmp_path):
    path, images, labels, logits = trained
    out = tmp_path / "model.onnx"
    p = launch(0, [path, "-o", out], module="workers.export")
    assert f"wrote {out}" in p.stdout and not list(tmp_path.glob(".*tmp"))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    got_logits, probs = session.run(["logits", "probabilities"], {"images": images.astype(np.float32)})
    assert len(images) == 1000
    assert (got_logits.argmax(1) == logits.argmax(1)).all()                     # every single example
    assert np.abs(got_logits - logits).max() < 1e-4
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs.argmax(1) == logits.argmax(1)).all()
    assert (logits.argmax(1) == labels).mean() > 0.7                            # and it is a trained net


def test_export_takes_a_folder_and_refuses_a_bad_checkpoint_in_one_line(trained, tmp_path):
    path, images, _, logits = trained
    p = launch(0, [path.parent, "-o", tmp_path / "m.onnx"], module="workers.export")
    assert str(path) in p.stdout
    bad = tmp_path / "bad.npz"
    bad.write_bytes(path.read_bytes()[:5000])
    p = launch(0, [bad, "-o", tmp_path / "x.onnx"], module="workers.export", check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and str(bad) in p.stderr
    assert not (tmp_path / "x.onnx").exists()
    p = launch(0, [path], module="workers.export", check=False)
    assert p.returncode == 2 and "-o/--output" in p.stderr


# ------------------------------------------------------------------ docs/export.md's PyTorch snippet

def pytorch_snippet():
    text = (REPO / "docs" / "export.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "load_state_dict" in b]
    assert len(blocks) == 1, "docs/export.md has one PyTorch snippet"
    return blocks[0]


def fake_torch():
    """Just enough of torch, in NumPy, for the snippet: modules record their parameters with torch's
    shapes, load_state_dict is strict (every key, no extra, same shapes), the ops compute for real."""
    torch = types.ModuleType("torch")
    nn = types.ModuleType("torch.nn")
    F = types.ModuleType("torch.nn.functional")

    class Module:
        def __call__(self, x):
            return self.forward(x)

        def _layers(self):
            return {k: v for k, v in vars(self).items() if isinstance(v, (Conv2d, Linear))}

        def load_state_dict(self, state):
            want = {f"{k}.{p}": getattr(m, p).shape for k, m in self._layers().items() for p in ("weight", "bias")}
            got = {k: np.shape(v) for k, v in state.items()}
            assert got == want, (sorted(got), sorted(want))
            for key, v in state.items():
                layer, p = key.split(".")
                setattr(getattr(self, layer), p, np.asarray(v))

        def eval(self):
            return self

    class Conv2d(Module):
        def __init__(self, cin, cout, k, padding=0):
            self.weight, self.bias, self.padding = np.zeros((cout, cin, k, k), np.float32), np.zeros(cout), padding

        def forward(self, x):                                  # cross-correlation, as torch's conv2d
            p = self.padding
            x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
            win = sliding_window_view(x, self.weight.shape[2:], axis=(2, 3))         # (N,C,H,W,kh,kw)
            return np.einsum("nchwij,ocij->nohw", win, self.weight) + self.bias[None, :, None, None]

    class Linear(Module):
        def __init__(self, cin, cout):
            self.weight, self.bias = np.zeros((cout, cin), np.float32), np.zeros(cout)

        def forward(self, x):
            return x @ self.weight.T + self.bias

    def max_pool2d(x, k):
        n, c, h, w = x.shape
        return x.reshape(n, c, h // k, k, w // k, k).max(axis=(3, 5))

    nn.Module, nn.Conv2d, nn.Linear, nn.functional = Module, Conv2d, Linear, F
    F.relu, F.max_pool2d = (lambda x: np.maximum(x, 0)), max_pool2d
    torch.nn, torch.from_numpy = nn, (lambda a: a)
    torch.flatten = lambda x, start_dim=0: x.reshape(*x.shape[:start_dim], -1)
    return {"torch": torch, "torch.nn": nn, "torch.nn.functional": F}


def test_the_pytorch_snippet_loads_a_checkpoint_and_predicts_like_lenet_dist(trained, tmp_path, monkeypatch):
    path, images, _, logits = trained
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    for name, module in fake_torch().items():
        monkeypatch.setitem(sys.modules, name, module)
    snippet = pytorch_snippet()
    assert "allow_pickle=True" not in snippet
    ck = checkpoint.load_file(path)                              # and as a half-precision run saves it:
    halves = checkpoint.to_bytes(ck.params, ck.velocity, dict(ck.meta, ranks=2, allreduce={"scale": [None]}),
                                 np.zeros((2, ck.velocity.size), np.float32))
    for data in (path.read_bytes(), halves):
        (tmp_path / "ckpt" / "best.npz").write_bytes(data)
        scope = {"images": images[:200]}
        exec(compile(snippet, "docs/export.md", "exec"), scope)  # noqa: S102 - our own docs, stubbed torch
        assert (np.asarray(scope["predicted"]) == logits[:200].argmax(1)).all()
        assert {n for n, _ in PARAM_SPECS} == set(scope["state"])   # exactly the parameters: the rest dropped


def test_the_snippet_names_the_model_exactly():
    s = pytorch_snippet()
    assert "nn.Conv2d(1, 6, 5, padding=2)" in s and "nn.Conv2d(6, 16, 5)" in s
    assert "0.1307" in s and "0.3081" in s and "/ 255" in s
    assert '"meta"' in s and '"optim."' in s
    from lenet_dist.data import MEAN, STD
    assert (MEAN, STD) == (0.1307, 0.3081)
    assert LeNet5().conv1.padding == 2
