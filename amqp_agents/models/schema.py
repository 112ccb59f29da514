"""Payload schemas read from handler signatures, and validation with wire-ready errors.

Action handlers and event handlers declare their payload by annotating their one
argument (a pydantic model, or ``dict[str, Any]`` for raw JSON); this module turns
that into a validator once per handler, and validation failures into
``InvalidPayloadError`` carrying the field errors as plain JSON data.
"""

from __future__ import annotations

import inspect
import types
from typing import TYPE_CHECKING, Any, get_type_hints

from pydantic import TypeAdapter, ValidationError
from pydantic.errors import PydanticUserError

from amqp_agents.errors import ConfigurationError, InvalidPayloadError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "adapter_for",
    "check_accepts_object",
    "handler_argument",
    "handler_result",
    "validate_payload",
]


def handler_argument(func: Callable[..., Any], *, bound: bool, what: str) -> Any:
    """The annotation of ``func``'s one payload argument, or ``None`` if it takes none.

    ``bound``: skip the first parameter (``self`` of a method defined on a class).
    An unannotated argument means raw JSON (``dict[str, Any]``).
    """
    params = list(inspect.signature(func).parameters.values())
    if bound:
        params = params[1:]
    if not params:
        return None
    if len(params) > 1:
        raise ConfigurationError(f"{what}: {func.__qualname__} takes one payload argument at most")
    name = params[0].name
    raw = getattr(func, "__annotations__", {}).get(name)
    if raw is None:
        return dict[str, Any]
    # Resolve only the payload's annotation: the return type may be imported under
    # TYPE_CHECKING, which is fine, since nothing reads it at run time.
    holder = types.SimpleNamespace(__annotations__={name: raw})
    try:
        return get_type_hints(holder, globalns=getattr(func, "__globals__", {}))[name]
    except NameError as exc:
        raise ConfigurationError(
            f"{what}: cannot resolve the payload annotation of {func.__qualname__} ({exc});"
            " import the payload type at run time, not under TYPE_CHECKING"
        ) from None


def handler_result(func: Callable[..., Any]) -> Any:
    """The annotation of what ``func`` returns (an action's reply ``data``), for schemas.

    ``Any`` when the return is not annotated, or names a type imported only under
    ``TYPE_CHECKING``: that is allowed (the runtime never reads the return type), so
    the contract then says "any JSON value" instead of failing.
    """
    raw = getattr(func, "__annotations__", {}).get("return", inspect.Signature.empty)
    if raw is inspect.Signature.empty:
        return Any
    holder = types.SimpleNamespace(__annotations__={"return": raw})
    try:
        return get_type_hints(holder, globalns=getattr(func, "__globals__", {}))["return"]
    except NameError:
        return Any


def adapter_for(annotation: Any) -> TypeAdapter[Any]:
    """A validator for ``annotation`` (built once per handler, not per message)."""
    return TypeAdapter(annotation)


def check_accepts_object(adapter: TypeAdapter[Any], *, what: str) -> None:
    """Fail at definition time if no JSON object can ever validate against ``adapter``.

    A request's payload is always a JSON object, so a handler annotated ``payload: int``
    (or ``str``, ``list[...]``) would answer every request ``INVALID_PAYLOAD``. Judged
    from the JSON schema; a type without one (arbitrary classes) is given the benefit of
    the doubt.

    Raises:
        ConfigurationError: the annotation accepts no JSON object.
    """
    try:
        schema = adapter.json_schema()
    except PydanticUserError:
        return
    if not _accepts_object(schema, schema.get("$defs", {})):
        raise ConfigurationError(
            f"{what}: its payload annotation can never accept a JSON object, and a"
            " request's payload always is one: annotate it with a pydantic model or"
            " dict[str, Any]"
        )


def _accepts_object(schema: dict[str, Any], defs: dict[str, Any]) -> bool:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return _accepts_object(defs.get(ref.removeprefix("#/$defs/"), {}), defs)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return any(_accepts_object(branch, defs) for branch in schema[key])
    if "allOf" in schema:
        return all(_accepts_object(branch, defs) for branch in schema["allOf"])
    kind = schema.get("type")
    if kind is None:
        return "const" not in schema and "enum" not in schema  # e.g. Any
    return kind == "object" or (isinstance(kind, list) and "object" in kind)


def validate_payload(adapter: TypeAdapter[Any], payload: Any) -> Any:
    """Validate a decoded JSON payload.

    Raises:
        InvalidPayloadError: with ``details`` = ``[{"loc", "msg", "type"}, ...]``.
    """
    try:
        return adapter.validate_python(payload)
    except ValidationError as exc:
        details = [
            {"loc": list(error["loc"]), "msg": error["msg"], "type": error["type"]}
            for error in exc.errors(include_url=False, include_input=False)
        ]
        raise InvalidPayloadError(
            f"payload does not match the schema: {exc.error_count()} error(s)", details=details
        ) from None
