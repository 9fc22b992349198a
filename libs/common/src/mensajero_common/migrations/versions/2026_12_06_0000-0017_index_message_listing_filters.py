"""Index the message listing's filters by user: status, phone number, and incoming.

The listing's filters were served by indexes of the whole table, or by none, so a filter
that matches few of a user's messages walked that user's whole history. With 2 million
messages of one user, `status=failed` with no failed message read every one of them
(11.5 s), and so did `/incoming` for a user who had received nothing (7 s). A phone
filter read every message of every user to or from that number (160 ms for a user with
500 messages). Each new index starts with user_id and ends with (created_at, id), so a
page is read in order and stops at its limit. The single-column indexes of status and
the numbers, which nothing else reads, go.

Every status change writes a new entry in each index that holds the message, so the new
indexes hold as few messages as they can. Failed and expired messages are few, and the
other statuses are common in a history or have their own indexes (waiting messages), so
only those two are indexed by status. An outgoing message has no sender number until it
is sent, and the incoming index holds only incoming messages, which change little. With
20,000 messages inserted, then assigned, sending, sent and delivered, the five
statements took 2,722 to 3,175 ms, against 2,982 to 3,111 ms before this revision (four
runs each, taking turns). With a full index of status by user instead, they took 3,934
to 4,025 ms, against 3,166 to 3,411 ms.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06 00:00:00
"""

from collections.abc import Sequence

from mensajero_common.migration_ops import (
    concurrent_block,
    create_index_concurrently,
    drop_index_concurrently,
)

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (name, columns, predicate) of each index this revision adds.
NEW_INDEXES = (
    (
        "ix_smsmessage_user_id_status_created_at_id_failed",
        ["user_id", "status", "created_at", "id"],
        "status IN ('failed', 'expired')",
    ),
    (
        "ix_smsmessage_user_id_to_number_created_at_id",
        ["user_id", "to_number", "created_at", "id"],
        None,
    ),
    (
        "ix_smsmessage_user_id_from_number_created_at_id",
        ["user_id", "from_number", "created_at", "id"],
        "from_number IS NOT NULL",
    ),
    (
        "ix_smsmessage_user_id_created_at_id_incoming",
        ["user_id", "created_at", "id"],
        "type = 'incoming'",
    ),
)
# (name, column) of each index this revision drops.
OLD_INDEXES = (
    ("ix_smsmessage_status", "status"),
    ("ix_smsmessage_to_number", "to_number"),
    ("ix_smsmessage_from_number", "from_number"),
)


def upgrade() -> None:
    # The new indexes are built before the old ones go.
    with concurrent_block():
        for name, columns, predicate in NEW_INDEXES:
            create_index_concurrently("smsmessage", name, columns, predicate)
        for name, _ in OLD_INDEXES:
            drop_index_concurrently("smsmessage", name)


def downgrade() -> None:
    with concurrent_block():
        for name, column in OLD_INDEXES:
            create_index_concurrently("smsmessage", name, [column])
        for name, _, _ in NEW_INDEXES:
            drop_index_concurrently("smsmessage", name)
