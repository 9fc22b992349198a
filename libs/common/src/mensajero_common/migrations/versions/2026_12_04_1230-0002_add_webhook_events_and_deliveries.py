"""Add the webhook outbox: events, deliveries and attempts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 20:01:26.350979
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhookevent",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("message_id", sa.UUID(), nullable=True),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["user.id"],
            name=op.f("fk_webhookevent_user_id_user"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhookevent")),
    )
    op.create_index(
        op.f("ix_webhookevent_user_id"), "webhookevent", ["user_id"], unique=False
    )
    op.create_index(
        "uq_webhookevent_message_id_event",
        "webhookevent",
        ["message_id", "event"],
        unique=True,
        postgresql_where=sa.text("message_id IS NOT NULL"),
    )
    op.create_table(
        "webhookdelivery",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("event_id", sa.UUID(), nullable=False),
        sa.Column("webhook_id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column(
            "status", sa.String(length=16), server_default="pending", nullable=False
        ),
        sa.Column(
            "attempts", sa.Integer(), server_default=sa.text("0"), nullable=False
        ),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["webhookevent.id"],
            name=op.f("fk_webhookdelivery_event_id_webhookevent"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["user.id"],
            name=op.f("fk_webhookdelivery_user_id_user"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["webhook_id"],
            ["webhookconfig.id"],
            name=op.f("fk_webhookdelivery_webhook_id_webhookconfig"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhookdelivery")),
        sa.UniqueConstraint(
            "event_id",
            "webhook_id",
            name=op.f("uq_webhookdelivery_event_id_webhook_id"),
        ),
    )
    op.create_index(
        "ix_webhookdelivery_next_attempt_at_pending",
        "webhookdelivery",
        ["next_attempt_at"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        op.f("ix_webhookdelivery_user_id"), "webhookdelivery", ["user_id"], unique=False
    )
    op.create_index(
        "ix_webhookdelivery_webhook_id_created_at",
        "webhookdelivery",
        ["webhook_id", "created_at"],
        unique=False,
    )
    op.create_table(
        "webhookattempt",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("delivery_id", sa.UUID(), nullable=False),
        sa.Column("attempt_number", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("next_retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["webhookdelivery.id"],
            name=op.f("fk_webhookattempt_delivery_id_webhookdelivery"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhookattempt")),
    )
    op.create_index(
        op.f("ix_webhookattempt_delivery_id"),
        "webhookattempt",
        ["delivery_id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_webhookattempt_delivery_id"), table_name="webhookattempt")
    op.drop_table("webhookattempt")
    op.drop_index(
        "ix_webhookdelivery_webhook_id_created_at", table_name="webhookdelivery"
    )
    op.drop_index(op.f("ix_webhookdelivery_user_id"), table_name="webhookdelivery")
    op.drop_index(
        "ix_webhookdelivery_next_attempt_at_pending",
        table_name="webhookdelivery",
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_table("webhookdelivery")
    op.drop_index(
        "uq_webhookevent_message_id_event",
        table_name="webhookevent",
        postgresql_where=sa.text("message_id IS NOT NULL"),
    )
    op.drop_index(op.f("ix_webhookevent_user_id"), table_name="webhookevent")
    op.drop_table("webhookevent")
