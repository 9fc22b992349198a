from alembic import command
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from mensajero_common.migrate import alembic_config


def test_migrations_match_models(database_url: str) -> None:
    command.check(alembic_config(database_url))


async def test_migrations_seed_four_plans(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                text(
                    "SELECT code, max_sms_per_month, max_devices, price FROM userplan ORDER BY price"
                )
            )
        ).all()

    assert [
        (row.code, row.max_sms_per_month, row.max_devices, str(row.price))
        for row in rows
    ] == [
        ("free", 50, 1, "0.00"),
        ("basic", 500, 3, "9.99"),
        ("pro", 5000, 10, "29.99"),
        ("enterprise", 999999, 999, "99.99"),
    ]
