"""Database creation and migrations, for `mensajero-migrate` and the tests."""

import asyncio
import sys

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url

from mensajero_common.settings import get_settings


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", "mensajero_common:migrations")
    config.set_main_option(
        "file_template",
        "%%(year)d_%%(month).2d_%%(day).2d_%%(hour).2d%%(minute).2d-%%(rev)s_%%(slug)s",
    )
    # Alembic's Config interpolates "%" signs, so a URL-encoded password needs them doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


async def create_database_if_missing(database_url: str) -> bool:
    """Create the database named in `database_url` when it does not exist yet."""
    url = make_url(database_url)
    name = url.database
    server_url = url.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False
    )
    connection = await asyncpg.connect(server_url)
    try:
        exists = await connection.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", name
        )
        if exists:
            return False
        quoted = '"' + str(name).replace('"', '""') + '"'
        await connection.execute(f"CREATE DATABASE {quoted}")
        return True
    finally:
        await connection.close()


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def main() -> None:
    """Create the database if needed and apply every migration."""
    settings = get_settings()
    try:
        created = asyncio.run(create_database_if_missing(settings.DATABASE_URL))
    except (OSError, asyncpg.PostgresError) as error:
        sys.stderr.write(f"cannot reach Postgres at DATABASE_URL: {error}\n")
        raise SystemExit(1) from None
    if created:
        print(f"created database {make_url(settings.DATABASE_URL).database}")
    upgrade(settings.DATABASE_URL)
    print("migrations applied")


if __name__ == "__main__":
    main()
