"""Errors as the HTTP API reports them: OpenAI's JSON error shape, which the `openai` client turns into its typed
exceptions. Domain errors (a bad prompt, a prompt too long, a failed generation) are translated here."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from finetune.errors import UserError
from finetune.generation.window import PromptTooLong
from finetune.serve.schemas import UNION_FIELDS
from finetune.serve.worker import ClientGone, GenerationFailed


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


@contextmanager
def invalid_input(param: str) -> Iterator[None]:
    """User errors raised while a request's prompt is built, as 400 errors naming `param`."""
    try:
        yield
    except PromptTooLong as exc:
        raise ApiError(400, str(exc), param, "context_length_exceeded") from None
    except UserError as exc:
        raise ApiError(400, str(exc), param) from None


def add_error_handlers(app: FastAPI) -> None:
    """Every error the app raises, and FastAPI's own (validation, 404, 405), in the OpenAI shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.exception_handler(GenerationFailed)
    async def _generation_failed(_: Request, exc: GenerationFailed) -> JSONResponse:
        return error_response(500, str(exc), kind="server_error")

    @app.exception_handler(ClientGone)
    async def _client_gone(_: Request, __: ClientGone) -> JSONResponse:  # nobody reads it: for the access log
        return error_response(499, "the client closed the connection before the reply", kind="client_closed_request")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind=kind)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line for pydantic's errors, and the parameter they are about."""
    errors = exc.errors()
    if errors and errors[0]["type"] == "json_invalid":
        return f"the request body is not valid JSON: {errors[0].get('ctx', {}).get('error', 'decode error')}", None
    if errors and isinstance(errors[0].get("input"), bytes):
        return "the request body must be a JSON object sent with the header 'Content-Type: application/json'", None
    parts: dict[str, str] = {}
    for error in errors:
        loc = [str(x) for x in error["loc"] if x != "body"]
        message = error["msg"].removeprefix("Value error, ")
        union = next((i for i, part in enumerate(loc[:-1]) if part in UNION_FIELDS and not loc[i + 1].isdigit()), None)
        if union is not None:  # pydantic reports one error per member of the union: say what is expected instead
            where = ".".join(loc[:union + 1])
            parts[where] = f"{where}: must be {UNION_FIELDS[loc[union]]}"
        else:
            parts.setdefault(".".join(loc), f"{'.'.join(loc)}: {message}" if loc else message)
    return "; ".join(dict.fromkeys(parts.values())), next(iter(parts)) or None
