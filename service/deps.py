"""What every HTTP front-end asks of a request before it runs: the service, and the bearer token when one is set."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import Unauthorized
from .runtime import Service

_bearer = HTTPBearer(auto_error=False, description="Needed only when the server sets MPRNET_API_TOKEN")


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def require_token(
    request: Request, service: ServiceDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    token = service.settings.api_token
    if token is None:
        return
    if creds is None or not secrets.compare_digest(creds.credentials.encode(), token.get_secret_value().encode()):
        task = request.path_params.get("task", "unknown")
        error = Unauthorized()
        service.metrics.reject(task, error)
        raise error


Authorized = [Depends(require_token)]
