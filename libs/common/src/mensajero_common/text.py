"""Detection of text that a phone would show as empty, and of control characters.

A body made only of whitespace and invisible characters, such as U+200B ZERO WIDTH
SPACE, U+2060 WORD JOINER or U+FEFF ZERO WIDTH NO-BREAK SPACE, would arrive as an SMS
that looks empty. Those characters stay valid inside visible text: an emoji sequence
such as 👩‍💻 joins its parts with U+200D ZERO WIDTH JOINER. Control characters, lone
combining marks and noncharacters count as invisible too.

Control characters, line and paragraph separators and bidirectional controls are removed
from senders and rejected in names. They can break a log line or a terminal, and they can
make a name display as other text: U+202E RIGHT-TO-LEFT OVERRIDE shows "moc.knab" as
"bank.com".
"""

import unicodedata

from pydantic_core import PydanticCustomError

# The Default_Ignorable_Code_Point ranges of the Unicode Character Database
# (DerivedCoreProperties.txt, Unicode 14.0), which Python's unicodedata does not expose:
# format controls, fillers, variation selectors and tags that renderers draw as nothing.
_DEFAULT_IGNORABLE_RANGES = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)

# U+2800 BRAILLE PATTERN BLANK is not default-ignorable, but it shows as an empty cell,
# so a body made of it looks blank too.
_BRAILLE_PATTERN_BLANK = "\u2800"

# General categories that show nothing on their own: control characters (Cc) and marks
# (Mn, Me), which only change the character before them.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Mn", "Me"})

# U+FFF9 to U+FFFB annotate interlinear text and are not drawn. Unlike other format
# characters (Cf), such as U+0600 ARABIC NUMBER SIGN, none of them has a glyph.
_INTERLINEAR_ANNOTATION = range(0xFFF9, 0xFFFC)


def _is_noncharacter(code_point: int) -> bool:
    """Tell whether a code point is one of Unicode's 66 noncharacters."""
    return 0xFDD0 <= code_point <= 0xFDEF or code_point & 0xFFFE == 0xFFFE


def is_invisible(character: str) -> bool:
    """Tell whether a single character is whitespace or shows as nothing."""
    if character.isspace() or character == _BRAILLE_PATTERN_BLANK:
        return True
    if unicodedata.category(character) in _INVISIBLE_CATEGORIES:
        return True
    code_point = ord(character)
    if code_point in _INTERLINEAR_ANNOTATION or _is_noncharacter(code_point):
        return True
    return any(start <= code_point <= end for start, end in _DEFAULT_IGNORABLE_RANGES)


def is_blank(text: str) -> bool:
    """Tell whether `text` is empty or contains only invisible characters."""
    return all(is_invisible(character) for character in text)


# A str.translate table that deletes the control characters (general category Cc:
# U+0000 to U+001F and U+007F to U+009F) and the line and paragraph separators (U+2028,
# U+2029). It also deletes the bidirectional marks (U+061C, U+200E, U+200F), embeddings
# and overrides (U+202A to U+202E) and isolates (U+2066 to U+2069).
_CONTROL_DELETION = dict.fromkeys(
    [
        *range(0x00, 0x20),
        *range(0x7F, 0xA0),
        0x061C,
        0x200E,
        0x200F,
        0x2028,
        0x2029,
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    ]
)


def remove_controls(text: str) -> str:
    """Return `text` without control characters, line and paragraph separators and
    bidirectional controls."""
    return text.translate(_CONTROL_DELETION)


def has_controls(text: str) -> bool:
    """Tell whether `text` contains a control character, a line or paragraph separator or
    a bidirectional control."""
    return any(ord(character) in _CONTROL_DELETION for character in text)


def check_display_name(name: str) -> str:
    """Return a trimmed display name unchanged, or raise PydanticCustomError.

    The error type is `string_blank` for a name that contains only invisible characters
    and `string_contains_control` for one with a character that has_controls finds.
    mensajero_common.validation_messages translates both.
    """
    if is_blank(name):
        raise PydanticCustomError(
            "string_blank", "must contain at least one visible character"
        )
    if has_controls(name):
        raise PydanticCustomError(
            "string_contains_control",
            "must not contain control characters (U+0000 to U+001F, U+007F to U+009F), "
            "line or paragraph separators (U+2028, U+2029) or bidirectional controls "
            "(U+061C, U+200E, U+200F, U+202A to U+202E, U+2066 to U+2069)",
        )
    return name
