"""Create the core tables and seed the four plans.

Revision ID: 0001
Revises:
Create Date: 2026-12-04 19:57:55.030664
"""

import uuid
from collections.abc import Sequence
from decimal import Decimal

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Limits of the predefined plans; prices are the specification's examples, in USD.
PLANS = [
    {
        "code": "free",
        "name": "Free",
        "max_sms_per_month": 50,
        "max_devices": 1,
        "price": "0.00",
    },
    {
        "code": "basic",
        "name": "Basic",
        "max_sms_per_month": 500,
        "max_devices": 3,
        "price": "9.99",
    },
    {
        "code": "pro",
        "name": "Pro",
        "max_sms_per_month": 5000,
        "max_devices": 10,
        "price": "29.99",
    },
    {
        "code": "enterprise",
        "name": "Enterprise",
        "max_sms_per_month": 999999,
        "max_devices": 999,
        "price": "99.99",
    },
]


def _seed_plans() -> None:
    plans = sa.table(
        "userplan",
        sa.column("id", sa.UUID()),
        sa.column("code", sa.String()),
        sa.column("name", sa.String()),
        sa.column("max_sms_per_month", sa.Integer()),
        sa.column("max_devices", sa.Integer()),
        sa.column("price", sa.Numeric(10, 2)),
    )
    op.bulk_insert(
        plans,
        [
            {"id": uuid.uuid4(), **plan, "price": Decimal(str(plan["price"]))}
            for plan in PLANS
        ],
    )


def upgrade() -> None:
    op.create_table(
        "user",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("email", sa.String(length=255), nullable=False),
        sa.Column("hashed_password", sa.String(length=255), nullable=False),
        sa.Column("full_name", sa.String(length=255), nullable=True),
        sa.Column(
            "is_active", sa.Boolean(), server_default=sa.text("true"), nullable=False
        ),
        sa.Column(
            "is_superuser",
            sa.Boolean(),
            server_default=sa.text("false"),
            nullable=False,
        ),
        sa.Column("default_region", sa.String(length=2), nullable=True),
        sa.Column(
            "token_version", sa.Integer(), server_default=sa.text("0"), nullable=False
        ),
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
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user")),
    )
    op.create_index(
        "uq_user_email_lower", "user", [sa.literal_column("lower(email)")], unique=True
    )
    op.create_table(
        "userplan",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("code", sa.String(length=50), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("max_sms_per_month", sa.Integer(), nullable=False),
        sa.Column("max_devices", sa.Integer(), nullable=False),
        sa.Column("price", sa.Numeric(precision=10, scale=2), nullable=False),
        sa.Column(
            "is_active", sa.Boolean(), server_default=sa.text("true"), nullable=False
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_userplan")),
        sa.UniqueConstraint("code", name=op.f("uq_userplan_code")),
        sa.UniqueConstraint("name", name=op.f("uq_userplan_name")),
    )
    op.create_table(
        "smsdevice",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("phone_number", sa.String(length=32), nullable=True),
        sa.Column("api_key_hash", sa.String(length=64), nullable=False),
        sa.Column("api_key_prefix", sa.String(length=16), nullable=False),
        sa.Column("api_key_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "status", sa.String(length=16), server_default="registered", nullable=False
        ),
        sa.Column(
            "is_active", sa.Boolean(), server_default=sa.text("true"), nullable=False
        ),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), nullable=True),
        sa.Column("app_version", sa.String(length=64), nullable=True),
        sa.Column("protocol_version", sa.Integer(), nullable=True),
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
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["user.id"],
            name=op.f("fk_smsdevice_user_id_user"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_smsdevice")),
        sa.UniqueConstraint("api_key_hash", name=op.f("uq_smsdevice_api_key_hash")),
    )
    op.create_index(op.f("ix_smsdevice_status"), "smsdevice", ["status"], unique=False)
    op.create_index(
        op.f("ix_smsdevice_user_id"), "smsdevice", ["user_id"], unique=False
    )
    op.create_table(
        "userquota",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("plan_id", sa.UUID(), nullable=False),
        sa.Column(
            "sms_sent_this_month",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
        ),
        sa.Column(
            "devices_registered",
            sa.Integer(),
            server_default=sa.text("0"),
            nullable=False,
        ),
        sa.Column(
            "last_reset_date",
            sa.Date(),
            server_default=sa.text("CURRENT_DATE"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["plan_id"], ["userplan.id"], name=op.f("fk_userquota_plan_id_userplan")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["user.id"],
            name=op.f("fk_userquota_user_id_user"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_userquota")),
        sa.UniqueConstraint("user_id", name=op.f("uq_userquota_user_id")),
    )
    op.create_index(
        op.f("ix_userquota_plan_id"), "userquota", ["plan_id"], unique=False
    )
    op.create_table(
        "webhookconfig",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("secret_key", sa.String(length=255), nullable=False),
        sa.Column("events", postgresql.ARRAY(sa.String(length=32)), nullable=False),
        sa.Column(
            "is_active", sa.Boolean(), server_default=sa.text("true"), nullable=False
        ),
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
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["user.id"],
            name=op.f("fk_webhookconfig_user_id_user"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhookconfig")),
    )
    op.create_index(
        op.f("ix_webhookconfig_user_id"), "webhookconfig", ["user_id"], unique=False
    )
    op.create_table(
        "smsmessage",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("device_id", sa.UUID(), nullable=True),
        sa.Column("requested_device_id", sa.UUID(), nullable=True),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("to_number", sa.String(length=32), nullable=True),
        sa.Column("from_number", sa.String(length=32), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column(
            "segments", sa.Integer(), server_default=sa.text("1"), nullable=False
        ),
        sa.Column(
            "encoding", sa.String(length=8), server_default="gsm7", nullable=False
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "attempts", sa.Integer(), server_default=sa.text("0"), nullable=False
        ),
        sa.Column(
            "webhook_sent",
            sa.Boolean(),
            server_default=sa.text("false"),
            nullable=False,
        ),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("bulk_id", sa.UUID(), nullable=True),
        sa.Column("external_id", sa.String(length=128), nullable=True),
        sa.Column(
            "meta",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
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
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sending_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["smsdevice.id"],
            name=op.f("fk_smsmessage_device_id_smsdevice"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["user.id"],
            name=op.f("fk_smsmessage_user_id_user"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_smsmessage")),
    )
    op.create_index(
        op.f("ix_smsmessage_bulk_id"), "smsmessage", ["bulk_id"], unique=False
    )
    op.create_index(
        "ix_smsmessage_created_at", "smsmessage", ["created_at"], unique=False
    )
    op.create_index(
        op.f("ix_smsmessage_device_id"), "smsmessage", ["device_id"], unique=False
    )
    op.create_index(
        op.f("ix_smsmessage_from_number"), "smsmessage", ["from_number"], unique=False
    )
    op.create_index(
        op.f("ix_smsmessage_status"), "smsmessage", ["status"], unique=False
    )
    op.create_index(
        op.f("ix_smsmessage_to_number"), "smsmessage", ["to_number"], unique=False
    )
    op.create_index(op.f("ix_smsmessage_type"), "smsmessage", ["type"], unique=False)
    op.create_index(
        op.f("ix_smsmessage_user_id"), "smsmessage", ["user_id"], unique=False
    )
    op.create_index(
        "ix_smsmessage_user_id_created_at_id",
        "smsmessage",
        ["user_id", "created_at", "id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_smsmessage_webhook_sent"), "smsmessage", ["webhook_sent"], unique=False
    )
    op.create_index(
        "uq_smsmessage_device_id_external_id",
        "smsmessage",
        ["device_id", "external_id"],
        unique=True,
        postgresql_where=sa.text("external_id IS NOT NULL"),
    )
    op.create_index(
        "uq_smsmessage_user_id_idempotency_key",
        "smsmessage",
        ["user_id", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )

    _seed_plans()


def downgrade() -> None:
    op.drop_index(
        "uq_smsmessage_user_id_idempotency_key",
        table_name="smsmessage",
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.drop_index(
        "uq_smsmessage_device_id_external_id",
        table_name="smsmessage",
        postgresql_where=sa.text("external_id IS NOT NULL"),
    )
    op.drop_index(op.f("ix_smsmessage_webhook_sent"), table_name="smsmessage")
    op.drop_index("ix_smsmessage_user_id_created_at_id", table_name="smsmessage")
    op.drop_index(op.f("ix_smsmessage_user_id"), table_name="smsmessage")
    op.drop_index(op.f("ix_smsmessage_type"), table_name="smsmessage")
    op.drop_index(op.f("ix_smsmessage_to_number"), table_name="smsmessage")
    op.drop_index(op.f("ix_smsmessage_status"), table_name="smsmessage")
    op.drop_index(op.f("ix_smsmessage_from_number"), table_name="smsmessage")
    op.drop_index(op.f("ix_smsmessage_device_id"), table_name="smsmessage")
    op.drop_index("ix_smsmessage_created_at", table_name="smsmessage")
    op.drop_index(op.f("ix_smsmessage_bulk_id"), table_name="smsmessage")
    op.drop_table("smsmessage")
    op.drop_index(op.f("ix_webhookconfig_user_id"), table_name="webhookconfig")
    op.drop_table("webhookconfig")
    op.drop_index(op.f("ix_userquota_plan_id"), table_name="userquota")
    op.drop_table("userquota")
    op.drop_index(op.f("ix_smsdevice_user_id"), table_name="smsdevice")
    op.drop_index(op.f("ix_smsdevice_status"), table_name="smsdevice")
    op.drop_table("smsdevice")
    op.drop_table("userplan")
    op.drop_index("uq_user_email_lower", table_name="user")
    op.drop_table("user")
