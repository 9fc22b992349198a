"""Sign-up, profile changes and the first superuser."""

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.auth.security import PasswordHasher
from mensajero_api.quotas import service as quotas_service
from mensajero_api.users import repository
from mensajero_api.users.schemas import UserCreate, UserUpdate
from mensajero_common.errors import ConflictError, ValidationFailedError
from mensajero_common.models import User
from mensajero_common.phone import is_valid_region
from mensajero_common.settings import Settings

logger = structlog.get_logger(__name__)


class EmailTakenError(ConflictError):
    code = "email_taken"

    def __init__(self, email: str) -> None:
        super().__init__(email=email, details={"email": email})


class InvalidRegionError(ValidationFailedError):
    code = "invalid_region"

    def __init__(self, region: str) -> None:
        super().__init__(region=region, details={"region": region})


def normalize_region(region: str | None) -> str | None:
    """Return the region code in upper case, None for a blank one, or raise."""
    if region is None or not region.strip():
        return None
    code = region.strip().upper()
    if not is_valid_region(code):
        raise InvalidRegionError(region)
    return code


async def sign_up(
    session: AsyncSession,
    passwords: PasswordHasher,
    settings: Settings,
    data: UserCreate,
) -> User:
    """Create a user with a quota on DEFAULT_PLAN, and commit."""
    default_region = normalize_region(data.default_region)
    # Checked before hashing so a taken email costs no argon2 run; the insert below
    # still settles a race between two sign-ups with one email.
    if await repository.get_user_by_email(session, data.email) is not None:
        raise EmailTakenError(data.email)

    hashed_password = await passwords.hash(data.password)
    user = await repository.insert_user(
        session,
        email=data.email,
        hashed_password=hashed_password,
        full_name=data.full_name,
        default_region=default_region,
    )
    if user is None:
        raise EmailTakenError(data.email)
    await quotas_service.create_default_quota(session, user.id, settings)
    await session.commit()

    logger.info("user signed up", user_id=str(user.id))
    return user


async def update_profile(session: AsyncSession, user: User, data: UserUpdate) -> User:
    changes = data.model_dump(include=data.model_fields_set)
    if "default_region" in changes:
        changes["default_region"] = normalize_region(changes["default_region"])
    for name, value in changes.items():
        setattr(user, name, value)
    await session.commit()
    # updated_at is set by the database on UPDATE, so load it back.
    await session.refresh(user)
    return user


async def ensure_first_superuser(
    session_factory: async_sessionmaker[AsyncSession],
    passwords: PasswordHasher,
    settings: Settings,
) -> None:
    """Create FIRST_SUPERUSER with a quota on DEFAULT_PLAN unless that email exists.

    Safe when several API replicas start at once: the insert skips an existing email.
    """
    async with session_factory() as session:
        if await repository.get_user_by_email(session, settings.FIRST_SUPERUSER):
            return

        hashed_password = await passwords.hash(settings.FIRST_SUPERUSER_PASSWORD)
        user = await repository.insert_user(
            session,
            email=settings.FIRST_SUPERUSER,
            hashed_password=hashed_password,
            full_name="Administrator",
            is_superuser=True,
        )
        if user is None:
            return
        await quotas_service.create_default_quota(session, user.id, settings)
        await session.commit()
        logger.info("first superuser created", user_id=str(user.id))
