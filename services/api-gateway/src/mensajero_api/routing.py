"""Request routing beyond FastAPI's own: HEAD as GET, and trailing-slash redirects.

FastAPI routes HEAD only to routes that declare it, so a monitor or `curl -I` on a GET
route got 405. Starlette's trailing-slash redirect builds an absolute Location from
the request's Host header and scheme, so behind a proxy that terminates TLS it could
point a client, with its credentials, at plain http. Its Location here is relative.
"""

from urllib.parse import quote

from starlette.responses import RedirectResponse
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Receive, Scope, Send

# The characters that a path segment may hold unencoded (RFC 3986, section 3.3), and "/".
PATH_SAFE_CHARACTERS = "/:@!$&'()*+,;=-._~"


class HeadAsGetMiddleware:
    """Route a HEAD request as a GET.

    The app gets a copy of the scope with method GET. The server keeps the original and,
    with HEAD there, sends the GET's status and headers without the body.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


def use_relative_slash_redirects(router: Router) -> None:
    """Redirect `/path/` to `/path` (and back) with a relative Location, as 307.

    Replaces Starlette's redirect_slashes on `router`: the same routes get a redirect,
    and a path that matches no route either way still gets the router's 404.
    """
    not_found = router.default
    router.redirect_slashes = False

    async def redirect_or_not_found(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if scope["type"] == "http" and path != "/":
            toggled = {
                **scope,
                "path": path.rstrip("/") if path.endswith("/") else f"{path}/",
            }
            matches = (route.matches(toggled)[0] for route in router.routes)
            if any(match is not Match.NONE for match in matches):
                location = _relative_location(toggled)
                await RedirectResponse(location)(scope, receive, send)
                return
        await not_found(scope, receive, send)

    router.default = redirect_or_not_found


def _relative_location(scope: Scope) -> str:
    """Return the path and query of the request in `scope`, as a relative URL.

    The scope's path is decoded, so it is encoded again: unencoded, `/%2541` would
    redirect to `/%41`, which names another path. A leading `//` would make the
    Location name another host, so its second slash is encoded.
    """
    path = quote(scope["path"], safe=PATH_SAFE_CHARACTERS)
    if path.startswith("//"):
        path = "/%2F" + path[2:]
    query = scope.get("query_string", b"").decode("latin-1")
    return f"{path}?{query}" if query else path
