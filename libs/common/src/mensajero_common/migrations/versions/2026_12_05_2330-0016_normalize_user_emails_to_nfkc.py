"""Normalize stored email addresses to NFKC, unless that would join two accounts.

Sign-up now applies Unicode NFKC to an email before email-validator, so that look-alike
compatibility forms (fullwidth "ｋ", the ligature "ﬁ") reach the same account as the
plain form. Addresses stored before were normalized to NFC only. This migration rewrites
each of them to its NFKC form, so that every spelling of it finds the account.

An address whose NFKC form (in any letter case) is already another account's is kept as
it is, because two accounts with their own devices and messages cannot be merged here.
Its owner still logs in by typing the address as before: login looks up that older form
first (see get_user_by_email in the api-gateway). Every other spelling reaches the
account that holds the NFKC form. Where several stored addresses fold into one that no
account holds yet, the oldest account gets it. An address whose NFKC form would not be
an address any more ("﹫" becomes a second "@", "　" a space) is kept too, and found the
same way.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05 23:30:00
"""

import logging
import unicodedata
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from email_validator import EmailNotValidError, validate_email

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("alembic.runtime.migration")


def _checked(email: str) -> str | None:
    """Return `email` as sign-up would store it, or None if sign-up would reject it.

    NFKC can turn an accepted address into a rejected one: "‥" becomes "..", and "﹫" a
    second "@".
    """
    try:
        return validate_email(email, check_deliverability=False).normalized
    except EmailNotValidError:
        return None


def upgrade() -> None:
    connection = op.get_bind()
    # ASCII text is its own NFKC form, so only addresses with other characters can change.
    rows = connection.execute(
        sa.text(
            'SELECT id, email FROM "user" '
            "WHERE octet_length(email) <> char_length(email) "
            "ORDER BY created_at, id"
        )
    ).all()

    kept = []
    for user_id, email in rows:
        nfkc = unicodedata.normalize("NFKC", email)
        if nfkc == email:
            continue
        folded = _checked(nfkc)
        if folded is None:
            kept.append(str(user_id))
            continue
        # The unique index on lower(email) would reject a taken form, so it is skipped.
        updated = connection.execute(
            sa.text(
                'UPDATE "user" SET email = :folded WHERE id = :id AND NOT EXISTS '
                '(SELECT 1 FROM "user" WHERE lower(email) = lower(:folded) '
                "AND id <> :id)"
            ),
            {"folded": folded, "id": user_id},
        )
        if updated.rowcount == 0:
            kept.append(str(user_id))

    if kept:
        log.warning(
            "Kept %d email addresses in their pre-NFKC form because another account "
            "holds the NFKC form or it is no address; user ids: %s",
            len(kept),
            ", ".join(kept),
        )


def downgrade() -> None:
    # The original spellings are not stored, so nothing is restored. After a downgrade
    # the rewritten accounts log in with the NFKC spelling of their address.
    pass
