"""Index the pending and assigned messages of each user on (user_id, created_at, id).

Two dispatcher statements look for a user's waiting messages: the check, on each batch of
devices that come online, of whether their users have any, and the read of a user's
pending messages for a device that came online, oldest first. When a backlog makes the
planner expect many waiting messages, both go through the user's index of all messages and
skip the delivered ones: with 150,000 delivered and 30,000 pending messages, the check
took 397 ms for 40 devices and the read 17.9 ms for a page of 50. The partial index holds
only the waiting messages, in the order of that read: 0.26 and 0.21 ms.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_smsmessage_user_id_created_at_id_waiting"


def _drop_index() -> None:
    op.drop_index(
        INDEX, table_name="smsmessage", postgresql_concurrently=True, if_exists=True
    )


def upgrade() -> None:
    # CONCURRENTLY lets sends and reports write while the index builds. It cannot run in
    # a transaction, and a failed build leaves an invalid index behind, so a retry drops
    # that first.
    with op.get_context().autocommit_block():
        _drop_index()
        op.create_index(
            INDEX,
            "smsmessage",
            ["user_id", "created_at", "id"],
            unique=False,
            postgresql_concurrently=True,
            postgresql_where=sa.text("status IN ('pending', 'assigned')"),
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        _drop_index()
