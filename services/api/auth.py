"""Bearer-token auth: 401 without a token, 403 with a wrong one; the token is never logged."""

from __future__ import annotations

import logging
import secrets

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.api.hardening import method_label, printable

log = logging.getLogger("elborl.api")
_bearer = HTTPBearer(auto_error=False, description="The token from $ELBORL_TOKEN or a file.")


class BearerAuth:
    """A FastAPI dependency comparing the bearer token in constant time (``async``: it runs on
    the event loop, not a worker thread)."""

    def __init__(self, token: str):
        self._token = token.encode()

    def __repr__(self) -> str:
        return "BearerAuth(token=<hidden>)"

    async def __call__(
        self,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),  # noqa: B008
    ) -> None:
        if credentials is None:
            raise HTTPException(
                status_code=401,
                detail="missing bearer token (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not secrets.compare_digest(credentials.credentials.encode(), self._token):
            # Method and path only: never the header, never the query string.
            log.warning(
                "rejected %s %s: wrong token",
                method_label(request.method),
                printable(request.url.path),
            )
            raise HTTPException(status_code=403, detail="invalid token")
