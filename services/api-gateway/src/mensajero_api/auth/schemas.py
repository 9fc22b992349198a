"""Bodies of the login endpoint."""

from typing import Literal

from pydantic import BaseModel, Field


class Token(BaseModel):
    """An OAuth2 token response (RFC 6749, section 5.1), not wrapped in the envelope."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds until the token expires.")
