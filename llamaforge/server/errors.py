"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the right status.

`APIError` is raised anywhere in the server and turned into a JSON response by the app's handlers;
pydantic validation errors become 400s naming the offending field.
"""

from __future__ import annotations

from typing import Any, Optional

STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",  # OpenAI: an unknown model is invalid_request_error / model_not_found
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error to send to the client as `status` with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients expect."""
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """`{"error": {...}}` for a status code."""
    return {"error": {"message": message, "type": STATUS_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


def from_validation_errors(errors: list[dict[str, Any]]) -> APIError:
    """A 400 describing pydantic's (or FastAPI's) validation errors, naming the first bad field."""
    if not errors:
        return bad_request("the request body is not valid")
    parts, first_param = [], None
    for err in errors[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        # Drop pydantic's union-member tags (e.g. 'str', 'list[int]') so the path reads as the JSON path.
        path = ".".join(x for x in loc if not _is_type_tag(x))
        if err.get("type") == "json_invalid":
            return bad_request(f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}",
                               code="invalid_json")
        if first_param is None and path:
            first_param = path
        parts.append(f"{path or 'body'}: {err.get('msg', 'invalid value')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return bad_request("invalid request: " + "; ".join(parts) + more, param=first_param, code="invalid_value")


def _is_type_tag(part: str) -> bool:
    return any(c in part for c in "[]") or part in {"str", "int", "float", "bool", "TextPart", "ImagePart",
                                                    "NamedToolChoice", "function-after", "literal"} or \
        part.startswith("literal[")
