"""Add message attempts and part reports, and the retry, expiry and refund columns.

Revision ID: 0004
Revises: 0005
Create Date: 2026-12-04 20:30:29.174340

The revision id is 0004 although it follows 0005, because both were written at once.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "smsmessageattempt",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("message_id", sa.UUID(), nullable=False),
        sa.Column("attempt_number", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.UUID(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("parts", sa.Integer(), nullable=True),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["smsdevice.id"],
            name=op.f("fk_smsmessageattempt_device_id_smsdevice"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["smsmessage.id"],
            name=op.f("fk_smsmessageattempt_message_id_smsmessage"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_smsmessageattempt")),
        sa.UniqueConstraint(
            "message_id",
            "attempt_number",
            name=op.f("uq_smsmessageattempt_message_id_attempt_number"),
        ),
    )
    op.create_index(
        op.f("ix_smsmessageattempt_device_id"),
        "smsmessageattempt",
        ["device_id"],
        unique=False,
    )
    op.create_table(
        "smsmessagepart",
        sa.Column("message_id", sa.UUID(), nullable=False),
        sa.Column("attempt_number", sa.Integer(), nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("parts", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["smsmessage.id"],
            name=op.f("fk_smsmessagepart_message_id_smsmessage"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "message_id", "attempt_number", "part", name=op.f("pk_smsmessagepart")
        ),
    )
    op.add_column(
        "smsmessage",
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column(
        "smsmessage",
        sa.Column("quota_refunded_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index(
        "ix_smsmessage_expires_at_open",
        "smsmessage",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text(
            "expires_at IS NOT NULL AND status IN ('pending', 'assigned')"
        ),
    )
    op.create_index(
        "ix_smsmessage_updated_at_open",
        "smsmessage",
        ["updated_at"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending', 'assigned', 'sending')"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_smsmessage_updated_at_open",
        table_name="smsmessage",
        postgresql_where=sa.text("status IN ('pending', 'assigned', 'sending')"),
    )
    op.drop_index(
        "ix_smsmessage_expires_at_open",
        table_name="smsmessage",
        postgresql_where=sa.text(
            "expires_at IS NOT NULL AND status IN ('pending', 'assigned')"
        ),
    )
    op.drop_column("smsmessage", "quota_refunded_at")
    op.drop_column("smsmessage", "next_attempt_at")
    op.drop_table("smsmessagepart")
    op.drop_index(
        op.f("ix_smsmessageattempt_device_id"), table_name="smsmessageattempt"
    )
    op.drop_table("smsmessageattempt")
