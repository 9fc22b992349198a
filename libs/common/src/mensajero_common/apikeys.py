"""Generation and hashing of API keys."""

import hashlib
import secrets


def generate_api_key(prefix: str) -> str:
    """Return a new key: the prefix and 43 URL-safe characters (256 random bits)."""
    return prefix + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str, length: int = 12) -> str:
    return key[:length]
