"""The FastAPI app over one SpeechLLM: OpenAI-compatible transcription and chat routes with dynamic batching,
hard input limits, Prometheus metrics and the web demo, all in one process.

    app = create_app(osum.load("tiny"), ServeConfig())   # or from a shell: osum serve --model tiny
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from osum import audio as A
from osum import tasks
from osum.config import GenerationConfig, ServeConfig
from osum.infer.engine import Engine, Piece, merge
from osum.serve import formats
from osum.serve.batcher import Batcher, Job, QueueFull, Unavailable
from osum.serve.guard import Guard, error_response
from osum.serve.inputs import ApiError, chat_inputs, generation_for, prompt_lang, read_audio, resolve_task
from osum.serve.metrics import server_metrics

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
FORM_ROOM = 64 * 1024  # multipart boundaries and the small form fields around the file
JSON_ROOM = 64 * 1024  # the chat request around its base64 audio
POLL_SECONDS = 0.2  # how often a waiting request checks that its client is still connected
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; only ever seen in logs and metrics


class ClientGone(Exception):
    """The client disconnected; its work has been cancelled."""


class ChatRequest(BaseModel):
    """OpenAI's chat request, the fields osum understands; any other field is an error (422), not ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: list[dict[str, Any]]
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    user: str | None = None
    osum_task: str | None = None  # osum's extension: a task spec, e.g. "asr+ser+sgc"


class Service:
    """What the routes share: the model, the limits, the batcher and the metrics."""

    def __init__(self, model, settings: ServeConfig):
        self.model = model
        self.settings = settings
        self.model_id = settings.model_id or model.config.name
        self.engine = Engine(model)  # splits long audio into ≤ 30 s pieces exactly as `osum infer` does
        self.metrics = server_metrics()
        self.batcher = Batcher(model, settings.max_batch_size, settings.max_wait_ms, settings.queue_size, self.metrics)
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise ApiError(404, "model_not_found", f"model {name!r} is not served here; this server serves "
                           f"{self.model_id!r}", param="model")

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.settings.request_timeout

    def _timeout(self) -> ApiError:
        return ApiError(504, "timeout", f"the request took longer than request_timeout="
                        f"{self.settings.request_timeout} s; its work was cancelled")

    async def prepare(self, data: bytes, what: str, deadline: float) -> tuple[list[Piece], float]:
        """Check and decode the audio and cut it into pieces with features (in a worker thread)."""

        def work() -> tuple[list[Piece], float]:
            wav = read_audio(data, self.settings, what)
            return self.engine.pieces(wav), len(wav) / A.SAMPLE_RATE

        remaining = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(run_in_threadpool(work), remaining)
        except asyncio.TimeoutError:
            raise self._timeout() from None

    def submit(self, pieces: list[Piece], prompt: str, gen: GenerationConfig, duration: float,
               spec: tasks.TaskSpec | None = None, on_tokens=None) -> Job:
        fields = [f for f in (spec.fields if spec is not None else ()) if f in gen.summary_tags]
        ctc = spec is not None and spec.base == "srwt" and gen.word_times == "ctc"
        job = Job([p.features for p in pieces], self.model.prompts.prompt_ids(prompt), gen,
                  asyncio.get_running_loop(), on_tokens, summary_fields=fields, ctc_words=ctc,
                  spec=spec)
        try:
            self.batcher.submit(job)
        except QueueFull as exc:
            raise ApiError(429, "queue_full", f"the server is busy: {exc}; retry shortly",
                           headers={"Retry-After": "1"}) from exc
        except Unavailable as exc:
            raise ApiError(503, "unavailable", str(exc)) from exc
        self.metrics.inc("osum_audio_seconds_total", duration)
        return job

    async def wait(self, job: Job, request: Request, deadline: float, queue: asyncio.Queue | None = None):
        """The finished job (or, given `queue`, the job's next token event); a client that leaves or a deadline
        that passes cancels the job."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.batcher.cancel(job, "timeout")
                raise self._timeout()
            if queue is not None:
                try:
                    return await asyncio.wait_for(queue.get(), min(POLL_SECONDS, remaining))
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.wait([job.future], timeout=min(POLL_SECONDS, remaining))
            if job.future.done():
                if job.future.cancelled():
                    raise ApiError(503, "unavailable", "the request was cancelled by the server")
                if job.future.exception() is not None:
                    raise ApiError(500, "internal", str(job.future.exception()))
                if queue is None:
                    return job.future.result()
            if await request.is_disconnected():
                self.batcher.cancel(job, "disconnect")
                raise ClientGone()

    def result(self, job: Job, pieces: list[Piece], spec: tasks.TaskSpec | None, duration: float) -> dict:
        """The parsed result of a finished job, in the `osum` field's shape."""
        for piece, work in zip(pieces, job.work):
            piece.text = self.model.tokenizer.decode(work.ids, skip_special_tokens=True)
            piece.labels = work.labels
            piece.words, piece.words_error = work.words, work.words_error
        merged = merge(pieces, spec)
        out = {"task": merged["task"], "transcript": merged["text"], "labels": merged["labels"]}
        for key in ("words", "answer", "segments", "parse_errors"):
            if key in merged:
                out[key] = merged[key]
        out["raw"] = merged["raw"]
        out["duration"] = round(duration, 3)
        return out

    def usage(self, job: Job, pieces: list[Piece], duration: float) -> dict:
        prompt = job.prompt
        audio_tokens = sum(A.llm_positions(p.seconds) + 2 for p in pieces)  # + speech begin/end
        prompt_tokens = len(pieces) * (len(prompt.prefix) + len(prompt.suffix)) + audio_tokens
        completion = sum(len(w.ids) for w in job.work)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"audio_tokens": audio_tokens},
                "audio_seconds": round(duration, 3)}


def _finish_reason(job: Job) -> str:
    return "length" if any(len(w.ids) >= job.generation.max_new_tokens for w in job.work) else "stop"


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(model, settings: ServeConfig | None = None) -> FastAPI:
    """The app serving `model` (put in eval mode) under `settings`; the batching worker runs while it is served."""
    settings = settings or ServeConfig()
    for name in ("max_upload_bytes", "max_audio_seconds", "max_batch_size", "queue_size", "request_timeout"):
        if getattr(settings, name) <= 0:
            raise ValueError(f"serve setting {name} must be positive, got {getattr(settings, name)}")
    model.eval()
    service = Service(model, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        yield
        await run_in_threadpool(service.batcher.close)

    app = FastAPI(title="osum", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    body_limits = {
        "/v1/audio/transcriptions": settings.max_upload_bytes + FORM_ROOM,
        "/v1/chat/completions": -(-settings.max_upload_bytes // 3) * 4 + JSON_ROOM,
    }
    app.add_middleware(Guard, settings=settings, metrics=service.metrics, body_limits=body_limits,
                       default_body_limit=JSON_ROOM)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if not isinstance(exc, ApiError):
            kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
            exc = ApiError(exc.status_code, kind, str(exc.detail), headers=exc.headers)
        return error_response(exc, service.metrics)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        param = ".".join(str(p) for p in exc.errors()[0]["loc"][1:]) if exc.errors() else None
        return error_response(ApiError(422, "invalid_parameters", problems, param=param or None), service.metrics)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not service.batcher.alive:
            return JSONResponse({"status": "unavailable", "model": service.model_id}, status_code=503)
        return JSONResponse({"status": "ok", "model": service.model_id, "queue_depth": service.batcher.depth})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "osum"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict:
        service.check_model(name)
        return model_card()

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
        request: Request,
        file: UploadFile = File(...),
        model: str = Form(...),
        language: str | None = Form(None),
        prompt: str | None = Form(None),
        response_format: str = Form("json"),
        temperature: float | None = Form(None),
        timestamp_granularities: list[str] = Form([], alias="timestamp_granularities[]"),
        stream: bool = Form(False),
        osum_task: str | None = Form(None),
    ) -> Response:
        deadline = service.deadline()
        service.check_model(model)
        if response_format not in formats.RESPONSE_FORMATS:
            raise ApiError(400, "bad_parameter", f"response_format {response_format!r} is not one of "
                           f"{', '.join(formats.RESPONSE_FORMATS)}", param="response_format")
        unknown = sorted(set(timestamp_granularities) - set(formats.GRANULARITIES))
        if unknown:
            raise ApiError(400, "bad_parameter", f"timestamp_granularities {unknown} are not among "
                           f"{', '.join(formats.GRANULARITIES)}", param="timestamp_granularities")
        if timestamp_granularities and response_format != "verbose_json":
            raise ApiError(400, "bad_parameter", "timestamp_granularities need response_format=verbose_json",
                           param="timestamp_granularities")
        if stream:
            raise ApiError(400, "bad_parameter", "streaming transcriptions are not supported; use "
                           "/v1/chat/completions with stream=true", param="stream")
        lang = prompt_lang(language, model_lang(service))
        words = "word" in timestamp_granularities
        if words and osum_task is not None and resolve_task(None, osum_task, lang)[0].base != "srwt":
            raise ApiError(400, "bad_parameter", f"word timestamps come from the srwt task, but osum_task is "
                           f"{osum_task!r}", param="osum_task")
        spec, instruction = resolve_task(prompt, "srwt" if words else (osum_task or "asr"), lang)
        gen = generation_for(service.model.config.generation, settings, temperature=temperature)
        data = await file.read()
        pieces, duration = await service.prepare(data, f"file {file.filename!r}", deadline)
        job = service.submit(pieces, instruction, gen, duration, spec)
        try:
            await service.wait(job, request, deadline)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        result = service.result(job, pieces, spec, duration)
        text = result["transcript"] or ""
        usage = {"type": "duration", "seconds": round(duration, 3)}
        if response_format == "text":
            return PlainTextResponse(text + "\n")
        segs = formats.segments(pieces, [w.ids for w in job.work], spec, gen.temperature if gen.do_sample else 0.0)
        if response_format == "srt":
            return PlainTextResponse(formats.to_srt(segs), media_type="application/x-subrip")
        if response_format == "vtt":
            return PlainTextResponse(formats.to_vtt(segs), media_type="text/vtt")
        if response_format == "json":
            return JSONResponse({"text": text, "usage": usage, "osum": result})
        body: dict[str, Any] = {"task": "transcribe", "language": language or result["labels"].get("language"),
                                "duration": round(duration, 3), "text": text}
        if "segment" in timestamp_granularities or not timestamp_granularities:
            body["segments"] = segs
        if words:
            body["words"] = result.get("words", [])
        body.update(usage=usage, osum=result)
        return JSONResponse(body)

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest) -> Response:
        deadline = service.deadline()
        service.check_model(body.model)
        if body.n != 1:
            raise ApiError(400, "bad_parameter", f"n={body.n}: osum returns one choice", param="n")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(400, "bad_parameter", "give max_tokens or max_completion_tokens, not both",
                           param="max_tokens")
        data, text = chat_inputs(body.messages, settings)
        spec, instruction = resolve_task(text, body.osum_task, model_lang(service))
        gen = generation_for(service.model.config.generation, settings,
                             max_tokens=body.max_completion_tokens or body.max_tokens,
                             temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                             stream=bool(body.stream))
        pieces, duration = await service.prepare(data, "input_audio", deadline)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                stream_chat(service, request, pieces, spec, instruction, gen, duration, deadline,
                            completion_id, created, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        job = service.submit(pieces, instruction, gen, duration, spec)
        try:
            await service.wait(job, request, deadline)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        result = service.result(job, pieces, spec, duration)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": service.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["raw"]},
                         "finish_reason": _finish_reason(job)}],
            "usage": service.usage(job, pieces, duration),
            "osum": result,
        })

    @app.get("/")
    async def demo() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def model_lang(service: Service) -> str:
    return service.model.config.prompt.lang


async def stream_chat(service: Service, request: Request, pieces: list[Piece], spec: tasks.TaskSpec | None,
                      instruction: str, gen: GenerationConfig, duration: float, deadline: float,
                      completion_id: str, created: int, include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks: the role, then text deltas piece by piece in time order, then the finish reason with the
    parsed result, then usage when asked for, then [DONE]. Leaving early cancels the work."""
    queue: asyncio.Queue = asyncio.Queue()
    head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": service.model_id}

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        return _sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

    try:
        job = service.submit(pieces, instruction, gen, duration, spec,
                             on_tokens=lambda i, ids: queue.put_nowait((i, ids)))
    except ApiError as exc:
        yield _sse(error_response(exc, service.metrics).body.decode())
        return
    tokenizer = service.model.tokenizer
    ids: list[list[int]] = [[] for _ in pieces]
    done = [False] * len(pieces)
    current, sent = 0, ""  # the piece being streamed and the text of it already sent
    try:
        yield chunk({"role": "assistant", "content": ""})
        while current < len(pieces):
            index, new = await service.wait(job, request, deadline, queue)
            if new is None:
                done[index] = True
            else:
                ids[index].extend(new)
            while current < len(pieces):
                text = tokenizer.decode(ids[current], skip_special_tokens=True)
                if not done[current] and text.endswith("\ufffd"):
                    break  # a character split across tokens: wait for its other bytes
                if text[len(sent):]:
                    yield chunk({"content": text[len(sent):]})
                    sent = text
                if not done[current]:
                    break
                current, sent = current + 1, ""
                if current < len(pieces):
                    yield chunk({"content": " "})  # pieces join with a space, as the whole reply (`raw`) does
        await service.wait(job, request, deadline)
        result = service.result(job, pieces, spec, duration)
        yield chunk({}, _finish_reason(job), osum=result)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": service.usage(job, pieces, duration)})
        yield _sse("[DONE]")
    except ClientGone:
        return
    except ApiError as exc:
        yield _sse(error_response(exc, service.metrics).body.decode())
    finally:
        # the client left mid-stream (the response task was cancelled): stop its rows at the next step
        if not job.finished:
            service.batcher.cancel(job, "disconnect")


def serve(model, settings: ServeConfig) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model",
                    settings.host)
    uvicorn.run(create_app(model, settings), host=settings.host, port=settings.port, log_level="info")
