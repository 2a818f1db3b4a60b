"""The prediction API: /predict, /feedback, /info, /health."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import torch
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from capas.data import Preprocess, image_size, read_image
from capas.deploy.serve.batching import Overloaded
from capas.deploy.serve.deps import State
from capas.deploy.serve.monitor import UnknownPrediction, wilson_interval
from capas.deploy.serve.settings import ServeSettings
from capas.errors import CapasError, closest

router = APIRouter()

MAX_ID_CHARS = 64  # prediction ids are 32 hex characters; longer ones are refused, never echoed
FEEDBACK_MAX_BYTES = 4096  # a feedback body is {"id": 32 hex characters, "label": a class}: ~100 bytes
IMAGES_SHAPE = '{"images": ["<base64>", …]}'
SEND_FILES = "send each image as a file field (curl -F file=@x.png)"
FEEDBACK_SHAPE = '{"id": "<prediction id>", "label": <class index or name>}'
RETRY_AFTER_S = 1  # what an overloaded server tells clients to wait
DATA_URL = re.compile(
    r"^data:[\w/+.-]*;base64,", re.IGNORECASE
)  # RFC 2397: the scheme and media type are case-insensitive
ERROR = {
    "description": "what was wrong with the request",
    "content": {"application/json": {"example": {"detail": "…"}}},
}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more image files (PNG, JPEG, …); any field name is accepted",
                        }
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "additionalProperties": False,
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "byte"},
                            "description": "base64-encoded image files (a data: URL prefix and line breaks are allowed)",
                        }
                    },
                }
            },
        },
    }
}


class TopClass(BaseModel):
    label: str
    probability: float


class PredictionOut(BaseModel):
    id: str = Field(description="send it to /feedback with the true label")
    label: str
    index: int
    probabilities: list[float] = Field(description="one per class, in the order of /info's classes")
    top: list[TopClass]


class PredictResponse(BaseModel):
    model: str
    classes: list[str]
    predictions: list[PredictionOut]


class FeedbackIn(BaseModel):
    # strict: true is not class 1, and a misspelt field is an error rather than ignored
    model_config = ConfigDict(extra="forbid")

    id: StrictStr = Field(max_length=MAX_ID_CHARS, description="a prediction id returned by /predict")
    label: StrictInt | StrictStr = Field(description="the true class: its name or its index")


class FeedbackOut(BaseModel):
    id: str
    correct: bool
    accuracy: float = Field(description="live accuracy over all feedback so far")
    accuracy_ci: list[float] = Field(
        description="its 95% Wilson interval [low, high]: wide for few feedbacks"
    )
    feedback: int = Field(description="feedback received so far")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def validation_detail(errors: list[dict]) -> str:
    """pydantic's errors as one line naming each bad field; the offending input is never echoed back
    (a 9 MB id would come back as 9 MB)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in e['loc'] if part != 'body') or 'body'}: {e['msg']}" for e in errors
    )


def _json(body: bytes, shape: str) -> object:
    """A request body parsed as JSON, or a 400 naming the body and the shape expected."""
    if not body:
        raise HTTPException(400, f"body: empty; send JSON {shape}")
    try:
        return json.loads(body)
    except ValueError as error:  # invalid UTF-8 included
        raise HTTPException(400, f"body: malformed JSON ({error}); send {shape}") from None
    except RecursionError:  # thousands of nested [ or {: no request needs that
        raise HTTPException(400, "body: JSON nested too deeply") from None


async def _multipart_parts(request: Request, settings: ServeSettings) -> list[tuple[str, bytes]]:
    try:
        form = await request.form(max_files=settings.max_images, max_fields=settings.max_images)
    except StarletteHTTPException as error:  # Starlette's words for its limits and for bad multipart
        if "Too many files" in str(error.detail):
            raise _too_many(f"more than {settings.max_images}", settings) from None
        if error.status_code != 400:  # BodyLimit's 413 or 408, raised as the body streams in
            raise
        raise HTTPException(400, f"multipart body: {str(error.detail).rstrip('.')}; {SEND_FILES}") from None
    # python-multipart's parse errors (ValueErrors), which Starlette before 1.x let through: a 500
    except ValueError as error:
        raise HTTPException(400, f"multipart body: {str(error).rstrip('.')}; {SEND_FILES}") from None
    try:
        # a part without a filename is a text field, dropped it would shift the predictions' order
        # (curl -F 'file=<x.png' sends one) or leave an option unread (-F top_k=3)
        if text := next(
            (key for key, value in form.multi_items() if not isinstance(value, UploadFile)), None
        ):
            raise HTTPException(
                422,
                f"multipart field {text[:MAX_ID_CHARS]!r}: a text field, not a file (no filename); "
                f"{SEND_FILES}; options are query parameters (/predict?top_k=3)",
            )
        parts = [
            (f"file {value.filename!r} (field {key!r})", await value.read())
            for key, value in form.multi_items()
        ]
    finally:
        await form.close()
    if not parts:
        raise HTTPException(
            400,
            f"multipart body: no complete file part; {SEND_FILES}, the body ending with its closing boundary",
        )
    return parts


def _too_many(count: str, settings: ServeSettings) -> HTTPException:
    return HTTPException(413, f"body: {count} images, at most {settings.max_images} per request")


def _json_parts(body: bytes, settings: ServeSettings) -> list[tuple[str, bytes]]:
    """A JSON body's base64 images, decoded (on a decode thread: ~130 ms for 9 MB held the event loop)."""
    data = _json(body, IMAGES_SHAPE)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images or not all(isinstance(item, str) for item in images):
        raise HTTPException(422, f"body: expected {IMAGES_SHAPE} with at least one base64 string")
    if unknown := [key for key in data if key != "images"]:  # ignored, a misplaced top_k went unnoticed
        raise HTTPException(
            422,
            f"body: unknown field {unknown[0][:MAX_ID_CHARS]!r}; send {IMAGES_SHAPE} (options are query "
            "parameters: /predict?top_k=3)",
        )
    if len(images) > settings.max_images:  # before decoding any: 3 M empty strings took 3 s to decode
        raise _too_many(str(len(images)), settings)
    parts = []
    for position, text in enumerate(images):
        # without its line breaks: `base64 x.png` and MIME wrap base64 every 76 characters
        text = "".join(DATA_URL.sub("", text, count=1).split())
        try:
            parts.append((f"images[{position}]", base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError) as error:
            raise HTTPException(400, f"images[{position}]: malformed base64 ({error})") from None
    return parts


async def _request_parts(
    request: Request, settings: ServeSettings, decoder: ThreadPoolExecutor
) -> list[tuple[str, bytes]]:
    """The request's image files as (name, bytes), or an HTTPException naming the bad part."""
    media = _media_type(request)
    if request.headers.get("content-length") == "0":
        raise HTTPException(400, "body: empty; send image files as multipart/form-data or base64 in JSON")
    if media == "multipart/form-data":
        parts = await _multipart_parts(request, settings)
    elif media == "application/json":
        body = await request.body()
        parts = await asyncio.get_running_loop().run_in_executor(decoder, _json_parts, body, settings)
    else:
        raise HTTPException(
            415,
            f"content type {media or '(none)'!r}: send multipart/form-data with image files, "
            f"or application/json {IMAGES_SHAPE}",
        )
    if len(parts) > settings.max_images:
        raise _too_many(str(len(parts)), settings)
    return parts


def model_inputs(
    parts: list[tuple[str, bytes]], preprocess: Preprocess, settings: ServeSettings
) -> torch.Tensor:
    """Decode and preprocess one request's images to (n, C, H, W) float model inputs (on a worker thread).

    The request's pixels are counted from the headers before anything is decoded; each image is
    decoded (a large one shrunk while decoding to about twice the model's input size: read_image)
    and preprocessed before the next, so the memory a request costs follows its pixel count only
    while one image decodes, never n × full size.
    """
    try:
        pixels = 0
        for name, raw in parts:
            height, width = image_size(raw, name=name)
            if height * width > settings.max_pixels:
                raise CapasError(
                    f"{name}: {width}×{height} pixels is more than the {settings.max_pixels:,} allowed"
                )
            pixels += height * width
        if pixels > settings.max_request_pixels:
            raise HTTPException(
                413,
                f"body: {pixels:,} pixels in {len(parts)} images, more than the {settings.max_request_pixels:,} "
                "allowed per request; send fewer or smaller images",
            )
        return preprocess.each(
            read_image(raw, name=name, max_pixels=settings.max_pixels, size=preprocess.size)
            for name, raw in parts
        )
    except CapasError as error:
        raise HTTPException(422, str(error)) from None


def overloaded(detail: str) -> HTTPException:
    return HTTPException(503, detail, headers={"Retry-After": str(RETRY_AFTER_S)})


@router.post(
    "/predict",
    response_model=PredictResponse,
    openapi_extra=PREDICT_BODY,
    responses={400: ERROR, 408: ERROR, 413: ERROR, 415: ERROR, 422: ERROR, 503: ERROR},
)
async def predict(
    request: Request,
    state: State,
    top_k: Annotated[
        int | None, Query(ge=1, description="classes listed per image (default: the server's)")
    ] = None,
) -> PredictResponse:
    """Classify one or many images: multipart file(s), or JSON with base64 images."""
    batcher = state.batcher
    if batcher.full():  # refuse before reading the body: an overloaded server must not buffer more
        raise overloaded(f"server busy: {batcher.queued} images wait for the model; retry later")
    with batcher.receiving():
        parts = await _request_parts(request, state.settings, state.decoder)
        # Always off the event loop: a few kilobytes can hold millions of pixels (a palette PNG).
        inputs = await asyncio.get_running_loop().run_in_executor(
            state.decoder, model_inputs, parts, state.run.preprocess, state.settings
        )
    try:
        output = await batcher.predict(inputs)
    except Overloaded as error:
        raise overloaded(f"server busy: {error}; retry later") from None
    classes = state.run.classes
    k = min(top_k or state.settings.top_k, len(classes))
    probabilities = output.probabilities  # (n, classes)
    top_p, top_i = probabilities.topk(k, dim=1)
    indices = probabilities.argmax(1).tolist()
    ids = [uuid.uuid4().hex for _ in range(len(inputs))]
    state.monitor.record_predictions(ids, indices, output.embeddings, output.input_stats)
    return PredictResponse(
        model=state.run.spec.name,
        classes=list(classes),
        predictions=[
            PredictionOut(
                id=i,
                label=classes[index],
                index=index,
                probabilities=p,
                top=[TopClass(label=classes[c], probability=q) for q, c in zip(tp, ti, strict=True)],
            )
            for i, index, p, tp, ti in zip(
                ids, indices, probabilities.tolist(), top_p.tolist(), top_i.tolist(), strict=True
            )
        ],
    )


def _class_index(label: int | str, classes: tuple[str, ...]) -> int:
    if isinstance(label, int):
        if not 0 <= label < len(classes):
            raise HTTPException(422, f"label: {label} is outside the classes 0..{len(classes) - 1}")
        return label
    if label not in classes:
        raise HTTPException(
            422, f"label: {label!r} is not one of the classes {list(classes)}{closest(label, classes)}"
        )
    return classes.index(label)


async def _feedback_body(request: Request) -> FeedbackIn:
    """The body read as /predict reads its own: the media type, a small size limit (checked as it
    streams in), JSON, then the fields, each refusal naming the part that was wrong."""
    media = _media_type(request)
    if media != "application/json":
        raise HTTPException(
            415, f"content type {media or '(none)'!r}: send application/json {FEEDBACK_SHAPE}"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > FEEDBACK_MAX_BYTES:
            raise HTTPException(413, f"body: more than {FEEDBACK_MAX_BYTES:,} bytes; send {FEEDBACK_SHAPE}")
    data = _json(bytes(body), FEEDBACK_SHAPE)
    if not isinstance(data, dict):
        raise HTTPException(422, f"body: expected {FEEDBACK_SHAPE}")
    try:
        return FeedbackIn.model_validate(data)
    except ValidationError as error:
        raise HTTPException(422, validation_detail(error.errors())) from None


@router.post(
    "/feedback",
    response_model=FeedbackOut,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": FeedbackIn.model_json_schema()}},
        }
    },
    responses={400: ERROR, 404: ERROR, 413: ERROR, 415: ERROR, 422: ERROR},
)
async def feedback(request: Request, state: State) -> FeedbackOut:
    """Tell the server the true class of an earlier prediction; it feeds the live accuracy."""
    body = await _feedback_body(request)
    label = _class_index(body.label, state.run.classes)
    monitor = state.monitor
    try:
        correct = monitor.feedback(body.id, label)
    except UnknownPrediction:
        raise HTTPException(
            404,
            f"id: no prediction {body.id!r} awaits feedback (unknown, already answered, or "
            f"older than the last {state.settings.max_predictions:,} predictions)",
        ) from None
    return FeedbackOut(
        id=body.id,
        correct=correct,
        accuracy=monitor.feedback_correct / monitor.feedback_total,
        accuracy_ci=wilson_interval(monitor.feedback_correct, monitor.feedback_total),
        feedback=monitor.feedback_total,
    )


@router.get("/info", response_class=Response, responses={200: {"content": {"application/json": {}}}})
async def info(
    state: State,
    confusion_matrix: Annotated[
        bool,
        Query(
            description="include the test confusion matrix (classes × classes counts: 2 MB for 1,000 classes)"
        ),
    ] = True,
) -> Response:
    """The model: name, spec, classes, parameters, training and test metrics, capas version, serving settings."""
    return Response(state.info[confusion_matrix], media_type="application/json")


@router.get("/health")
async def health(state: State) -> JSONResponse:
    """Liveness and readiness: 200 once the model is loaded and the batcher runs, else 503."""
    ready = state.batcher is not None
    return JSONResponse(
        {"status": "ok" if ready else "starting", "model_loaded": ready, "model": state.run.spec.name},
        status_code=200 if ready else 503,
    )
