"""The one redaction function: credentials in URLs and authorization values never leave the process."""

from __future__ import annotations

import base64

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


def test_the_secrets_a_url_sends_are_masked_in_every_form_and_data_keeps_its_words():
    from manifests.redaction import mask_secrets, url_secrets

    secrets = url_secrets("http://user:s%40cret@host/v1")
    assert secrets == ["s@cret", "user:s@cret", base64.b64encode(b"user:s@cret").decode()]
    echoed = f"got user:s@cret as {secrets[2]} (raw s@cret)"
    assert redact(echoed, secrets) == "got *** as *** (raw ***)"
    assert url_secrets("http://host/v1") == []
    assert url_secrets("http://tok3n@host/v1") == ["tok3n", "tok3n:", base64.b64encode(b"tok3n:").decode()]
    # a caption is data: only the secrets sent are masked, "basic training" and "token: 3" stay
    assert mask_secrets("basic training ground, token: 3, s@cret", secrets) == "basic training ground, token: 3, ***"
