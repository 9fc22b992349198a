"""The OAuth2 password login that issues bearer tokens."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import OAuth2PasswordRequestForm

from mensajero_api.auth import service
from mensajero_api.auth.schemas import Token
from mensajero_api.auth.security import create_access_token
from mensajero_api.auth.throttle import LoginThrottleDep
from mensajero_api.deps import PasswordsDep, SessionDep, SettingsDep
from mensajero_api.envelope import error_responses
from mensajero_api.jsonbody import JSONBodyRoute
from mensajero_api.types import normalize_email, normalize_email_before_nfkc
from mensajero_common.errors import AppError
from mensajero_common.throttle import client_address

router = APIRouter(prefix="/api/v1/login", tags=["login"], route_class=JSONBodyRoute)


class LoginFormRequiredError(AppError):
    """A login sent as JSON, which OAuth2's password flow does not read."""

    status_code = 415
    code = "login_form_required"


def reject_json_login(request: Request) -> None:
    """Raise LoginFormRequiredError for a JSON body.

    Without it, a JSON login got 422 for missing `username` and `password` although the
    body held both, with no hint that a form was expected.
    """
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        raise LoginFormRequiredError()


@router.post(
    "/access-token",
    responses=error_responses(401, 403, 415, 422, login_throttle=True),
    # Before the form's fields, whose errors would come first otherwise.
    dependencies=[Depends(reject_json_login)],
)
async def login_access_token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    request: Request,
    session: SessionDep,
    passwords: PasswordsDep,
    settings: SettingsDep,
    throttle: LoginThrottleDep,
) -> Token:
    """Exchange an email (`username`) and password, sent as a form, for a bearer token.

    The response is the bare OAuth2 token body (`access_token`, `token_type`, `expires_in`),
    not the `{"success", "data"}` envelope, so that OAuth2 clients and the Authorize button
    of /docs can read it. Errors use the usual error envelope. Repeated wrong passwords
    for one email, or from one address, get 429 `too_many_login_attempts` with
    Retry-After (LOGIN_FAILURES_PER_ACCOUNT, LOGIN_FAILURES_PER_IP).
    """
    address = client_address(request.scope)
    # Normalized before the throttle too, so that other spellings of one address
    # (an xn-- domain, another Unicode form) count as failures of one account.
    email = normalize_email(form.username)
    await throttle.check(email, address)
    try:
        user = await service.authenticate(
            session,
            passwords,
            email,
            form.password,
            email_before_nfkc=normalize_email_before_nfkc(form.username),
        )
    except service.InvalidCredentialsError:
        await throttle.record_failure(email, address)
        raise
    await throttle.clear_account(email)
    token = create_access_token(user.id, user.token_version, settings)
    return Token(access_token=token.token, expires_in=token.expires_in_s)
