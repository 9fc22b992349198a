"""Let only the recovery sweep use the index of open messages by update time.

The partial index ix_smsmessage_updated_at_open holds every pending, assigned and sending
message, for the recovery sweep. Its predicate also covers other statements: the
dispatcher's count of in-flight messages per device, run on each assignment batch, and
its check of whether a user has waiting messages. On statistics taken while no message
was open, the planner took this index for both and read every open message of every
user. With 30,000 pending messages behind 150,000 delivered ones, each count took 4.1 to
4.5 ms, against 0.07 to 0.13 ms on the in-flight index, and each check 8.8 ms. In a quick
run of `make bench`, they read 6 million index entries.

Only outgoing messages are ever open, so adding `(type || '') = 'outgoing'` to the
predicate leaves the index's rows as they are. No other statement tests the type that
way, so no other one can use the index.

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
    _replace_index(f"{OPEN_PREDICATE} AND (type || '') = 'outgoing'")


def downgrade() -> None:
    _replace_index(OPEN_PREDICATE)
