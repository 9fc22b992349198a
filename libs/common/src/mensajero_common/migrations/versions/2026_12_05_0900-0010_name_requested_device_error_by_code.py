"""Store the error of a message whose requested device was deleted as a code.

The dispatcher wrote the sentence `requested device no longer exists`, while every other
error it writes is a code such as `no_report` or `device_deleted`. It now writes
`requested_device_deleted`, and this migration rewrites the rows written before, in
messages and in their attempts.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 09:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SENTENCE = "requested device no longer exists"
_CODE = "requested_device_deleted"


def _rename(old: str, new: str) -> None:
    for table in ("smsmessage", "smsmessageattempt"):
        op.execute(f"UPDATE {table} SET error = '{new}' WHERE error = '{old}'")


def upgrade() -> None:
    _rename(_SENTENCE, _CODE)


def downgrade() -> None:
    _rename(_CODE, _SENTENCE)
