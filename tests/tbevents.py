"""Read TensorBoard event files back (TFRecord framing: length, its CRC, the Event proto, its CRC) with the
Event proto that tensorboardX ships, so that the tests need no TensorFlow or TensorBoard."""
import struct
from pathlib import Path

import numpy as np


def events(directory):
    from tensorboardX.proto import event_pb2
    out = []
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            out.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]))
            pos += 12 + n + 4
    return out


def scalars(directory):
    """tag -> [(step, value)] in the order written."""
    got = {}
    for e in events(directory):
        for v in e.summary.value:
            if v.HasField("simple_value"):
                got.setdefault(v.tag, []).append((e.step, v.simple_value))
    return got


def kinds(directory):
    """tag -> the set of summary kinds written under it ('simple_value', 'histo', 'image', ...)."""
    got = {}
    for e in events(directory):
        for v in e.summary.value:
            got.setdefault(v.tag, set()).add(v.WhichOneof("value"))
    return got


def image(directory, tag):
    """The newest image under `tag` as an array (H, W, C) uint8."""
    from PIL import Image
    import io
    last = None
    for e in events(directory):
        for v in e.summary.value:
            if v.tag == tag and v.HasField("image"):
                last = v.image.encoded_image_string
    return None if last is None else np.asarray(Image.open(io.BytesIO(last)))
