"""Hub requests that end: a timeout on every request, bounded retries of 5xx, one redacted error line.

``huggingface_hub`` sends most API calls (``create_repo``, ``list_repo_files``, the commit)
through its shared ``httpx2`` client, whose timeout is ``None``: a server that accepts the
connection and never answers holds the call forever. :func:`hub_call` runs one ``HfApi`` call with
that client's timeout set for the call (``Client.timeout``, restored after), retries it on
429 / 5xx answers with exponential back-off, and turns a failure into :class:`HubError`: one line,
passed through :func:`hf_otselect._redact.redact` (a server may echo the ``Authorization``
header), the original error kept out of the chain for the same reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from ._checks import check_float, check_int, param_error
from ._redact import redact

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_RETRIES", "DEFAULT_TIMEOUT_S", "HubError", "hub_call", "resolve_timeout"]

T = TypeVar("T")

# huggingface_hub's own default (HF_HUB_DOWNLOAD_TIMEOUT, 10 s) is sized for a download's first
# byte; a commit is answered only once the Hub has applied it, which takes longer for many files.
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 3
# What huggingface_hub's own http_backoff retries: rate limits and server-side failures.
RETRY_STATUS = (429, 500, 502, 503, 504)
_BACKOFF_S, _BACKOFF_MAX_S = 1.0, 8.0
_TIMEOUT_ENV = "HF_HUB_DOWNLOAD_TIMEOUT"


class HubError(OSError):
    """A Hub request failed (no answer in time, unreachable, or an error status), said in one redacted line."""


def resolve_timeout(timeout: float | None, owner: str) -> float:
    """The seconds each Hub request may wait: ``timeout``, else ``$HF_HUB_DOWNLOAD_TIMEOUT``, else 60.

    ``HF_HUB_DOWNLOAD_TIMEOUT`` is the variable ``huggingface_hub`` reads as its default timeout
    for requests that name none.
    """
    if timeout is None:
        raw = os.environ.get(_TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT_S
        try:
            timeout = float(raw)
        except ValueError:
            raise param_error(_TIMEOUT_ENV, f"{owner} (environment variable)", "a number of seconds > 0", raw) from None
        return check_float(timeout, _TIMEOUT_ENV, f"{owner} (environment variable)", 0.0, low_open=True)
    return check_float(timeout, "timeout", owner, 0.0, low_open=True)


def check_retries(retries: int, owner: str) -> int:
    """``retries`` as an int in [0, 10] (each waits up to 8 s before the next try)."""
    return check_int(retries, "retries", owner, 0, 10)


@contextlib.contextmanager
def _session_timeout(seconds: float) -> Iterator[None]:
    from huggingface_hub.utils import get_session

    session = get_session()
    before = session.timeout
    session.timeout = seconds
    try:
        yield
    finally:
        session.timeout = before


def hub_call(what: str, fn: Callable[[], T], *, endpoint: str, timeout: float, retries: int) -> T:
    """Run ``fn`` (one ``HfApi`` call) with a per-request ``timeout``, retrying 429 / 5xx answers.

    Parameters
    ----------
    what : str
        The step, for messages (``"create_repo"``).
    fn : callable
        The call, without arguments; rerun whole on a retry (our calls are idempotent: the commit
        writes the full content of the repository, so a repeated one changes nothing).
    endpoint : str
        The Hub's address, for messages.
    timeout : float
        Seconds each request may wait to connect, send or receive.
    retries : int
        Tries after the first, for a 429 / 5xx answer only; waits 1, 2, 4, 8, 8... s between.

    Raises
    ------
    HubError
        One line, redacted: the step, the Hub's address, the status and the server's message, or
        the timeout that ran out.
    """
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    for attempt in range(retries + 1):
        try:
            with _session_timeout(timeout):
                return fn()
        except HfHubHTTPError as err:
            status = getattr(getattr(err, "response", None), "status_code", None)
            if status in RETRY_STATUS and attempt < retries:
                wait = min(_BACKOFF_S * 2**attempt, _BACKOFF_MAX_S)
                logger.warning("The Hub answered %s to %s; retrying in %g s (retry %d of %d)", status, what, wait, attempt + 1, retries)
                time.sleep(wait)
                continue
            tries = f" after {attempt + 1} tries" if attempt else ""
            message = " ".join(str(err).split())
            raise HubError(redact(f"The Hub at {endpoint} refused {what}{tries} (HTTP {status}): {message}")) from None
        except httpx2.TimeoutException:
            raise HubError(f"The Hub at {endpoint} did not answer {what} within {timeout:g} s (set a longer timeout "
                           f"with --timeout, timeout= or {_TIMEOUT_ENV} if the Hub is slow).") from None
        except (httpx2.TransportError, OfflineModeIsEnabled) as err:
            detail = " ".join(str(err).split()) or type(err).__name__
            raise HubError(redact(f"The Hub at {endpoint} could not be reached for {what}: {detail}")) from None
    raise AssertionError("unreachable")  # the loop returns or raises
