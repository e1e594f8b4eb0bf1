"""A seeded generator of hostile messages for the checkpoint server and the evaluator's reply parser:
random bytes, valid messages with a field replaced by something odd (NaN, Infinity, 1e999, huge integers,
wrong types, deep nesting), byte-level mutations of valid messages. Same seed, same messages."""
import json
import random

from lenet_dist.transport import wire

# raw JSON texts: some are not JSON at all (NaN), some are JSON but out of any range we use
ODD = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 40, "-" + "9" * 400, "1e-400", "-1", "0",
       "18446744073709551616", "true", "false", "null", '""', '"x"', '"' + "\\u0000" * 10 + '"', "[]", "{}",
       "3.5", "[1,2,3]", '{"a": NaN}', '"\\ud800"', '"' + "a" * 5000 + '"']


def deep(rng):
    n = rng.choice([10, 500, 5000, 10000])     # under the 64 KiB frame limit: huge frames come separately
    return "[" * n + "]" * n if rng.random() < 0.5 else '{"a":' * n + "1" + "}" * n


def odd_value(rng):
    return deep(rng) if rng.random() < 0.1 else rng.choice(ODD)


def _with_raw(obj, key, raw):
    """json text of obj with obj[key] replaced by a raw JSON text (which json.dumps cannot write)."""
    marker = "@@RAW@@"
    return json.dumps(dict(obj, **{key: marker})).replace(f'"{marker}"', raw).encode()


REQUESTS = [
    {"proto": wire.PROTO, "version": 1, "op": "fetch", "id": 1, "newer_than": -1, "seen_final": False,
     "wait_ms": 0, "max_bytes": 1 << 20},
    {"proto": wire.PROTO, "version": 1, "op": "status", "id": 2},
    {"proto": wire.PROTO, "version": 1, "op": "result", "id": 3,
     "result": {"step": 1, "accuracy": 0.5, "loss": 1.0, "sha256": "0" * 64, "extra": 1}},
]


def mutate_bytes(rng, data):
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b) + 1)
        r = rng.random()
        if r < 0.4 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif r < 0.7:
            b[i:i] = bytes([rng.randrange(256)])
        else:
            del b[i:i + rng.randint(1, 4)]
    return bytes(b)


def request(rng):
    """One generated request: a list of frames."""
    kind = rng.random()
    base = rng.choice(REQUESTS)
    if kind < 0.15:
        return [rng.randbytes(rng.randint(0, 200))]
    if kind < 0.55:
        key = rng.choice(sorted(base))
        return [_with_raw(base, key, odd_value(rng))]
    if kind < 0.7:                                  # a result whose own fields are odd
        res = dict(base if base["op"] == "result" else REQUESTS[2])
        field = rng.choice(["step", "accuracy", "loss", "sha256", "extra", "epoch"])
        inner = _with_raw(res["result"], field, odd_value(rng)).decode()
        return [_with_raw(res, "result", inner)]
    if kind < 0.9:
        return [mutate_bytes(rng, wire.encode(base))]
    frames = [wire.encode(base)] * rng.randint(0, 4)  # wrong frame counts
    return frames or [b""]


def reply(rng, good_header, body):
    """One generated reply (a list of frames) built from a valid (header dict, body)."""
    kind = rng.random()
    if kind < 0.15:
        return [rng.randbytes(rng.randint(0, 300))]
    if kind < 0.6:
        key = rng.choice(sorted(good_header))
        return [_with_raw(good_header, key, odd_value(rng)), body]
    if kind < 0.8:
        return [mutate_bytes(rng, wire.encode(good_header)), body]
    if kind < 0.9:
        return [wire.encode(good_header), mutate_bytes(rng, body[:2000])]
    return [wire.encode(good_header)] + [body] * rng.choice([0, 2, 3])


def messages(seed, n, make):
    rng = random.Random(seed)
    for _ in range(n):
        yield make(rng)
