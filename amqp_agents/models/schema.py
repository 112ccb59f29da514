"""Payload schemas read from handler signatures, and validation with wire-ready errors.

Action handlers and event handlers declare their payload by annotating their one
argument (a pydantic model, or ``dict[str, Any]`` for raw JSON); this module turns
that into a validator once per handler, and validation failures into
``InvalidPayloadError`` carrying the field errors as plain JSON data.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, get_type_hints

from pydantic import TypeAdapter, ValidationError

from amqp_agents.errors import ConfigurationError, InvalidPayloadError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["adapter_for", "handler_argument", "validate_payload"]


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
    hints = get_type_hints(func)
    return hints.get(params[0].name, dict[str, Any])


def adapter_for(annotation: Any) -> TypeAdapter[Any]:
    """A validator for ``annotation`` (built once per handler, not per message)."""
    return TypeAdapter(annotation)


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
