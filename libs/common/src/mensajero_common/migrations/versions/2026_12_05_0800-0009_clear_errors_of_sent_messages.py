"""Clear the error that sent and delivered messages kept from an earlier failed attempt.

Until now a retried message kept the error of its failed attempt in `smsmessage.error`
after a later attempt sent it. The services now clear it when a new attempt starts or
moves forward. This migration clears the rows written before. Each failed attempt keeps
its error in its `smsmessageattempt` row.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 08:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A `sent` or `delivered` message has no error of its own, because a failure after
    # `sent` ends the message `failed`.
    op.execute(
        """
        UPDATE smsmessage SET error = NULL
        WHERE type = 'outgoing'
          AND status IN ('sent', 'delivered')
          AND error IS NOT NULL
        """
    )


def downgrade() -> None:
    # The cleared values were stale, and each failed attempt's error is still in
    # smsmessageattempt, so nothing is restored.
    pass
