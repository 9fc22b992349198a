"""Drop the smsmessage indexes that no query needs: type, webhook_sent and created_at.

Every message INSERT and status change writes each index of the table, so an index that
no plan chooses only slows sends and reports down.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 05:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Index name and column of each dropped index.
INDEXES = {
    "ix_smsmessage_type": "type",
    "ix_smsmessage_webhook_sent": "webhook_sent",
    "ix_smsmessage_created_at": "created_at",
}


def upgrade() -> None:
    # CONCURRENTLY waits for running transactions instead of taking a lock that blocks
    # every send and report. It cannot run in a transaction.
    with op.get_context().autocommit_block():
        for name in INDEXES:
            op.drop_index(
                name,
                table_name="smsmessage",
                postgresql_concurrently=True,
                if_exists=True,
            )


def downgrade() -> None:
    # A failed concurrent build leaves an invalid index behind, so a retry drops it first.
    with op.get_context().autocommit_block():
        for name, column in INDEXES.items():
            op.drop_index(
                name,
                table_name="smsmessage",
                postgresql_concurrently=True,
                if_exists=True,
            )
            op.create_index(
                name,
                "smsmessage",
                [column],
                unique=False,
                postgresql_concurrently=True,
            )
