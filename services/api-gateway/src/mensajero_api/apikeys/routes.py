"""User API keys: `X-API-Key` credentials for server-to-server calls."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status

from mensajero_api.apikeys import service
from mensajero_api.apikeys.schemas import (
    ApiKeyCreate,
    ApiKeyList,
    ApiKeyListQuery,
    ApiKeyPublic,
    ApiKeyWithSecret,
)
from mensajero_api.deps import (
    CurrentUser,
    LanguageDep,
    LoginUser,
    SessionDep,
    SettingsDep,
)
from mensajero_api.envelope import Envelope, error_responses
from mensajero_api.jsonbody import JSONBodyRoute
from mensajero_common.i18n import translate

router = APIRouter(
    prefix="/api/v1/users/me/api-keys", tags=["api keys"], route_class=JSONBodyRoute
)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(401, 403, 409, 422),
)
async def create_api_key(
    data: ApiKeyCreate,
    user: LoginUser,
    session: SessionDep,
    settings: SettingsDep,
    language: LanguageDep,
) -> Envelope[ApiKeyWithSecret]:
    """Create an API key, shown only in this response; send it as `X-API-Key`.

    Needs a bearer token: an API key cannot create another key (403
    `login_token_required`), so a leaked key cannot outlive its own revocation. A user has
    at most 50 active keys (409 `api_key_limit_reached`).
    """
    api_key, value = await service.create_api_key(session, settings, user, data)
    public = ApiKeyPublic.from_model(api_key)
    return Envelope(
        data=ApiKeyWithSecret(**public.model_dump(), api_key=value),
        message=translate("api_key_created", language),
    )


@router.get("", responses=error_responses(400, 401, 403, 422))
async def list_api_keys(
    user: CurrentUser,
    session: SessionDep,
    query: Annotated[ApiKeyListQuery, Query()],
) -> Envelope[ApiKeyList]:
    """List the user's API keys, revoked and expired ones included, oldest first.

    One page of up to `limit` keys. Pass `next_cursor` as `cursor` for the next one.
    A cursor that this listing did not return gets 400 `invalid_cursor`.
    """
    api_keys, next_cursor = await service.list_api_keys(
        session, user, limit=query.limit, cursor=query.cursor
    )
    return Envelope(
        data=ApiKeyList(
            items=[ApiKeyPublic.from_model(key) for key in api_keys],
            next_cursor=next_cursor,
            limit=query.limit,
        )
    )


@router.get("/{key_id}", responses=error_responses(401, 403, 404, 422))
async def read_api_key(
    key_id: uuid.UUID, user: CurrentUser, session: SessionDep
) -> Envelope[ApiKeyPublic]:
    api_key = await service.get_api_key(session, user, key_id)
    return Envelope(data=ApiKeyPublic.from_model(api_key))


@router.delete("/{key_id}", responses=error_responses(401, 403, 404, 422))
async def revoke_api_key(
    key_id: uuid.UUID, user: CurrentUser, session: SessionDep, language: LanguageDep
) -> Envelope[ApiKeyPublic]:
    """Revoke the key: the next request that sends it gets 401 `invalid_api_key`."""
    api_key = await service.revoke_api_key(session, user, key_id)
    return Envelope(
        data=ApiKeyPublic.from_model(api_key),
        message=translate("api_key_revoked", language),
    )
