"""Checkpoint bytes over ZeroMQ, trainer side and evaluator side. This package is the only place that imports zmq.

    trainer, rank 0                                          evaluator
    TrainerLink (bind)    ROUTER <- fetch {newer_than S, wait_ms T} -- DEALER  CheckpointClient (connect)
                                 -- [header, .npz bytes] | [none] ->
                                 <- result {step, accuracy, loss..} --        (its figures; no reply)
                     SUB (optional) <-- results ---------------------- PUB     ResultsPublisher (bind)

Latest value with long polling: publish() only swaps a reference under a lock; a background thread owns
the socket and answers each fetch with the newest checkpoint past step S at once, or parks the request
until one is published or T ms have passed. So training never waits for an evaluator, and a busy
evaluator simply asks again when it is ready and gets the newest, skipping whatever it missed.
Either side may restart: the client gives up on a request after T ms plus a grace period (at once if
the connection drops) and reconnects with a fresh socket, the "lazy pirate" pattern of the zguide.

Wire format and its checks: wire.py. Every receiving socket has ZMQ_MAXMSGSIZE; nothing is unpickled.
CurveZMQ (opt-in): the trainer has a key pair and admits only clients whose public key is in a folder
(zmq.auth ThreadAuthenticator); a client presents its key pair and the trainer's public key. Results on
the ResultsPublisher PUB socket are not encrypted (figures only, no model data; loopback by default);
the copy each evaluator sends the trainer travels on the checkpoint channel, authenticated.

Layout: base.py (the error type, socket helpers, constants), keys.py (CurveZMQ key files, the trainer's
authenticator), link.py (TrainerLink, the trainer's end), client.py (CheckpointClient, ResultsPublisher:
the evaluator's end).
"""
from lenet_dist.transport.base import HANDSHAKE_MS, MAX_WAIT_MS, RESULT_TOPIC, TransportError
from lenet_dist.transport.client import CheckpointClient, ResultsPublisher
from lenet_dist.transport.keys import generate_keys, load_key, load_key_pair
from lenet_dist.transport.link import TrainerLink

__all__ = ["CheckpointClient", "HANDSHAKE_MS", "MAX_WAIT_MS", "RESULT_TOPIC", "ResultsPublisher", "TrainerLink",
           "TransportError", "generate_keys", "load_key", "load_key_pair"]
