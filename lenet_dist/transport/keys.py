"""CurveZMQ key files (lenet-keys) and the trainer's authenticator of client keys."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from lenet_dist.files import read_regular
from lenet_dist.transport.base import TransportError

def generate_keys(directory, name, *, overwrite=False):
    """Write NAME.key (public) and NAME.key_secret (the pair, mode 0600) into `directory`; their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    existing = [p for p in (d / f"{name}.key", d / f"{name}.key_secret") if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; not overwriting a key")
    old = os.umask(0o077)                           # the secret file is never readable by others
    try:
        public, secret = zmq.auth.create_certificates(str(d), name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return Path(public), Path(secret)


def load_key(path, *, secret=False):
    """The z85 public key of a .key or .key_secret file; with secret=True, (public, secret) from the latter."""
    try:
        read_regular(path, 64 << 10)        # a FIFO or a device is refused here, never opened by zmq.auth
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise TransportError(f"{path}: not a readable CurveZMQ key file: {e}") from None
    if secret and not secret_key:
        raise TransportError(f"{path}: holds no secret key (give the .key_secret file)")
    return (public, secret_key) if secret else public


def load_key_pair(secret_path, public_path=None):
    """(public, secret) z85 keys from a .key_secret file; when `public_path` (its .key file) is given too,
    TransportError unless it is the public half of that secret key. The one key check of every process."""
    pair = load_key(secret_path, secret=True)
    if public_path and load_key(public_path) != pair[0]:
        raise TransportError(f"{public_path} is not the public half of {secret_path}")
    return pair


def _authenticator(ctx, folder):
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.glob("*.key")):
        raise TransportError(f"{folder}: no public keys (*.key) there, so no client could connect")
    auth = ThreadAuthenticator(ctx, log=logging.getLogger("lenet.zmq.auth"))
    auth.start()
    auth.configure_curve(domain="*", location=str(folder))   # read once: restart to admit new keys
    return auth
