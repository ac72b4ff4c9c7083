"""Secrets out of every text the toolkit records: the one redaction function.

Credentials reach the toolkit in URLs (``http://user:secret@host/v1``, a ``PREFECT_API_URL``) and come back in
server replies (an echoed ``Authorization: Basic ...`` header, an error that repeats the request). Every message,
store row, log line and report that holds a URL or a server's text passes through :func:`redact` first, so a secret
never leaves the process.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
# A shorter value (a user name "me", a one-letter password) would mask ordinary words of the text around it.
MIN_SECRET_CHARS = 4

# scheme://user:password@host or scheme://token@host: everything between "//" and the last "@" before the host's end
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s@]*@)")
# "Authorization: Basic abc", "Bearer abc", "Basic abc", "'authorization': 'Token abc'", "api_key=abc"
_AUTH_VALUE = re.compile(
    r"(?P<name>\b(?:authorization|proxy-authorization|x-api-key|api[-_]?key)\b[\"']?\s*[:=]\s*[\"']?"
    r"(?:(?:basic|bearer|token|digest)\s+)?)(?P<value>[^\s\"',;}]+)",
    re.IGNORECASE,
)
_SCHEME_VALUE = re.compile(r"(?P<name>\b(?:basic|bearer)\s+)(?P<value>[A-Za-z0-9+/=._~-]{6,})", re.IGNORECASE)


def redact(text: str | None, secrets: Iterable[str] = ()) -> str | None:
    """``text`` with URL credentials and authorization values replaced by ``***``; None stays None.

    Redacted: the userinfo of any URL (``http://***@host``), the value after ``Authorization``,
    ``Proxy-Authorization``, ``X-Api-Key`` or ``api_key`` (``:`` or ``=``), any ``Basic``/``Bearer`` credential, and
    every one of ``secrets`` wherever it stands (the key and URL credentials a caller sent, which a server may echo
    in any form: :func:`url_secrets`).
    """
    if text is None:
        return None
    text = mask_secrets(text, secrets)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _AUTH_VALUE.sub(lambda m: f"{m['name']}{MASK}", text)
    return _SCHEME_VALUE.sub(lambda m: f"{m['name']}{MASK}", text)


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every one of ``secrets`` replaced by ``***`` and nothing else changed: for text that is data (a
    caption, where "basic" or "token:" are ordinary words), which only the secrets actually sent must leave."""
    for secret in sorted(secrets, key=len, reverse=True):  # the longest first: a password inside user:password
        if len(secret) >= MIN_SECRET_CHARS:
            text = text.replace(secret, MASK)
    return text


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries a user name or password (``scheme://user:secret@host``)."""
    parts = urlsplit(url)
    return parts.username is not None or parts.password is not None


def strip_credentials(url: str) -> str:
    """``url`` without its userinfo (the form to show, store and log)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def url_secrets(url: str) -> list[str]:
    """What of ``url``'s credentials a server could echo: the password (the user name where a token stands alone,
    ``http://token@host``), ``user:password`` and its Base64 (the Basic header's value). Empty without userinfo."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return []
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    pair = f"{user}:{password}"
    return [password or user, pair, base64.b64encode(pair.encode()).decode()]


def strip_query(url: str) -> str:
    """``url`` without its query string and fragment (which may carry tokens), for a message about it."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
