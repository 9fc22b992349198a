"""String types for request fields that end up in Postgres columns."""

import re
from typing import Annotated

from pydantic import AfterValidator, StringConstraints

_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(value: str) -> bool:
    return _SURROGATE.search(value) is not None


def is_storable(value: str) -> bool:
    """Tell whether Postgres can store `value` as UTF-8 text."""
    return "\x00" not in value and not _has_surrogate(value)


def _reject_unstorable_characters(value: str) -> str:
    # Postgres text cannot hold NUL, and a lone UTF-16 surrogate (valid in a JSON string
    # escape) cannot be encoded as UTF-8; either would fail in the database as a 500.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character")
    if _has_surrogate(value):
        raise ValueError("must not contain unpaired UTF-16 surrogates")
    return value


_storable = AfterValidator(_reject_unstorable_characters)

StorableStr = Annotated[str, _storable]
"""A string that Postgres can store as UTF-8 text."""

Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=255),
    _storable,
]
"""A display name: trimmed, 1 to 255 characters (the column size)."""

Password = Annotated[str, StringConstraints(min_length=8, max_length=128), _storable]
"""A password of 8 to 128 characters."""
