"""Credentials never leave the process: one function for every URI msprior writes or prints.

A tracking URI may carry a secret (`http://user:token@host`, `https://host/?token=...`): it is
needed to talk to the server, but `run.json`, `sweep.json`, the `.ts` metadata (shipped inside every
nn~ model), registry artifacts and printed hints get `redact_uri(uri)`: the same URI without its
user-info and without query parameters whose names look secret. Secrets belong in the environment
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN, or
MLFLOW_TRACKING_URI itself); `with_credentials` finds them again for a recorded, redacted URI.

Free text (error messages, log records, Tune results) goes through `redact_text`: URIs redacted and
the values of secret-named environment variables (AWS_SECRET_ACCESS_KEY, *_TOKEN, *_PASSWORD, ...)
masked. `RedactFilter` does it for log records, `RedactedError` carries a redacted message across
a Ray boundary (Tune writes a trial's error into error.txt and its results).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Optional
from urllib.parse import parse_qsl, urlencode

# scheme://[userinfo@]rest  (userinfo may hold ':' and even '@'-free tokens; it ends at the last '@'
# before the first '/', '?' or '#')
_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<auth>[^/?#]*@)?(?P<rest>.*)$", re.S)
# query parameter names that carry secrets (token, access_token, password, X-Amz-Signature, sig, ...)
_SECRET_KEY = re.compile(r"token|secret|passw|pwd|key|sig|credential|auth|session", re.I)
# a URI inside free text (a printed hint, a message): up to the next blank, quote or parenthesis
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()]+")
# environment variables whose values are secrets wherever they appear in text
_SECRET_ENV = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|ACCESS_KEY)$", re.I)
_URI_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
MASK = "***"
_MIN_SECRET = 6  # shorter values would mask ordinary words


def redact_uri(uri: Any) -> Any:
    """`uri` without user-info and secret query parameters; anything else is returned unchanged."""
    if not isinstance(uri, str):
        return uri
    m = _URI.match(uri)
    if not m:
        return uri
    rest = m.group("rest")
    head, sep, query = rest.partition("?")
    if sep:
        query, hash_, fragment = query.partition("#")
        pairs = parse_qsl(query, keep_blank_values=True)
        kept = [(k, v) for k, v in pairs if not _SECRET_KEY.search(k)]
        if len(kept) != len(pairs):
            query = urlencode(kept)
        rest = head + ("?" + query if query else "") + hash_ + fragment
    if not m.group("auth") and rest == m.group("rest"):
        return uri  # nothing secret: byte for byte the same (sqlite:////abs stays as it is)
    return m.group("scheme") + rest


def _secret_values() -> list:
    """Secrets this process holds: secret-named variables and the user-info of URI variables."""
    values = [v for k, v in os.environ.items() if _SECRET_ENV.search(k)]
    for k in _URI_ENV:
        m = _URI.match(os.environ.get(k, ""))
        if m and m.group("auth"):
            values.append(m.group("auth")[:-1].split(":", 1)[-1])  # password of user:password@, or a token@
    return sorted({v for v in values if len(v) >= _MIN_SECRET}, key=len, reverse=True)


def redact_text(text: str) -> str:
    """Every URI inside `text` redacted and every secret of the environment masked (for printed
    lines, messages, log records and results)."""
    text = _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)
    for secret in _secret_values():
        text = text.replace(secret, MASK)
    return text


class RedactedError(RuntimeError):
    """An error whose message was redacted: raised in place of the original where text leaves the
    process (a Tune trial's error lands in error.txt, results and the driver's log)."""

    @classmethod
    def of(cls, e: BaseException) -> "RedactedError":
        return cls(redact_text(f"{type(e).__name__}: {e}"))


class RedactFilter(logging.Filter):
    """A logging filter that redacts each record's message and traceback (`install_log_redaction`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact_text(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


_FILTER = RedactFilter()
LOGGERS = ("", "msprior", "ray", "mlflow", "ray.tune", "ray.train", "ray.data")


def _excepthook(kind, value, tb) -> None:
    """An uncaught exception's traceback, redacted, on stderr (Python's own hook prints it raw)."""
    import traceback

    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, value, tb))))


def install_log_redaction(names=LOGGERS) -> None:
    """Put `RedactFilter` on our loggers and Ray's and MLflow's, and on every handler they have
    now (a logger's own filters skip records of its children; its handlers' filters see them);
    an uncaught exception's traceback is printed redacted too."""
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _excepthook
    handlers = [logging.lastResort] if logging.lastResort else []
    for name in names:
        logger = logging.getLogger(name)
        handlers += logger.handlers
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for h in handlers:
        if _FILTER not in h.filters:
            h.addFilter(_FILTER)


def with_credentials(recorded: Optional[str]) -> Optional[str]:
    """A recorded (redacted) URI, with its credentials back when MLFLOW_TRACKING_URI names the same
    server with credentials; else `recorded` as it is (MLflow then reads MLFLOW_TRACKING_USERNAME/...)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if recorded and env and env != recorded and redact_uri(env) == recorded:
        return env
    return recorded


def hide_printed_credentials(uri: Optional[str]) -> None:
    """MLflow prints "View run <name> at: <tracking URI>/..." after each run of an http(s) store:
    when `uri` carries credentials, turn that print off in this process (MLflow reads the variable
    at each print; every process that makes a client calls this, Ray workers included)."""
    if uri and redact_uri(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
