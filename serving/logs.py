"""The server's log lines: each one written while a request runs carries that request's id (the
``x-request-id`` of its response, its ledger row's id), and ``server.log_format: json`` writes one JSON
object per line, uvicorn's own lines included, for log pipelines.

:class:`~serving.app.RequestIdMiddleware` sets :data:`current_request_id` for the request's task; the
engine's and the providers' warnings logged on that task (a tier failing, a breaker opening) inherit it.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from contextvars import ContextVar

#: the id of the HTTP request being served on this task (None outside a request)
current_request_id: ContextVar[str | None] = ContextVar("cascade_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Puts the current request's id on every record (``record.request_id``, and ``record.request`` as
    `` [id]`` or "" for the text format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = current_request_id.get()
        record.request_id = rid
        record.request = f" [{rid}]" if rid else ""
        return True


#: a request target's query parameter that carries a credential (``?api_key=``, ``?key=``, ``?access_token=``...):
#: clients that send their key there (as Azure's and Google's APIs take it) have it written to every access line.
#: The name ends with the credential's word: one that only holds it (``max_tokens``, ``author``, ``design``) is
#: kept, as what it says is what an operator reads the line for
_QUERY_SECRET = re.compile(r"([?&](?:[A-Za-z0-9_.\-]*(?:key|token|secret|password|passwd|auth|authorization|"
                           r"credentials?|signature|sig))=)[^&#\s\"]+", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """``text`` with what may be a credential blanked: a URL's password, a credential-named query parameter's
    value, and anything shaped like an API key (this server's own ``sk-casc-`` keys among them)."""
    from cascade.resilience import SECRET, URL_PASSWORD

    if "@" in text and "://" in text:
        text = URL_PASSWORD.sub(r"\1***@", text)
    if "=" in text:
        text = _QUERY_SECRET.sub(r"\1***", text)
    return SECRET.sub("***", text)


#: the characters a terminal or a log pipeline acts on rather than shows: C0 controls but the tab (a line break
#: starts a line that looks like the server's, an ANSI escape colours, moves or erases what is on the screen),
#: DEL, C1 controls (``\x9b`` is a CSI to some terminals) and Unicode's line and paragraph separators
_CONTROLS = {c: chr(c).encode("unicode_escape").decode("ascii")
             for c in (*range(0x09), *range(0x0a, 0x20), *range(0x7f, 0xa0), 0x2028, 0x2029)}


def escape_controls(text: str) -> str:
    """``text`` with its control characters written as escapes (``\\n``, ``\\x1b``), so that what a client or an
    upstream put in a line is read in it and stays one line."""
    return text.translate(_CONTROLS)


class _LineFilter(logging.Filter):
    """Rewrites a line's text with :meth:`clean` where that changes it.

    The line keeps its arguments, each cleaned, where that cleans it as well: uvicorn's access lines are
    formatted from their five arguments, and one left without them was a ``--- Logging error ---`` traceback
    in its place (any client could cause one, with such a URL in its request's target)."""

    @staticmethod
    def clean(text: str) -> str:
        raise NotImplementedError

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        cleaned = self.clean(msg)
        if cleaned != msg:
            args = record.args
            if isinstance(args, tuple) and args and isinstance(record.msg, str):
                fmt = self.clean(record.msg)
                args = tuple(self.clean(a) if isinstance(a, str) else a for a in args)
                try:
                    kept = fmt % args == cleaned
                except (TypeError, ValueError):  # the cleaning took a placeholder of the format's
                    kept = False
                if kept:
                    record.msg, record.args = fmt, args
                    return True
            record.msg, record.args = cleaned, ()
        return True


class SecretFilter(_LineFilter):
    """Masks what may be a credential in a line (:func:`mask_secrets`): httpx logs every upstream call's URL, and
    a tier's ``base_url`` may carry basic credentials there; uvicorn logs every request's target with its query,
    where a client may have put its key (``GET /v1/models?api_key=sk-...``): answered 401, and until now the key
    was in the logs for anyone who reads them. Keys are never logged (README, "API keys")."""

    clean = staticmethod(mask_secrets)


class ControlCharFilter(_LineFilter):
    """Escapes the control characters of a line (:func:`escape_controls`): a line quotes text others wrote (an
    upstream's error message, logged with the request it failed), and an ANSI escape there coloured the operator's
    terminal or moved its cursor and erased lines, a line break started a line of their own. A traceback under the
    line is left as it is."""

    clean = staticmethod(escape_controls)


class RepeatedWarningFilter(logging.Filter):
    """Lets a line uvicorn writes for any malformed request ("Invalid HTTP request received.", no request id:
    the bytes never made one) through once a minute, with how many were held back since: any client could
    otherwise write a warning per garbage request it sends."""

    MESSAGE = "Invalid HTTP request received."

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: float | None = None
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != self.MESSAGE:
            return True
        now = time.monotonic()
        if self._last is not None and now - self._last < self.every_s:
            self._held += 1
            return False
        if self._held:
            record.msg, record.args = f"{self.MESSAGE} ({self._held} more since the last such line)", ()
        self._last, self._held = now, 0
        return True


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT` with the time in UTC, ISO 8601 with milliseconds (``2026-12-07T19:22:10.101Z``): the
    clock the ledger's days, the daily spend limits and the JSON lines use, whatever the server's time zone."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``,
    ``message``, ``request_id`` when the line belongs to a request, ``exception`` with its traceback."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level`` (a name such as "info"), in ``fmt`` ("text" or "json"), with request ids."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.addFilter(SecretFilter())
    handler.addFilter(ControlCharFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    uvicorn_error = logging.getLogger("uvicorn.error")  # (a filter of the logger: in json mode and text mode alike)
    if not any(isinstance(f, RepeatedWarningFilter) for f in uvicorn_error.filters):
        uvicorn_error.addFilter(RepeatedWarningFilter())
    logging.captureWarnings(fmt == "json")  # Python warnings (a library's deprecation) as log lines too


def uvicorn_log_config() -> dict:
    """uvicorn's own logging config (its colours and ``INFO:`` level prefix) with the request id added: its
    handlers carry :class:`RequestIdFilter` and its lines end with `` [id]`` when written for a request, e.g.
    ``INFO:     127.0.0.1:44898 - "POST /v1/chat/completions HTTP/1.1" 200 OK [casc-…]``."""
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg.setdefault("filters", {})["request_id"] = {"()": "serving.logs.RequestIdFilter"}
    cfg["filters"]["secrets"] = {"()": "serving.logs.SecretFilter"}
    cfg["filters"]["controls"] = {"()": "serving.logs.ControlCharFilter"}
    for name in ("default", "access"):
        cfg["handlers"][name].setdefault("filters", []).extend(["request_id", "secrets", "controls"])
        cfg["formatters"][name]["fmt"] += "%(request)s"
    return cfg


__all__ = ["ControlCharFilter", "JsonFormatter", "RepeatedWarningFilter", "RequestIdFilter", "SecretFilter",
           "TextFormatter", "configure_logging", "current_request_id", "escape_controls", "mask_secrets",
           "uvicorn_log_config"]
