"""Record why and when the webhook-sender deactivated a webhook.

Until now a webhook that the sender deactivated, after its endpoint responded with
410 Gone, showed only `is_active = false`, like one that its owner deactivated.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable columns without a default change only the catalog, so the ALTER holds its
    # lock for a moment and rewrites no rows.
    op.add_column(
        "webhookconfig",
        sa.Column("disabled_reason", sa.String(length=32), nullable=True),
    )
    op.add_column(
        "webhookconfig",
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_column("webhookconfig", "disabled_at")
    op.drop_column("webhookconfig", "disabled_reason")
