"""Add bulk send tasks, link messages to them, and index the quota reset date.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 20:24:23.148610
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "smsbulktask",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("requested_device_id", sa.UUID(), nullable=True),
        sa.Column("total_recipients", sa.Integer(), nullable=False),
        sa.Column("message_ids", postgresql.ARRAY(sa.UUID()), nullable=False),
        sa.Column(
            "rejected",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'[]'::jsonb"),
            nullable=False,
        ),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["user.id"],
            name=op.f("fk_smsbulktask_user_id_user"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_smsbulktask")),
    )
    op.create_index(
        op.f("ix_smsbulktask_user_id"), "smsbulktask", ["user_id"], unique=False
    )
    op.create_index(
        "uq_smsbulktask_user_id_idempotency_key",
        "smsbulktask",
        ["user_id", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    # NOT VALID first, then VALIDATE: the scan of existing messages then runs under a lock
    # that lets writers through, instead of blocking every send while it checks.
    op.create_foreign_key(
        op.f("fk_smsmessage_bulk_id_smsbulktask"),
        "smsmessage",
        "smsbulktask",
        ["bulk_id"],
        ["id"],
        ondelete="SET NULL",
        postgresql_not_valid=True,
    )
    op.execute(
        "ALTER TABLE smsmessage VALIDATE CONSTRAINT fk_smsmessage_bulk_id_smsbulktask"
    )
    op.create_index(
        op.f("ix_userquota_last_reset_date"),
        "userquota",
        ["last_reset_date"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_userquota_last_reset_date"), table_name="userquota")
    op.drop_constraint(
        op.f("fk_smsmessage_bulk_id_smsbulktask"), "smsmessage", type_="foreignkey"
    )
    op.drop_index(
        "uq_smsbulktask_user_id_idempotency_key",
        table_name="smsbulktask",
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.drop_index(op.f("ix_smsbulktask_user_id"), table_name="smsbulktask")
    op.drop_table("smsbulktask")
