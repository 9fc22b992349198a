"""Sign-up and the current user's profile."""

from fastapi import APIRouter, Request, status

from mensajero_api.auth.security import create_access_token
from mensajero_api.auth.throttle import LoginThrottleDep
from mensajero_api.deps import (
    CurrentUser,
    LanguageDep,
    LoginUser,
    PasswordsDep,
    SessionDep,
    SettingsDep,
)
from mensajero_api.envelope import Envelope, error_responses
from mensajero_api.jsonbody import JSONBodyRoute
from mensajero_api.users import service
from mensajero_api.users.schemas import (
    PasswordChange,
    PasswordChanged,
    UserCreate,
    UserPublic,
    UserUpdate,
)
from mensajero_common.i18n import translate
from mensajero_common.throttle import client_address

router = APIRouter(prefix="/api/v1/users", tags=["users"], route_class=JSONBodyRoute)


@router.post(
    "/signup",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(400, 409, 422),
)
async def sign_up(
    data: UserCreate,
    session: SessionDep,
    passwords: PasswordsDep,
    settings: SettingsDep,
    language: LanguageDep,
) -> Envelope[UserPublic]:
    """Create an account on the plan named by DEFAULT_PLAN (Free by default)."""
    user = await service.sign_up(session, passwords, settings, data)
    return Envelope(
        data=UserPublic.model_validate(user),
        message=translate("user_created", language),
    )


@router.get("/me", responses=error_responses(401, 403))
async def read_me(user: CurrentUser) -> Envelope[UserPublic]:
    return Envelope(data=UserPublic.model_validate(user))


@router.patch("/me", responses=error_responses(400, 401, 403, 422))
async def update_me(
    data: UserUpdate, user: CurrentUser, session: SessionDep, language: LanguageDep
) -> Envelope[UserPublic]:
    """Change the full name or the default region of phone numbers."""
    user = await service.update_profile(session, user, data)
    return Envelope(
        data=UserPublic.model_validate(user),
        message=translate("user_updated", language),
    )


@router.put(
    "/me/password", responses=error_responses(400, 401, 403, 422, login_throttle=True)
)
async def change_password(
    data: PasswordChange,
    request: Request,
    user: LoginUser,
    session: SessionDep,
    passwords: PasswordsDep,
    settings: SettingsDep,
    throttle: LoginThrottleDep,
    language: LanguageDep,
) -> Envelope[PasswordChanged]:
    """Change the password: every token issued before stops working at once.

    Returns a new bearer token to go on with. Needs a bearer token: an API key gets 403
    `login_token_required`, so a leaked key can neither guess the password nor cut off
    its owner's sessions. User API keys are not affected; revoke them separately if the
    account may have been compromised. Errors: 400
    `invalid_current_password`, `password_unchanged` (the new password is the current
    one) or `weak_password` (the new password is the email or contains the part before
    the @); 401 `invalid_token` when another change made with the same token
    committed first; 429 `too_many_login_attempts` after repeated wrong current
    passwords.
    """
    user = await service.change_password(
        session, passwords, throttle, client_address(request.scope), user, data
    )
    token = create_access_token(user.id, user.token_version, settings)
    return Envelope(
        data=PasswordChanged(access_token=token.token, expires_in=token.expires_in_s),
        message=translate("password_changed", language),
    )
