"""The README's code must work as printed, in both languages."""

import re
import time
from pathlib import Path
from typing import Any

import pytest

from mensajero_common.webhooks import generate_secret, signature_headers

ROOT = Path(__file__).resolve().parent.parent
SNIPPET = re.compile(
    r"<!-- verify-webhook:start -->\s*```python\n(.*?)```\s*<!-- verify-webhook:end -->",
    re.S,
)


def _snippet_function(readme: str, snippet: re.Pattern[str], name: str) -> Any:
    """Run a README snippet and return the function `name` that it defines."""
    match = snippet.search((ROOT / readme).read_text())
    assert match, f"{readme} lacks the snippet that defines {name}"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), readme, "exec"), namespace)
    return namespace[name]


def _verify_function(readme: str) -> Any:
    return _snippet_function(readme, SNIPPET, "verify_webhook")


@pytest.mark.parametrize("readme", ["README.md", "README.es.md"])
def test_readme_verifier_accepts_signed_request(readme: str) -> None:
    verify_webhook = _verify_function(readme)
    body = '{"body":"Hola <b> & ñ 😀"}'.encode()
    headers = signature_headers("whsec_secret", "evt_1", int(time.time()), body)
    lower = {name.lower(): value for name, value in headers.items()}

    assert verify_webhook("whsec_secret", lower, body)
    assert not verify_webhook("whsec_secret", lower, body + b" ")
    assert not verify_webhook("other-secret", lower, body)


@pytest.mark.parametrize("readme", ["README.md", "README.es.md"])
@pytest.mark.parametrize(
    ("timestamp", "signature"),
    [
        ("²", "sha256=00"),
        ("9" * 5000, "sha256=00"),
        ("", "sha256=00"),
        ("-5", "sha256=00"),
        (None, "sha256=é"),
    ],
)
def test_readme_verifier_rejects_forged_headers(
    readme: str, timestamp: str | None, signature: str
) -> None:
    verify_webhook = _verify_function(readme)
    headers = {
        "x-webhook-timestamp": timestamp
        if timestamp is not None
        else str(int(time.time())),
        "x-webhook-signature": signature,
    }

    assert verify_webhook("whsec_secret", headers, b"{}") is False


@pytest.mark.parametrize("readme", ["README.md", "README.es.md"])
def test_readme_verifier_rejects_stale_timestamp(readme: str) -> None:
    verify_webhook = _verify_function(readme)
    body = b"{}"
    headers = signature_headers("whsec_secret", "evt_1", int(time.time()) - 3600, body)
    lower = {name.lower(): value for name, value in headers.items()}

    assert not verify_webhook("whsec_secret", lower, body)


def test_readmes_show_the_same_code() -> None:
    english = SNIPPET.search((ROOT / "README.md").read_text())
    spanish = SNIPPET.search((ROOT / "README.es.md").read_text())

    assert english and spanish
    assert english.group(1) == spanish.group(1)


STANDARD_SNIPPET = re.compile(
    r"<!-- verify-standard-webhook:start -->\s*```python\n(.*?)```\s*"
    r"<!-- verify-standard-webhook:end -->",
    re.S,
)


def _standard_verify_function(readme: str) -> Any:
    return _snippet_function(readme, STANDARD_SNIPPET, "verify_standard_webhook")


@pytest.mark.parametrize("readme", ["README.md", "README.es.md"])
@pytest.mark.parametrize(
    "secret",
    [generate_secret(), "a secret of the user's own"],
    # Fixed ids, because each pytest-xdist worker generates its own secret.
    ids=["generated", "own"],
)
def test_readme_standard_verifier_accepts_signed_request(
    readme: str, secret: str
) -> None:
    verify = _standard_verify_function(readme)
    body = '{"body":"Hola <b> & ñ 😀"}'.encode()
    headers = signature_headers(secret, "evt_1", int(time.time()), body)
    lower = {name.lower(): value for name, value in headers.items()}

    assert verify(secret, lower, body)
    assert not verify(secret, lower, body + b" ")
    assert not verify(generate_secret(), lower, body)
    assert not verify(secret, {**lower, "webhook-id": "evt_2"}, body)


@pytest.mark.parametrize("readme", ["README.md", "README.es.md"])
def test_readme_standard_verifier_rejects_stale_or_forged(readme: str) -> None:
    verify = _standard_verify_function(readme)
    secret = generate_secret()
    body = b"{}"
    stale = signature_headers(secret, "evt_1", int(time.time()) - 3600, body)
    stale_lower = {name.lower(): value for name, value in stale.items()}
    forged = {
        "webhook-id": "evt_1",
        "webhook-timestamp": "9" * 5000,
        "webhook-signature": "v1,AAAA",
    }

    assert not verify(secret, stale_lower, body)
    assert not verify(secret, forged, body)


def test_readmes_show_the_same_standard_code() -> None:
    english = STANDARD_SNIPPET.search((ROOT / "README.md").read_text())
    spanish = STANDARD_SNIPPET.search((ROOT / "README.es.md").read_text())

    assert english and spanish
    assert english.group(1) == spanish.group(1)
