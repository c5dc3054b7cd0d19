"""Credentials never leave the process: one function for every URI msprior writes or prints.

A tracking URI may carry a secret (`http://user:token@host`, `https://host/?token=...`): it is
needed to talk to the server, but `run.json`, `sweep.json`, the `.ts` metadata (shipped inside every
nn~ model), registry artifacts and printed hints get `redact_uri(uri)`: the same URI without its
user-info and without query parameters whose names look secret. Secrets belong in the environment
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN, or
MLFLOW_TRACKING_URI itself); `with_credentials` finds them again for a recorded, redacted URI.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional
from urllib.parse import parse_qsl, urlencode

# scheme://[userinfo@]rest  (userinfo may hold ':' and even '@'-free tokens; it ends at the last '@'
# before the first '/', '?' or '#')
_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<auth>[^/?#]*@)?(?P<rest>.*)$", re.S)
# query parameter names that carry secrets (token, access_token, password, X-Amz-Signature, sig, ...)
_SECRET_KEY = re.compile(r"token|secret|passw|pwd|key|sig|credential|auth|session", re.I)
# a URI inside free text (a printed hint, a message): up to the next blank, quote or parenthesis
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()]+")


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


def redact_text(text: str) -> str:
    """Every URI inside `text` redacted (for printed lines and messages)."""
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


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
