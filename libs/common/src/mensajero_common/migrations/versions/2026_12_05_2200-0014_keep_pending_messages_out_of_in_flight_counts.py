"""Keep the index of open messages by update time out of the count of in-flight messages.

The dispatcher counts the in-flight (assigned or sending) messages of every device on
each assignment batch. The partial index ix_smsmessage_device_id_in_flight holds only
those. But the recovery sweep's index ix_smsmessage_updated_at_open holds pending
messages as well, and its predicate also covers the count's. On statistics taken while no
message was open, the planner took the sweep's index for the count and read every
pending message: with 30,000 pending messages behind 150,000 delivered ones, each count
took 4.1 to 4.5 ms, against 0.07 to 0.13 ms on the in-flight index. In a quick run of
`make bench`, these counts read 6 million index entries during the bulk step.

Only outgoing messages are ever open, so adding `type = 'outgoing'` to the sweep index's
predicate leaves its rows as they are. The count does not test the type, so that index no
longer serves it; the sweep does, so it still does.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 22:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_smsmessage_updated_at_open"
# Built beside the old index, which serves the sweep until the new one replaces it.
NEW_INDEX = "ix_smsmessage_updated_at_open_new"
OPEN_PREDICATE = "status IN ('pending', 'assigned', 'sending')"


def _replace_index(predicate: str) -> None:
    # CONCURRENTLY lets sends and reports write while the index builds. It cannot run in
    # a transaction, and a failed build leaves an invalid index behind, so a retry drops
    # that first.
    with op.get_context().autocommit_block():
        op.drop_index(
            NEW_INDEX,
            table_name="smsmessage",
            postgresql_concurrently=True,
            if_exists=True,
        )
        op.create_index(
            NEW_INDEX,
            "smsmessage",
            ["updated_at"],
            unique=False,
            postgresql_concurrently=True,
            postgresql_where=sa.text(predicate),
        )
        op.drop_index(
            INDEX, table_name="smsmessage", postgresql_concurrently=True, if_exists=True
        )
        op.execute(f"ALTER INDEX {NEW_INDEX} RENAME TO {INDEX}")


def upgrade() -> None:
    _replace_index(f"{OPEN_PREDICATE} AND type = 'outgoing'")


def downgrade() -> None:
    _replace_index(OPEN_PREDICATE)
