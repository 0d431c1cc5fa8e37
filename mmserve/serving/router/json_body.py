"""The request body as JSON; whatever is malformed about it is a 400 saying why, never a 500.

msgspec's decoder refuses what Python's ``json`` lets through to fail later: invalid UTF-8, lone
UTF-16 surrogates (``"\\ud800"``, which raise when the text is encoded), NaN and Infinity, integers
longer than 4300 digits and floats beyond double range. Nesting deeper than the interpreter's
recursion limit raises RecursionError, caught here too. The body's size and arrival time are
bounded before this reads it (``body_guard``).
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request

from mmserve.serving.router.errors import InvalidRequest


async def json_body(request: Request) -> Any:
    body = await request.body()
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as error:
        raise InvalidRequest(f"the request body is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidRequest("the request body's JSON is nested too deeply") from None
