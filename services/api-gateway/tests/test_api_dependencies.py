"""The shape of the routes' dependency trees, which sets part of every request's CPU.

FastAPI solves a dependency's own dependencies again at every place it is used, before
it looks in its per-request cache. So each node of the tree costs a request some work,
cached or not. An estimate of that cost is 18 µs per node, from a microbenchmark
(routes with five async dependencies and with none, called in-process) of FastAPI 0.165
on an "Intel(R) Xeon(R) Processor" machine.
"""

from fastapi import APIRouter
from fastapi.dependencies.models import Dependant

from mensajero_api import deps, main
from mensajero_api.messages.routes import router as messages_router

ROUTERS = [router for name, router in vars(main).items() if name.endswith("_router")]
# Read straight from the request, so that they add one node wherever they are used.
REQUEST_RESOURCES = {
    deps.get_settings,
    deps.get_redis,
    deps.get_keys,
    deps.get_passwords,
    deps.get_session,
}


def _nodes(dependant: Dependant) -> list[Dependant]:
    """Return every sub-dependency that solving `dependant` visits, repeats included."""
    found = []
    for sub in dependant.dependencies:
        found.append(sub)
        found.extend(_nodes(sub))
    return found


def _route(router: APIRouter, path: str, method: str) -> Dependant:
    for route in router.routes:
        if getattr(route, "path", None) == path and method in route.methods:  # type: ignore[attr-defined]
            dependant: Dependant = route.dependant  # type: ignore[attr-defined]
            return dependant
    raise AssertionError(f"no route {method} {path}")


def test_routers_are_found() -> None:
    assert messages_router in ROUTERS
    assert len(ROUTERS) >= 10


def test_send_solves_few_dependencies() -> None:
    """The send route: the user (through the credentials and the session), the session,
    the resources and the language. It was 17 nodes when each resource went through
    get_resources."""
    send = _route(messages_router, "/api/v1/sms/send", "POST")

    assert len(_nodes(send)) <= 8


def test_request_resources_have_no_dependencies() -> None:
    checked = 0
    for router in ROUTERS:
        for route in router.routes:
            for node in _nodes(getattr(route, "dependant", Dependant())):
                if node.call in REQUEST_RESOURCES:
                    checked += 1
                    assert node.dependencies == [], (route, node.call)
    assert checked > 50
