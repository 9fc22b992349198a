"""Index messages by device and creation, in place of the index of device_id alone.

The listing's `device_id` filter found a device's messages through the index of
device_id alone, then sorted all of them to return one page, or walked the user's whole
history by creation when the generic plan chose the user's index. With 2 million
messages of one user, the generic plan of that filter took 700 ms. Indexed by
(device_id, created_at, id), a page of one device is read in order and stops at its
limit. The new index also serves everything the old one did: the foreign key's SET NULL
when a device is deleted, and lookups of a device's messages.

Its entries are wider, but with 20,000 messages inserted, then assigned, sending, sent
and delivered, the five statements took 1,322 to 3,443 ms, against 1,911 to 3,179 ms
before this revision (six runs each, taking turns, on a busy machine): no difference
that the noise let us see.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06 02:00:00
"""

from collections.abc import Sequence

from mensajero_common.migration_ops import (
    concurrent_block,
    create_index_concurrently,
    drop_index_concurrently,
)

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_INDEX = "ix_smsmessage_device_id_created_at_id"
OLD_INDEX = "ix_smsmessage_device_id"


def upgrade() -> None:
    # The new index is built before the old one goes.
    with concurrent_block():
        create_index_concurrently(
            "smsmessage", NEW_INDEX, ["device_id", "created_at", "id"]
        )
        drop_index_concurrently("smsmessage", OLD_INDEX)


def downgrade() -> None:
    with concurrent_block():
        create_index_concurrently("smsmessage", OLD_INDEX, ["device_id"])
        drop_index_concurrently("smsmessage", NEW_INDEX)
