"""lenet-export: a checkpoint as an ONNX model that takes raw 28x28 images (0..255) and gives logits and
class probabilities; normalization is inside the graph (lenet_dist/nn/onnx_export.py). Needs the `export`
extra (pip install 'lenet-dist[export]').

    lenet-export ckpt/best.npz -o model.onnx        # a checkpoint file (best.npz, last.npz, ckpt-*.npz)
    lenet-export ckpt -o model.onnx                  # a checkpoint folder: its newest valid checkpoint

Exit status: 0 written; 1 the checkpoint or the output cannot be used; 2 a usage error or no onnx package.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from lenet_dist.checkpoints import format as checkpoint, resume
from lenet_dist.checkpoints.format import CheckpointError
from lenet_dist.files import atomic_write
from lenet_dist.run.text import one_line

from workers.common import HelpFormatter


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="lenet-export", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a checkpoint file, or a checkpoint folder (its newest valid one)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    return p.parse_args(argv)


def _load(path):
    if path.is_dir():
        found = resume.newest_usable(path, warn=lambda m: print(f"lenet-export: {m}", file=sys.stderr))
        if found is None:
            raise CheckpointError(f"{path}: no valid checkpoint in this folder")
        return found
    return path, checkpoint.load_file(path)


def main(argv=None):
    args = parse_args(argv)
    if importlib.util.find_spec("onnx") is None:
        print("lenet-export: error: needs the onnx package: pip install 'lenet-dist[export]'", file=sys.stderr)
        return 2
    from lenet_dist.nn import onnx_export
    try:
        path, ckpt = _load(args.checkpoint)
        data = onnx_export.to_bytes(ckpt.params, step=ckpt.step,
                                    doc=f"LeNet-5 trained by lenet-dist, step {ckpt.step}, from {path.name}")
        atomic_write(args.output, data)
    except (CheckpointError, OSError, ValueError) as e:
        print(f"lenet-export: error: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} from {path} (step {ckpt.step}): input 'images' float32 (N,28,28) raw 0..255, "
          f"outputs 'logits' and 'probabilities' (N,10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
