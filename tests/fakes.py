"""Shared by test_transport.py and test_evaluator.py: real checkpoints, broken ones, and a fake trainer
that answers the evaluator's requests with whatever frames a test scripts (a raw ROUTER socket)."""
import io
import json
import threading

import numpy as np
import zmq

from lenet_dist.checkpoints import format as checkpoint
from lenet_dist.nn.model import LeNet5, NUM_PARAMS
from lenet_dist.transport import wire

OVERSIZE = checkpoint.MAX_BYTES + (1 << 20)


def make_params(seed):
    return {k: v.copy() for k, v in LeNet5(seed=seed).named_params().items()}


def make_ckpt(step, seed=0, final=False, epoch=0, params=None, data=None):
    """A checkpoint's bytes; `data` is its meta["data"] (data/identity.py: data_record), none by default."""
    params = params if params is not None else make_params(seed)
    meta = {"step": step, "epoch": epoch, "pos": 0, "final": final, "config": {"seed": seed}}
    if data is not None:
        meta["data"] = data
    return checkpoint.to_bytes(params, np.zeros(NUM_PARAMS, np.float32), meta)


def _npz(arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _arrays(step):
    with np.load(io.BytesIO(make_ckpt(step)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def bad_npz(kind, step):
    """A checkpoint body broken in one way; the transport passes it, checkpoint.from_bytes refuses it."""
    a = _arrays(step)
    if kind == "truncated":
        return make_ckpt(step)[:100_000]
    if kind == "missing":
        del a["fc3.bias"]
    elif kind == "shape":
        a["fc1.weight"] = np.ascontiguousarray(a["fc1.weight"].T)
    elif kind == "dtype":
        a["fc2.bias"] = a["fc2.bias"].astype(np.float64)
    elif kind == "object":
        a["conv1.bias"] = np.array([object()] * 6, dtype=object)  # saved pickled: must never be loaded
    elif kind == "future":
        meta = json.loads(a["meta"].tobytes())
        meta["format_version"] = checkpoint.FORMAT_VERSION + 1
        a["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    else:
        raise ValueError(kind)
    return _npz(a)


# reason substrings that each kind of bad input must produce
NPZ_REASONS = {"truncated": "not a readable .npz", "missing": "missing array fc3.bias",
               "shape": "fc1.weight is float32(400, 120), expected float32(120, 400)",
               "dtype": "fc2.bias is float64", "object": "not a readable .npz",
               "future": f"format_version {checkpoint.FORMAT_VERSION + 1}"}


def header(req_id, step, body, *, final=False, version=wire.VERSION, sha=None, size=None, trainer_step=None):
    return wire.encode({"proto": wire.PROTO, "version": version, "kind": "checkpoint", "id": req_id,
                        "server": "fake", "trainer_step": trainer_step if trainer_step is not None else step,
                        "step": step, "epoch": 0, "size": len(body) if size is None else size,
                        "sha256": sha or wire.sha256(body), "final": final})


def good_reply(req_id, step, body, final=False):
    return [header(req_id, step, body, final=final), body]


def bad_replies():
    """name -> (function(req_id) -> frames, reason substring), in the order a fake trainer serves them;
    each claims a higher step than the one before."""
    out = {}
    step = 100
    def add(name, make, reason):
        nonlocal step
        step += 1
        out[name] = (lambda rid, s=step: make(rid, s), reason)
    rnd = np.random.default_rng(0).bytes(300)
    add("random bytes", lambda rid, s: [rnd], "not JSON")
    add("empty message", lambda rid, s: [b""], "empty")
    add("wrong sha256", lambda rid, s: [header(rid, s, make_ckpt(s), sha="0" * 64), make_ckpt(s)],
        "do not match the header's sha256")
    add("wrong size", lambda rid, s: [header(rid, s, make_ckpt(s), size=123), make_ckpt(s)], "header says 123")
    add("future header version",
        lambda rid, s: [header(rid, s, make_ckpt(s), version=wire.VERSION + 1), make_ckpt(s)],
        f"format version {wire.VERSION + 1}, newer than")
    big = bytes(OVERSIZE)
    add("oversized", lambda rid, s: [header(rid, s, big), big], "limit")
    for kind, reason in NPZ_REASONS.items():
        add(f"npz {kind}", lambda rid, s, k=kind: good_reply(rid, s, bad_npz(k, s)), reason)
    return out


class FakeTrainer:
    """A raw ROUTER bound on 127.0.0.1 answering each fetch with the next scripted reply (a function of
    the request id), 'none' when the script is exhausted; status requests get 'none'; results are kept."""

    def __init__(self, script):
        self.script = list(script)
        self.results, self.requests = [], []
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.last_endpoint.decode()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, frame = self.sock.recv_multipart()
            req = json.loads(frame)
            self.requests.append(req)
            if req["op"] == "result":
                self.results.append(req["result"])
                continue
            if req["op"] == "fetch" and self.script:
                frames = self.script.pop(0)(req["id"])
            else:
                frames = [wire.encode(wire.none_header(req_id=req["id"], server="fake", trainer_step=0))]
            self.sock.send_multipart([ident] + frames)

    def close(self):
        self._stop.set()
        self.thread.join(2)
        self.sock.close(0)
        self.ctx.term()
