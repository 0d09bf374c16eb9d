"""The one redaction of secrets from every message the package and its CLI print.

A Hub error can repeat what the request carried (a server that echoes the ``Authorization``
header in its error body or its ``X-Error-Message``), and a traceback repeats the error. Every
line the CLI prints (its error line, the ``--verbose`` traceback, every log record of every
library, Python warnings) and every Hub error the library raises passes through :func:`redact`,
which removes:

- the tokens registered with :func:`remember_secret` (the user's token: ``token=`` of
  :func:`hf_otselect.hub.push`, or what ``huggingface_hub.get_token()`` finds for the CLI),
  whatever their form;
- any Hugging Face user access token, ``hf_`` followed by 30 or more letters and digits (the
  Hub issues ``hf_`` + 34), the user's or not;
- the credential after ``Bearer`` (an ``Authorization`` header's value written out).
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from typing import Any

__all__ = ["REDACTED", "install_log_redaction", "redact", "remember_secret"]

REDACTED = "<redacted>"
# The package's own names (hf_otselect, hf_home) are too short to match.
_HF_TOKEN = re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[^\s'\",;}\]]+")
# Shorter strings are no secrets worth the false hits (replacing "a" everywhere).
_MIN_SECRET = 8
_SECRETS: set[str] = set()
_LOCK = threading.Lock()


def remember_secret(secret: str | None) -> None:
    """Register ``secret`` (a token) so that :func:`redact` removes it from every later message."""
    if isinstance(secret, str) and len(secret.strip()) >= _MIN_SECRET:
        with _LOCK:
            _SECRETS.add(secret.strip())


def redact(text: Any) -> str:
    """``str(text)`` with every registered secret, ``hf_`` token and Bearer credential replaced.

    Parameters
    ----------
    text : object
        A message, a traceback, an error (its ``str``).

    Returns
    -------
    str
        The text with each secret replaced by ``<redacted>``.
    """
    text = str(text)
    with _LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)  # a secret inside a longer one goes second
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    text = _HF_TOKEN.sub(REDACTED, text)
    return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)


def install_log_redaction() -> None:
    """Pass every log record of this process, and every Python warning, through :func:`redact`.

    For a program's own entry point (the CLI): it replaces the process's log record factory, so
    records of every logger reach every handler (``huggingface_hub`` has a handler of its own)
    already redacted, their exception text included. ``warnings`` are routed to logging.
    Idempotent.
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_hf_otselect_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed log call must not raise at its call site
            message = f"{record.msg} (arguments {record.args!r})"
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        return record

    factory._hf_otselect_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
    logging.captureWarnings(True)
