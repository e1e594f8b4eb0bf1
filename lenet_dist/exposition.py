"""Prometheus' text exposition format (version 0.0.4), written here only: every /metrics of the project (the
evaluator's --health, the dashboard's, the trainer's --metrics-port) renders its families through render(),
so names, escaping and numbers are spelled one way. Standard library only.

    text = render([Family("lenet_trainer_loss", "gauge", "training loss", [({"run": "a"}, 0.31)])])
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BACKSLASH, NEWLINE = "\\", "\n"


@dataclass
class Family:
    """One metric family: its full name (a counter's ends in _total), "counter" or "gauge", its HELP text,
    and its samples as (labels dict, value); a sample whose value is None is left out."""
    name: str
    kind: str
    doc: str
    samples: list = field(default_factory=list)


def _label(value):
    return str(value).replace(BACKSLASH, BACKSLASH * 2).replace(NEWLINE, BACKSLASH + "n").replace('"', BACKSLASH + '"')


def _number(v):
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def render(families):
    """The exposition text (str) of `families` (Family), in order; a family with no sample keeps its HELP
    and TYPE lines, so a scraper knows the name before the figure exists."""
    lines = []
    for f in families:
        assert f.kind in ("counter", "gauge"), f.kind
        assert f.kind != "counter" or f.name.endswith("_total"), f.name
        lines.append(f"# HELP {f.name} {f.doc.replace(BACKSLASH, BACKSLASH * 2).replace(NEWLINE, BACKSLASH + 'n')}")
        lines.append(f"# TYPE {f.name} {f.kind}")
        for labels, value in f.samples:
            if value is None:
                continue
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            lines.append(f"{f.name}{{{text}}} {_number(value)}" if text else f"{f.name} {_number(value)}")
    return "\n".join(lines) + "\n"
