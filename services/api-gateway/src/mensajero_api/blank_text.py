"""Detection of text that a phone would show as empty (see mensajero_common.text)."""

from mensajero_common.text import is_blank, is_invisible

__all__ = ["is_blank", "is_invisible"]
