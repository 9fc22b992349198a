"""Index smsdevice on (user_id, created_at, id) in place of (user_id).

The device listing pages by keyset over (created_at, id) within one user. With only the
user_id index, Postgres reads and sorts every device of the user for each page (up to
999 on the Enterprise plan). The new index returns a page in order and stops after it.
It also serves every lookup by user_id, so the user_id index goes.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 09:50:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_INDEX = "ix_smsdevice_user_id_created_at_id"
OLD_INDEX = "ix_smsdevice_user_id"


def _replace_index(drop: str, create: str, columns: list[str]) -> None:
    # CONCURRENTLY lets registrations and heartbeats write while the index builds. It
    # cannot run in a transaction, and a failed build leaves an invalid index behind,
    # so a retry drops that first. Building before dropping keeps an index on user_id
    # at every moment.
    with op.get_context().autocommit_block():
        op.drop_index(
            create,
            table_name="smsdevice",
            postgresql_concurrently=True,
            if_exists=True,
        )
        op.create_index(
            create,
            "smsdevice",
            columns,
            unique=False,
            postgresql_concurrently=True,
        )
        op.drop_index(
            drop,
            table_name="smsdevice",
            postgresql_concurrently=True,
            if_exists=True,
        )


def upgrade() -> None:
    _replace_index(OLD_INDEX, NEW_INDEX, ["user_id", "created_at", "id"])


def downgrade() -> None:
    _replace_index(NEW_INDEX, OLD_INDEX, ["user_id"])
