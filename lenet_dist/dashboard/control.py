"""The page's live-control panel, server side (the dashboard process): GET and POST /api/control.

    GET  /api/control     {"available": bool, "run_id", "reason" (why not), "last": the last action's status}
    POST /api/control     {"action": "stop"|"pause"|"resume"|"checkpoint"|"lr_scale", "value": factor}
                          -> 202 {"id": N, "state": "sent"}; the outcome comes back in GET's "last"

A POST goes up to the evaluator (a JSON line on this process's stdout, which the evaluator reads:
process.py), which signs it with its control key and sends it to the shown run's trainer
(evaluation/control.py); the evaluator sends back the status (a "control" frame). The dashboard's token
guards both routes (app.TokenGate); a POST must also come from the page itself: JSON only (a form or a
simple cross-site request cannot send it without a CORS preflight, which nothing here answers), and an
Origin or Sec-Fetch-Site header, when the browser sends one, must name this same origin.
"""
from __future__ import annotations

import json
import threading

from starlette.responses import JSONResponse

from lenet_dist.transport.control import check_action

MAX_BODY = 1024


class Channel:
    """This process's link to the evaluator for control: requests out, the status in."""

    def __init__(self):
        self._lock = threading.Lock()
        self._out = None
        self._id = 0
        self.status = {"available": False, "run_id": None, "reason": "the evaluator has no --control-key-file",
                       "last": None}

    def attach(self, stream):
        """`stream`: a text stream the evaluator reads, one JSON object a line."""
        self._out = stream

    def update(self, status):
        self.status = dict(status)

    def request(self, action, value, who):
        with self._lock:
            self._id += 1
            self._out.write(json.dumps({"kind": "control", "id": self._id, "action": action, "value": value,
                                        "who": who}) + "\n")
            self._out.flush()
            return self._id


channel = Channel()                 # one dashboard process, one evaluator: process.py attaches it


def _same_origin(request):
    """False when the browser says the request comes from another site."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
        return False
    return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")


def _error(status, message):
    return JSONResponse({"error": message, "status": status}, status_code=status)


async def endpoint(request):
    """GET: may the page control the shown run, and how did its last action go; POST: an action."""
    if request.method == "GET":
        return JSONResponse(channel.status)
    if not _same_origin(request):
        return _error(403, "control actions come from the dashboard's own page only")
    if not request.headers.get("content-type", "").startswith("application/json"):
        return _error(415, "control actions are JSON: {\"action\": ..., \"value\": ...}")
    body = await request.body()
    if len(body) > MAX_BODY:
        return _error(413, f"body over {MAX_BODY} bytes")
    try:
        obj = json.loads(body)
        if not isinstance(obj, dict):
            raise ValueError("expected a JSON object")
        action, value = check_action(obj.get("action"), obj.get("value"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        return _error(400, str(e)[:200])
    if not channel.status.get("available") or channel._out is None:
        return _error(409, f"control is not possible for this run: {channel.status.get('reason')}")
    who = request.client.host if request.client else "?"
    n = channel.request(action, value, who)
    return JSONResponse({"id": n, "state": "sent", "action": action, "value": value}, status_code=202)
