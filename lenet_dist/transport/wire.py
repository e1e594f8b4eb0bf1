"""The checkpoint wire format, without any sockets: what transport/ sends and what it accepts.

A reply from the trainer is one ZeroMQ message of one or two frames:

    frame 0  header, UTF-8 JSON object (at most 64 KiB):
               proto "lenet-ckpt", version 1, kind "checkpoint" | "none" | "error", id (echo of the request),
               server (random id of this trainer process), trainer_step (the trainer's newest step),
               and for kind "checkpoint": step, epoch, size, sha256 (hex, of frame 1), final (bool);
               for kind "error": reason (str)
    frame 1  kind "checkpoint" only: the raw .npz bytes of checkpoint.to_bytes, exactly `size` bytes

A request from an evaluator is one frame, a JSON object: proto, version, op, id, and per op
    "fetch":  newer_than (step), seen_final (bool), wait_ms, max_bytes   -> checkpoint or none
    "status": (nothing more)                                              -> none (carries trainer_step)
    "telemetry": since (the last telemetry seq the client has, -1: none)   -> telemetry: rows (the
              trainer's "event": "step" dicts after `since`, oldest first, at most MAX_TELEMETRY_ROWS), seq
              (of the last row sent, or the newest the trainer has if none)
    "result": result (the evaluator's figures, see check_result)          -> no reply
    "control": control {action, value, run_id, nonce, time, source}, mac (HMAC-SHA256, transport/control.py;
              see check_control)                                          -> none with control "queued",
              or error naming why it was refused

Nothing here is ever unpickled: JSON and .npz only, the .npz itself checked by checkpoint.from_bytes.
What the trainer keeps between requests (the checkpoint it serves, its step rows, its inbox of results) is
in served.py.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import math


PROTO = "lenet-ckpt"
VERSION = 1
MAX_HEADER = 64 << 10           # requests, headers and results are small; anything bigger is refused
KINDS = ("checkpoint", "none", "error", "telemetry")
MAX_TELEMETRY_ROWS = 200        # rows in one telemetry reply (each a few hundred bytes: the header stays small)


class BadMessage(Exception):
    """A message that breaks the wire format; one line. `step` is the checkpoint step it claimed, when
    its header was readable, so that the caller can skip that checkpoint instead of asking again."""

    def __init__(self, reason, step=None):
        super().__init__(reason)
        self.step = step


def encode(obj):
    return json.dumps(obj, sort_keys=True, allow_nan=False).encode()


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def _is_int(v, lo=0):
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


class _NotFinite(ValueError):
    pass


def _no_constant(name):                 # NaN, Infinity, -Infinity: Python's json accepts them, JSON does not
    raise _NotFinite(name)


def _finite_float(text):                # 1e999 would parse as inf
    v = float(text)
    if not math.isfinite(v):
        raise _NotFinite(text[:20])
    return v


def _bounded_int(text):                 # a 60,000-digit integer is no step, id or size of ours
    if len(text) > 30:
        raise _NotFinite(f"an integer of {len(text)} digits")
    return int(text)


def request_id(req):
    """The id to echo back in a reply: a client's own (an integer or a short string), else None."""
    rid = req.get("id") if isinstance(req, dict) else None
    if isinstance(rid, bool) or not (isinstance(rid, int) and abs(rid) < 2**63
                                     or isinstance(rid, str) and len(rid) <= 64):
        return None
    return rid


def decode_object(frame, what="message"):
    """bytes -> dict, or BadMessage naming why not."""
    if len(frame) == 0:
        raise BadMessage(f"empty {what}")
    if len(frame) > MAX_HEADER:
        raise BadMessage(f"{what} is {len(frame)} bytes, more than {MAX_HEADER}")
    try:
        obj = json.loads(bytes(frame).decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float,
                         parse_int=_bounded_int)
    except _NotFinite as e:
        raise BadMessage(f"{what} holds {e}: only finite numbers are accepted") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadMessage(f"{what} is not JSON ({len(frame)} bytes starting {bytes(frame[:8])!r})") from None
    if not isinstance(obj, dict):
        raise BadMessage(f"{what} is JSON {type(obj).__name__}, expected an object")
    if obj.get("proto") != PROTO:
        raise BadMessage(f"{what} has proto {obj.get('proto')!r}, expected {PROTO!r}")
    version = obj.get("version")
    if not _is_int(version, 1):
        raise BadMessage(f"{what} has format version {version!r}, expected an integer >= 1")
    if version > VERSION:
        raise BadMessage(f"{what} has format version {version}, newer than the {VERSION} this program reads")
    return obj


def check_endpoint(endpoint, *, bind=True):
    """A ZeroMQ endpoint as given by a user -> the same, with port 0 spelled '*' (ZeroMQ's "any free port");
    ValueError for a tcp port outside 1-65535, which ZeroMQ would silently replace by a random one."""
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise ValueError(f"endpoint {endpoint!r}: expected TRANSPORT://ADDRESS, e.g. tcp://127.0.0.1:5555")
    scheme, _, address = endpoint.partition("://")
    if scheme != "tcp":
        return endpoint
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"endpoint {endpoint!r}: expected tcp://HOST:PORT (PORT * or 0 for any free port)")
    if port in ("*", "0") and bind:
        return f"tcp://{host}:*"
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"endpoint {endpoint!r}: port {port!r} is not in 1-65535"
                         + (" (* or 0: any free port)" if bind else ""))
    return endpoint



def is_loopback(host_or_endpoint):
    """Whether a host ("127.0.0.1", "::1", "[::1]", "localhost") or a ZeroMQ endpoint ("tcp://[::1]:5555")
    can be reached from this host only. ipc:// and inproc:// are; a host name other than localhost is not
    (it may resolve to anything), nor a wildcard (*, 0.0.0.0, ::)."""
    host = str(host_or_endpoint)
    if "://" in host:
        scheme, _, address = host.partition("://")
        if scheme != "tcp":
            return scheme in ("ipc", "inproc")
        host = address.rpartition(":")[0] or address
    host = host.removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def checkpoint_header(*, req_id, server, trainer_step, step, epoch, data_sha256, size, final):
    return {"proto": PROTO, "version": VERSION, "kind": "checkpoint", "id": req_id, "server": server,
            "trainer_step": trainer_step, "step": step, "epoch": epoch, "size": size,
            "sha256": data_sha256, "final": bool(final)}


def none_header(*, req_id, server, trainer_step, reason=None):
    h = {"proto": PROTO, "version": VERSION, "kind": "none" if reason is None else "error", "id": req_id,
         "server": server, "trainer_step": trainer_step}
    if reason is not None:
        h["reason"] = reason
    return h


def parse_reply(frames, max_bytes):
    """The frames of one reply -> (header, body or None). Checks every field, the size bound, the size
    and the sha256 of the body; the body's arrays are checked later, by checkpoint.from_bytes."""
    if not frames or (len(frames) == 1 and len(frames[0]) == 0):
        raise BadMessage("empty message")
    h = decode_object(frames[0], "header")
    kind = h.get("kind")
    if kind not in KINDS:
        raise BadMessage(f"header kind {kind!r}, expected one of {', '.join(KINDS)}")
    if not (h.get("trainer_step") is None or _is_int(h.get("trainer_step"))):
        raise BadMessage(f"header trainer_step {h.get('trainer_step')!r}, expected an integer >= 0")
    if not isinstance(h.get("server"), str):
        raise BadMessage(f"header server {h.get('server')!r}, expected a string")
    if kind == "telemetry":
        check_telemetry(h)
    if kind != "checkpoint":
        if len(frames) != 1:
            raise BadMessage(f"a '{kind}' reply has {len(frames)} frames, expected 1")
        return h, None
    step = h.get("step")
    if not _is_int(step):
        raise BadMessage(f"header step {step!r}, expected an integer >= 0")
    for key, ok, expected in (("epoch", _is_int(h.get("epoch")), "an integer >= 0"),
                              ("size", _is_int(h.get("size")), "an integer >= 0"),
                              ("final", isinstance(h.get("final"), bool), "true or false"),
                              ("sha256", _is_hex64(h.get("sha256")), "64 lowercase hex digits")):
        if not ok:
            raise BadMessage(f"header {key} {h.get(key)!r}, expected {expected}", step)
    if h["size"] > max_bytes:
        raise BadMessage(f"checkpoint of {h['size']} bytes, more than the {max_bytes} allowed", step)
    if len(frames) != 2:
        raise BadMessage(f"a checkpoint reply has {len(frames)} frames, expected 2 (header, bytes)", step)
    body = frames[1]
    if len(body) != h["size"]:
        raise BadMessage(f"checkpoint is {len(body)} bytes, header says {h['size']}", step)
    if sha256(body) != h["sha256"]:
        raise BadMessage("checkpoint bytes do not match the header's sha256", step)
    return h, body


def _is_hex64(v):
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def check_result(obj):
    """An evaluator's result as received from the network -> the same dict, or BadMessage. It must
    carry step, accuracy (a fraction) and loss (null if it overflowed); the rest (epoch, lag_steps, ...)
    is passed through."""
    if not isinstance(obj, dict):
        raise BadMessage(f"result is {type(obj).__name__}, expected an object")
    if not _is_int(obj.get("step")):
        raise BadMessage(f"result step {obj.get('step')!r}, expected an integer >= 0")
    acc, loss = obj.get("accuracy"), obj.get("loss")
    if not (isinstance(acc, (int, float)) and not isinstance(acc, bool) and 0.0 <= acc <= 1.0):
        raise BadMessage(f"result accuracy {acc!r}, expected a fraction in [0, 1]")
    if not (loss is None or isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss)):
        raise BadMessage(f"result loss {loss!r}, expected a finite number or null")
    return obj


def check_telemetry(h):
    """A telemetry reply: rows, a list of at most MAX_TELEMETRY_ROWS objects each with an integer step
    (decode_object has refused non-finite numbers already), and an integer seq; BadMessage otherwise."""
    rows, seq = h.get("rows"), h.get("seq")
    if not _is_int(seq, -1):
        raise BadMessage(f"telemetry seq {str(seq)[:40]!r}, expected an integer >= -1")
    if not isinstance(rows, list) or len(rows) > MAX_TELEMETRY_ROWS:
        raise BadMessage(f"telemetry rows: expected a list of at most {MAX_TELEMETRY_ROWS}")
    if not all(isinstance(r, dict) and _is_int(r.get("step")) for r in rows):
        raise BadMessage("telemetry row without an integer step")
    return h


def telemetry_header(*, req_id, server, trainer_step, rows, seq):
    return {"proto": PROTO, "version": VERSION, "kind": "telemetry", "id": req_id, "server": server,
            "trainer_step": trainer_step, "rows": rows, "seq": seq}


def check_control(req):
    """A control request's fields by type (the MAC, the run and the freshness are control.py's): the same
    request, or BadMessage."""
    c = req.get("control")
    if not isinstance(c, dict) or set(c) != {"action", "value", "run_id", "nonce", "time", "source"}:
        raise BadMessage("control: expected an object with action, value, run_id, nonce, time, source")
    value, when = c["value"], c["time"]
    for key, ok in (("action", isinstance(c["action"], str) and len(c["action"]) <= 20),
                    ("value", value is None or isinstance(value, (int, float)) and not isinstance(value, bool)),
                    ("run_id", isinstance(c["run_id"], str) and len(c["run_id"]) <= 64),
                    ("nonce", isinstance(c["nonce"], str) and 16 <= len(c["nonce"]) <= 64),
                    ("time", isinstance(when, (int, float)) and not isinstance(when, bool)),
                    ("source", isinstance(c["source"], str) and len(c["source"]) <= 200),
                    ("mac", req.get("mac") is None or isinstance(req.get("mac"), str) and len(req["mac"]) <= 128)):
        if not ok:
            raise BadMessage(f"control {key} {str(c.get(key, req.get(key)))[:40]!r}: wrong type or length")
    return req


def check_fetch(req, max_wait_ms):
    for key, lo, hi in (("newer_than", -1, None), ("wait_ms", 0, max_wait_ms), ("max_bytes", 0, None)):
        v = req.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)):
            raise BadMessage(f"fetch {key} {v!r}, expected an integer in [{lo}, {hi or 'inf'}]")
    if not isinstance(req.get("seen_final", False), bool):
        raise BadMessage(f"fetch seen_final {req.get('seen_final')!r}, expected true or false")
    return dict(req, seen_final=req.get("seen_final", False), id=req.get("id"))


