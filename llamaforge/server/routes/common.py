"""What the routers share: the error responses every route documents in the OpenAPI schema."""

from llamaforge.server.schemas import ErrorResponse

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}
