"""The developer console (`/console`): a page that drives the gateway through the TypeScript SDK.

Development mode only: `app.make_app` adds these routes when `settings.dev` is true, and nowhere
else, so a production instance answers 404 for every `/console` URL. The page itself lives in
`clients/console/` and the SDK it imports is the compiled `clients/typescript/dist/` (`make sdk`);
both are read from the source checkout, never packaged, since only a developer's checkout runs
`--dev`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, cast

import ujson
from tornado.web import RequestHandler, StaticFileHandler

from .auth import MAX_USER_ID_LENGTH, mint_token
from .gateway import Gateway
from .http_api import ApiHandler, broadcast_refusal
from .messages import USER_TYPES, UserType

log = logging.getLogger(__name__)

CHECKOUT = Path(__file__).resolve().parent.parent
PAGE_DIR = CHECKOUT / "clients" / "console"
SDK_DIR = CHECKOUT / "clients" / "typescript" / "dist"
SDK_MISSING = "SDK not built: run make sdk"
#: The page's own files, by name: anything else in clients/console/ (its browser test) is not served.
PAGE_ASSETS = r"app\.js|console\.css"
#: Long enough for an afternoon at the console; the SDK asks for a new one before it expires anyway.
TOKEN_TTL_S = 3600.0


def routes(gateway: Gateway) -> list[tuple[str, type[RequestHandler], dict[str, Any]]]:
    """The console's URL rules, for `make_app` to add in development mode only."""
    log.info("developer console: http://localhost:%d/console", gateway.settings.port)
    return [
        (r"/console/?()", ConsolePageHandler, {"path": str(PAGE_DIR)}),
        (rf"/console/({PAGE_ASSETS})", ConsoleAssetHandler, {"path": str(PAGE_DIR)}),
        (r"/console/sdk/(.*)", ConsoleSdkHandler, {"path": str(SDK_DIR)}),
        (r"/console/token", ConsoleTokenHandler, {"gateway": gateway}),
    ]


class ConsoleAssetHandler(StaticFileHandler):
    """The page's files. StaticFileHandler keeps requests inside its root (no `..` escapes);
    no-cache so that an edited page or a rebuilt SDK shows on the next reload, not in an hour."""

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")


class ConsolePageHandler(ConsoleAssetHandler):
    """`/console` itself: index.html. The page loads its script by an absolute path (and the
    script the SDK relative to itself), so `/console` and `/console/` both work."""

    async def get(self, path: str, include_body: bool = True) -> None:
        await super().get("index.html", include_body)


class ConsoleSdkHandler(ConsoleAssetHandler):
    """`clients/typescript/dist/`, the compiled SDK the page imports as ES modules. When it has
    not been built, the 404 says how to build it instead of leaving the page blank."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        if status_code == 404 and not sdk_built():
            self.finish(SDK_MISSING + "\n")
        else:
            self.finish(f"{status_code} {self._reason}\n")


def sdk_built() -> bool:
    """The SDK's entry module is there (the page imports `/console/sdk/index.js`)."""
    return os.path.isfile(SDK_DIR / "index.js")


class ConsoleTokenHandler(ApiHandler):
    """`POST /console/token {"userId", "userType"}` -> `{"token", "expiresAt"}`: a token signed with
    this gateway's own secret, so the page can connect as anyone without a token service.

    It hands out the power to connect as any user, so it is refused to exactly the callers that
    may not broadcast (no API key configured: loopback only; otherwise `Authorization: Bearer
    <GATEWAY_API_KEY>`). With a public-key setup the gateway cannot sign: 409, paste a token."""

    def post(self) -> None:
        refusal = broadcast_refusal(self.gateway.settings.gateway_api_key, self.client,
                                    self.request.headers.get("Authorization"))
        if refusal is not None:
            status, code, message = refusal
            self.send_error_json(status, code, f"console tokens follow the broadcast rule: {message}")
            return
        try:
            user_id, user_type = token_request(self.request.body)
        except ValueError as exc:
            self.send_error_json(400, "INVALID_PARAMS", str(exc))
            return
        try:
            token = mint_token(self.gateway.settings, user_id, user_type, ttl_s=TOKEN_TTL_S)
        except ValueError as exc:  # RS256/ES256: the gateway holds only the public key
            self.send_error_json(409, "CANNOT_SIGN", f"{exc}; paste a token into the console instead")
            return
        self.send_json(200, {"token": token, "userId": user_id, "userType": user_type,
                             "expiresIn": int(TOKEN_TTL_S)})


def token_request(body: bytes) -> tuple[str, UserType]:
    """The (userId, userType) of a token request; ValueError naming what is wrong."""
    try:
        fields = ujson.loads(body or b"{}")
    except (ValueError, OverflowError, RecursionError):
        raise ValueError("body is not valid JSON") from None
    if not isinstance(fields, dict):
        raise ValueError("body must be a JSON object")
    user_id = fields.get("userId")
    if not isinstance(user_id, str) or not 0 < len(user_id) <= MAX_USER_ID_LENGTH:
        raise ValueError(f"userId must be a string of 1..{MAX_USER_ID_LENGTH} characters")
    user_type = fields.get("userType")
    if user_type not in USER_TYPES:
        raise ValueError(f"userType must be one of {', '.join(USER_TYPES)}")
    return user_id, cast(UserType, user_type)
