"""Sign-up, profile and password changes, and the first superuser."""

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from mensajero_api.auth.security import PasswordHasher
from mensajero_api.auth.service import InvalidTokenError
from mensajero_api.auth.throttle import LoginThrottle
from mensajero_api.quotas import service as quotas_service
from mensajero_api.types import normalize_email
from mensajero_api.users import repository
from mensajero_api.users.schemas import PasswordChange, UserCreate, UserUpdate
from mensajero_common.errors import ConflictError, ValidationFailedError
from mensajero_common.models import User
from mensajero_common.phone import is_valid_region
from mensajero_common.settings import Settings

logger = structlog.get_logger(__name__)


class EmailTakenError(ConflictError):
    code = "email_taken"

    def __init__(self, email: str) -> None:
        super().__init__(email=email, details={"email": email})


class WeakPasswordError(ValidationFailedError):
    code = "weak_password"

    def __init__(self, field: str) -> None:
        super().__init__(details={"field": field})


class InvalidCurrentPasswordError(ValidationFailedError):
    code = "invalid_current_password"

    def __init__(self) -> None:
        super().__init__(details={"field": "current_password"})


class PasswordUnchangedError(ValidationFailedError):
    code = "password_unchanged"

    def __init__(self) -> None:
        super().__init__(details={"field": "new_password"})


# A local part shorter than this ("a@…", "jo@…") is too common a substring to forbid.
MIN_FORBIDDEN_LOCAL_PART_LENGTH = 3


def check_password_rules(password: str, email: str, field: str) -> None:
    """Raise WeakPasswordError if the password is the email or contains its local part.

    The error names `field`, the request field that carries the password. The length
    rule (8 to 128 characters) is the request schema's.
    """
    folded = password.casefold()
    local_part = email.rpartition("@")[0].casefold()
    if folded in (email.casefold(), local_part):
        raise WeakPasswordError(field)
    if len(local_part) >= MIN_FORBIDDEN_LOCAL_PART_LENGTH and local_part in folded:
        raise WeakPasswordError(field)


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
    check_password_rules(data.password, data.email, "password")
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


async def change_password(
    session: AsyncSession,
    passwords: PasswordHasher,
    throttle: LoginThrottle,
    client_address: str,
    user: User,
    data: PasswordChange,
) -> User:
    """Check the current password, store the new one and revoke every earlier token.

    Wrong current passwords count as failed logins of the account, so a stolen token
    cannot be used to guess the password faster than the login form allows. A new
    password equal to the current one raises PasswordUnchangedError and changes nothing,
    so earlier tokens keep working.
    """
    await throttle.check(user.email, client_address)
    if not await passwords.verify(data.current_password, user.hashed_password):
        await throttle.record_failure(user.email, client_address)
        logger.info("password change rejected: wrong password", user_id=str(user.id))
        raise InvalidCurrentPasswordError()
    # Checked after the current password, so that a wrong one still counts as a failed
    # login even when both fields are equal.
    if data.new_password == data.current_password:
        raise PasswordUnchangedError()
    check_password_rules(data.new_password, user.email, "new_password")

    hashed_password = await passwords.hash(data.new_password)

    # Concurrent changes with one token all pass authentication before any commits. The
    # lock makes them run one at a time, and each one after the first finds the version
    # it was authenticated with revoked, so it fails as its token now would.
    authenticated_version = user.token_version
    await repository.lock_user(session, user.id)
    await session.refresh(user, ["token_version"])
    if user.token_version != authenticated_version:
        logger.info(
            "password change rejected: token revoked by a concurrent change",
            user_id=str(user.id),
        )
        raise InvalidTokenError()

    user.hashed_password = hashed_password
    user.token_version = User.token_version + 1
    await session.commit()
    await session.refresh(user)
    await throttle.clear_account(user.email)

    logger.info("password changed", user_id=str(user.id))
    return user


async def ensure_first_superuser(
    session_factory: async_sessionmaker[AsyncSession],
    passwords: PasswordHasher,
    settings: Settings,
) -> None:
    """Create FIRST_SUPERUSER with a quota on DEFAULT_PLAN unless that email exists.

    Safe when several API replicas start at once: the insert skips an existing email.
    """
    email = normalize_email(settings.FIRST_SUPERUSER)
    async with session_factory() as session:
        if await repository.get_user_by_email(session, email):
            return

        hashed_password = await passwords.hash(settings.FIRST_SUPERUSER_PASSWORD)
        user = await repository.insert_user(
            session,
            email=email,
            hashed_password=hashed_password,
            full_name="Administrator",
            is_superuser=True,
        )
        if user is None:
            return
        await quotas_service.create_default_quota(session, user.id, settings)
        await session.commit()
        logger.info("first superuser created", user_id=str(user.id))
