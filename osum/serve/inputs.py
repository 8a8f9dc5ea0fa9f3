"""Request inputs, checked before any work: audio within the byte and duration caps, the task a prompt
names, chat messages, and decoding parameters. Every rejection is an ApiError naming the problem.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from functools import lru_cache

import numpy as np
from starlette.exceptions import HTTPException

from osum import audio as A
from osum import tasks
from osum.config import GenerationConfig, ServeConfig

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")  # what chat `input_audio.format` may say; libsndfile sniffs the rest
# A header that does not know its length (a streamed FLAC) makes libsndfile report 2**63 - 1 frames.
UNKNOWN_LENGTH_SECONDS = 1e12


class ApiError(HTTPException):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}; `kind` is the code."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.kind = kind
        self.param = param

    def body(self) -> dict:
        error_type = "invalid_request_error" if self.status_code < 500 else "server_error"
        return {"error": {"message": self.detail, "type": error_type, "param": self.param, "code": self.kind}}


def read_audio(data: bytes, settings: ServeConfig, what: str) -> np.ndarray:
    """Bytes → 16 kHz mono float32, refusing what is too big before decoding it.

    The duration comes from the header (`audio_info` decodes nothing); libsndfile then reads at most the
    frames the header states, so a file cannot decode to more than the duration checked here.
    """
    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, "upload_too_large",
                       f"{what} is {len(data)} bytes; the limit is max_upload_bytes={settings.max_upload_bytes}")
    if not data:
        raise ApiError(400, "empty_audio", f"{what} is empty (0 bytes)")
    try:
        info = A.audio_info(data)
    except A.AudioError as exc:
        raise ApiError(400, "unreadable_audio", f"{what}: {exc}") from exc
    if info.duration >= UNKNOWN_LENGTH_SECONDS:
        raise ApiError(400, "unknown_duration",
                       f"{what}: the file header does not state its length, so max_audio_seconds="
                       f"{settings.max_audio_seconds} cannot be checked before decoding; re-encode it with a length")
    if info.duration > settings.max_audio_seconds:
        raise ApiError(413, "audio_too_long", f"{what} lasts {info.duration:.1f} s; the limit is "
                       f"max_audio_seconds={settings.max_audio_seconds}")
    try:
        return A.load_audio(data)
    except A.AudioError as exc:
        raise ApiError(400, "unreadable_audio", f"{what}: {exc}") from exc


def decode_base64_audio(data: object, settings: ServeConfig) -> bytes:
    if not isinstance(data, str):
        raise ApiError(400, "bad_audio", "input_audio.data must be a base64 string", param="input_audio.data")
    # 4 characters carry 3 bytes: refuse an oversized payload before decoding it
    if len(data) // 4 * 3 > settings.max_upload_bytes + 2:
        raise ApiError(413, "upload_too_large",
                       f"input_audio.data holds about {len(data) // 4 * 3} bytes; the limit is "
                       f"max_upload_bytes={settings.max_upload_bytes}", param="input_audio.data")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "bad_audio", f"input_audio.data is not valid base64 ({exc})",
                       param="input_audio.data") from exc


@lru_cache(maxsize=1)
def prompt_index() -> dict[str, tasks.TaskSpec]:
    """Every fixed prompt of every task (English and Chinese), normalised, → its spec."""
    return {_normalize(p): spec for spec in tasks.all_specs() for lang in tasks.PROMPT_LANGS
            for p in tasks.prompts(spec, lang)}


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


_SPEC_LIKE = re.compile(r"^[a-z:+ ]+$")


def resolve_task(text: str | None, osum_task: str | None, lang: str) -> tuple[tasks.TaskSpec | None, str]:
    """(spec, prompt): an explicit task wins; else the text is a task's fixed prompt, a spec (`asr+ser`),
    or a free instruction (spec None: the output layout is inferred when parsing). No text means asr."""
    text = (text or "").strip()
    if osum_task is not None:
        try:
            spec = tasks.parse_spec(osum_task)
        except ValueError as exc:
            raise ApiError(400, "unknown_task", str(exc), param="osum_task") from exc
        return spec, text or tasks.default_prompt(spec, lang)
    if not text:
        spec = tasks.parse_spec("asr")
        return spec, tasks.default_prompt(spec, lang)
    spec = prompt_index().get(_normalize(text))
    if spec is not None:
        return spec, text
    if _SPEC_LIKE.match(text.lower()):
        try:
            spec = tasks.parse_spec(text)
        except ValueError:
            spec = None
        if spec is not None:
            return spec, tasks.default_prompt(spec, lang)
    return None, text


def prompt_lang(language: str | None, default: str) -> str:
    """Chinese prompts for Chinese audio (zh, yue), English prompts for every other language."""
    if language is None:
        return default
    if not re.fullmatch(r"[a-z]{2,3}", language):
        raise ApiError(400, "bad_parameter", f"language {language!r} is not an ISO 639 code such as 'en' or 'zh'",
                       param="language")
    return "zh" if language in ("zh", "yue") else "en"


def chat_inputs(messages: list[dict], settings: ServeConfig) -> tuple[bytes, str]:
    """(audio bytes, text) of a single-turn chat: one user message with one `input_audio` part and any text."""
    if not messages:
        raise ApiError(400, "bad_messages", "messages is empty", param="messages")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles != ["user"]:
        raise ApiError(400, "bad_messages",
                       f"expected exactly one user message (single turn: the instruction goes in its text), "
                       f"got roles {roles}", param="messages")
    content = messages[0].get("content")
    if isinstance(content, str) or content is None:
        raise ApiError(400, "missing_audio", "the user message needs an input_audio content part", param="messages")
    if not isinstance(content, list):
        raise ApiError(400, "bad_messages", "message content must be a string or a list of parts", param="messages")
    texts, audios = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "input_audio" and isinstance(part.get("input_audio"), dict):
            audios.append(part["input_audio"])
        else:
            raise ApiError(400, "bad_messages",
                           f"unsupported content part {kind!r}; use 'text' and 'input_audio' parts", param="messages")
    if len(audios) != 1:
        raise ApiError(400, "missing_audio" if not audios else "bad_messages",
                       f"expected one input_audio part, got {len(audios)}", param="messages")
    fmt = audios[0].get("format")
    if fmt not in AUDIO_FORMATS:
        raise ApiError(400, "bad_audio", f"input_audio.format {fmt!r} is not one of {', '.join(AUDIO_FORMATS)}",
                       param="input_audio.format")
    return decode_base64_audio(audios[0].get("data"), settings), "\n".join(texts)


def generation_for(
    base: GenerationConfig,
    settings: ServeConfig,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stream: bool = False,
) -> GenerationConfig:
    """The model's decoding settings with a request's overrides; max_tokens may not pass the server's ceiling.

    A model whose settings search several beams (num_beams > 1) decodes one candidate for a streamed request, whose
    tokens must reach the client as they come, and for one that asks to sample (temperature > 0), which draws one
    sequence as OpenAI's API does."""
    ceiling = settings.max_new_tokens or base.max_new_tokens
    gen = dataclasses.replace(base, max_new_tokens=ceiling, stop_tokens=list(base.stop_tokens))
    if max_tokens is not None:
        if not 1 <= max_tokens <= ceiling:
            raise ApiError(400, "bad_parameter",
                           f"max_tokens={max_tokens} is outside 1..{ceiling} (this server's max_new_tokens)",
                           param="max_tokens")
        gen.max_new_tokens = max_tokens
    if temperature is not None:
        if not 0 <= temperature <= 2:
            raise ApiError(400, "bad_parameter", f"temperature={temperature} is outside 0..2", param="temperature")
        gen.do_sample = temperature > 0
        gen.temperature = temperature if temperature > 0 else base.temperature
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ApiError(400, "bad_parameter", f"top_p={top_p} is outside (0, 1]", param="top_p")
        gen.top_p = top_p
    if seed is not None:
        gen.seed = seed
    if stream or (temperature is not None and temperature > 0):
        gen.num_beams = 1
    return gen
