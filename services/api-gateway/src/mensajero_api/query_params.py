"""Rejection of a repeated query parameter that takes a single value.

FastAPI (0.165) reads a query parameter whose type is not a list with Starlette's
`QueryParams.get`, which returns the last of repeated values. So
`?event=sms_sent&event=sms_failed` would filter by `sms_failed` alone and return a wrong
page with no error. `SingleValueQueryRoute` rejects such a request with 422
`validation_error`, one item of type `query_parameter_repeated` per repeated parameter.
List parameters, such as `status` of the listings, may still be repeated.
"""

from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from types import UnionType
from typing import Any, Union, get_args, get_origin

from fastapi import Request, Response
from fastapi._compat import ModelField, field_annotation_is_sequence
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.datastructures import QueryParams

REPEATED_TYPE = "query_parameter_repeated"


def _parameter_model(annotation: Any) -> type[BaseModel] | None:
    """Return the model of a parameter declared as `Annotated[Model, Query()]`, if any."""
    if get_origin(annotation) in (Union, UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        annotation = members[0] if len(members) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _query_fields(dependant: Dependant) -> Iterator[ModelField]:
    yield from dependant.query_params
    for sub_dependant in dependant.dependencies:
        yield from _query_fields(sub_dependant)


def single_value_query_names(dependant: Dependant) -> frozenset[str]:
    """Return the names of the query parameters of `dependant` that take one value.

    A parameter takes a list when FastAPI reads all of its repeated values, which it
    decides with the same `field_annotation_is_sequence` used here.
    """
    names: set[str] = set()
    for field in _query_fields(dependant):
        model = _parameter_model(field.field_info.annotation)
        if model is None:
            if not field_annotation_is_sequence(field.field_info.annotation):
                names.add(field.alias)
            continue
        for name, info in model.model_fields.items():
            if not field_annotation_is_sequence(info.annotation):
                names.add(info.alias or name)
    return frozenset(names)


def repeated_query_errors(
    query: QueryParams, single_value_names: frozenset[str]
) -> list[dict[str, Any]]:
    """Return a validation error for each name of `single_value_names` that `query`
    contains more than once, in the order of their first appearance."""
    counts = Counter(key for key, _ in query.multi_items())
    return [
        {
            "type": REPEATED_TYPE,
            "loc": ("query", name),
            "msg": f"Query parameter sent {count} times; it takes a single value",
            "input": query.getlist(name),
            "ctx": {"count": count},
        }
        for name, count in counts.items()
        if count > 1 and name in single_value_names
    ]


class SingleValueQueryRoute(APIRoute):
    """An APIRoute that rejects a repeated query parameter that takes a single value.

    The check runs before the endpoint's dependencies, so a repeated parameter gets 422
    even before the credentials are checked.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        # NOTE: a dependency added by include_router or by the app is not part of
        # self.dependant, so its query parameters are not checked here. No router of
        # the API adds one.
        single_value_names = single_value_query_names(self.dependant)
        if not single_value_names:
            return handle

        async def handle_single_values(request: Request) -> Response:
            errors = repeated_query_errors(request.query_params, single_value_names)
            if errors:
                raise RequestValidationError(errors)
            return await handle(request)

        return handle_single_values
