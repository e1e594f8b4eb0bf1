"""How a long-running process writes its log lines: plain text for a terminal, or one JSON object per line
for a log collector (journald's, Loki's, Elasticsearch's), each with an ISO 8601 time and its zone:

    {"time": "2026-12-05T03:40:01.250+00:00", "level": "INFO", "process": "evaluator",
     "logger": "lenet.evaluator", "message": "evaluating checkpoints from tcp://127.0.0.1:5555"}

    setup("evaluator", "INFO", "json")      # the entry point's flags decide; the library only logs
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime

FORMATS = ("text", "json")


def iso_time(created):
    """Unix time -> ISO 8601 in the local zone, with the zone's offset, to the millisecond."""
    return datetime.fromtimestamp(created).astimezone().isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    def __init__(self, process):
        super().__init__()
        self.process = process

    def format(self, record):
        out = {"time": iso_time(record.created), "level": record.levelname, "process": self.process,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup(process, level="INFO", fmt="text"):
    """Log to stderr at `level`, every line naming `process` (e.g. "evaluator", "rank 0/2")."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}, expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else
                         logging.Formatter(f"%(asctime)s {process} %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(handlers=[handler], level=level, force=True)
