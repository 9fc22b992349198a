"""Index the in-flight messages of each device, which the assignment counts per batch.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-04 23:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_smsmessage_device_id_in_flight"


def upgrade() -> None:
    # CONCURRENTLY lets sends and reports write while the index builds. It cannot run in
    # a transaction, and a failed build leaves an invalid index behind, so a retry drops
    # that first.
    with op.get_context().autocommit_block():
        op.drop_index(
            INDEX,
            table_name="smsmessage",
            postgresql_concurrently=True,
            if_exists=True,
        )
        op.create_index(
            INDEX,
            "smsmessage",
            ["device_id"],
            unique=False,
            postgresql_where=sa.text("status IN ('assigned', 'sending')"),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            INDEX,
            table_name="smsmessage",
            postgresql_concurrently=True,
            if_exists=True,
        )
