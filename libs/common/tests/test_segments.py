import pytest

from mensajero_common.segments import count_segments


@pytest.mark.parametrize(
    ("text", "encoding", "segments", "units"),
    [
        ("", "gsm7", 1, 0),
        ("a" * 160, "gsm7", 1, 160),
        ("a" * 161, "gsm7", 2, 161),
        ("a" * 306, "gsm7", 2, 306),
        ("a" * 307, "gsm7", 3, 307),
        ("€" * 80, "gsm7", 1, 160),
        ("€" * 81, "gsm7", 2, 162),
        ("ñÑäöüàé" * 10, "gsm7", 1, 70),
        ("á" * 70, "ucs2", 1, 70),
        ("á" * 71, "ucs2", 2, 71),
        ("á" * 134, "ucs2", 2, 134),
        ("á" * 135, "ucs2", 3, 135),
        ("😀" * 35, "ucs2", 1, 70),
        ("😀" * 36, "ucs2", 2, 72),
    ],
)
def test_count_segments_table(
    text: str, encoding: str, segments: int, units: int
) -> None:
    info = count_segments(text)

    assert info.encoding == encoding
    assert info.segments == segments
    assert info.units == units


def test_count_segments_keeps_escape_pairs_whole() -> None:
    # 152 septets, then a two-septet "€" that would straddle the 153-septet part boundary.
    text = "a" * 152 + "€" + "a" * 10

    info = count_segments(text)

    assert info.units == 164
    assert info.segments == 2


def test_count_segments_escape_pair_moves_to_next_part() -> None:
    # Part one takes 152 septets because "€" (2 septets) does not fit in the last one.
    text = "a" * 152 + "€" + "a" * 152

    assert count_segments(text).segments == 3


def test_count_segments_keeps_surrogate_pairs_whole() -> None:
    # 66 units, then an emoji (2 units) that cannot straddle the 67-unit part boundary.
    text = "á" * 66 + "😀" + "á" * 66

    info = count_segments(text)

    assert info.units == 134
    assert info.segments == 3
