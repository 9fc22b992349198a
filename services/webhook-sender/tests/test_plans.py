"""Statements that take a delivery by id probe the primary key, whatever the statistics.

On statistics taken while no delivery was pending, Postgres chose the index of pending
deliveries for these statements and read every pending delivery on each call, so an
endpoint that went down slowed every claim by its backlog. Each test checks that no
index on the status can serve the statement.
"""

import uuid
from datetime import UTC, datetime

from mensajero_common.testing import status_indexes_usable
from mensajero_webhooks.delivery import repository


async def test_claim_uses_no_status_index(pg_connection) -> None:
    used = await status_indexes_usable(
        pg_connection,
        "webhookdelivery",
        "pk_webhookdelivery",
        repository._CLAIM,
        uuid.uuid4(),
        30.0,
        [uuid.uuid4()],
        [5.0],
        datetime.now(UTC),
        [],
    )

    assert used == set()


async def test_repark_uses_no_status_index(pg_connection) -> None:
    used = await status_indexes_usable(
        pg_connection,
        "webhookdelivery",
        "pk_webhookdelivery",
        repository._REPARK,
        [uuid.uuid4()],
        [datetime.now(UTC)],
        5.0,
    )

    assert used == set()
