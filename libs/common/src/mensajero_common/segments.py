"""SMS segment counting, the way phones split a text.

GSM 03.38 (3GPP TS 23.038) texts take 7-bit septets: 160 in a single SMS, 153 in each part
of a concatenated one, because the user data header takes the rest; characters of the
extension table take two septets (an escape and the character) and are never split across
parts. Any other text goes as UCS-2: 70 UTF-16 code units in one SMS, 67 in each part,
and a surrogate pair (an emoji, say) is never split across parts.
"""

from dataclasses import dataclass
from typing import Literal

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")

GSM7_SINGLE_SEPTETS = 160
GSM7_PART_SEPTETS = 153
UCS2_SINGLE_UNITS = 70
UCS2_PART_UNITS = 67

Encoding = Literal["gsm7", "ucs2"]


@dataclass(frozen=True)
class SegmentInfo:
    encoding: Encoding
    segments: int
    # Septets for GSM-7, UTF-16 code units for UCS-2.
    units: int


def is_gsm7(text: str) -> bool:
    return all(char in GSM7_BASIC or char in GSM7_EXTENSION for char in text)


def _char_costs(text: str, encoding: Encoding) -> list[int]:
    if encoding == "gsm7":
        return [2 if char in GSM7_EXTENSION else 1 for char in text]
    # Python strings hold code points, so a character above U+FFFF is one surrogate pair.
    return [2 if ord(char) > 0xFFFF else 1 for char in text]


def _count_parts(costs: list[int], part_capacity: int) -> int:
    parts = 1
    used = 0
    for cost in costs:
        if used + cost > part_capacity:
            parts += 1
            used = 0
        used += cost
    return parts


def count_segments(text: str) -> SegmentInfo:
    """Count the SMS parts that `text` takes, and the encoding a phone would use for it."""
    encoding: Encoding = "gsm7" if is_gsm7(text) else "ucs2"
    costs = _char_costs(text, encoding)
    units = sum(costs)
    single, part = (
        (GSM7_SINGLE_SEPTETS, GSM7_PART_SEPTETS)
        if encoding == "gsm7"
        else (UCS2_SINGLE_UNITS, UCS2_PART_UNITS)
    )
    if units <= single:
        return SegmentInfo(encoding=encoding, segments=1, units=units)
    return SegmentInfo(
        encoding=encoding, segments=_count_parts(costs, part), units=units
    )
