"""The one redaction function: credentials in URLs and authorization values never leave the process."""

from __future__ import annotations

import pytest

from manifests.redaction import has_credentials, redact, strip_credentials


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("ConnectError to http://user:s3cret@host:8000/v1 refused", "s3cret"),
        ("https://token-abc123@api.example.com/v1/chat", "token-abc123"),
        ("server said: Authorization: Basic dXNlcjpzM2NyZXQ=", "dXNlcjpzM2NyZXQ="),
        ("{'authorization': 'Bearer sk-live-123456'}", "sk-live-123456"),
        ("echo: Bearer sk-live-123456 was rejected", "sk-live-123456"),
        ("api_key=sk-abcdef0123 invalid", "sk-abcdef0123"),
    ],
)
def test_redact_removes_the_secret_and_keeps_the_rest(text, secret):
    redacted = redact(text)
    assert secret not in redacted and "***" in redacted
    kept = [word for word in text.split() if secret not in word]
    assert all(word in redacted for word in kept)  # only the secret goes


def test_plain_text_and_urls_without_credentials_stay_as_they_are():
    for text in ("HTTP 500 from http://127.0.0.1:8000/v1: internal error", "a road next to buildings", None):
        assert redact(text) == text


def test_urls_with_credentials_are_recognised_and_stripped():
    assert has_credentials("http://user:pw@host/v1") and not has_credentials("http://host/v1")
    assert strip_credentials("http://user:pw@host:8000/v1?x=1") == "http://host:8000/v1?x=1"
    assert strip_credentials("http://[::1]:8000/v1") == "http://[::1]:8000/v1"
