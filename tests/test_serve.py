"""The server end to end: a live uvicorn on 127.0.0.1 with the tiny model, called through the official
`openai` client and raw HTTP: every response format, chat with audio and streaming, each input limit,
dynamic batching under 32 concurrent requests, cancellation, and `osum serve` as a subprocess.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import http.client
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile as sf
import torch
import uvicorn

from osum import tasks
from osum.config import GenerationConfig, ServeConfig
from osum.model.speech_llm import SpeechLLM
from osum.serve import formats
from osum.serve.app import create_app
from osum.serve.batcher import Batcher, Job
from osum.serve.inputs import resolve_task
from osum.serve.metrics import server_metrics
from tests.conftest import tiny_config
from tests.test_engine import EXAMPLE, long_file

EXAMPLE_SECONDS = 7.1
ROOT = Path(__file__).resolve().parent.parent


# ---- helpers shared with the browser test ----------------------------------------------------------

@contextmanager
def live_server(model, **settings):
    """uvicorn serving create_app(model, ServeConfig(**settings)) on a free 127.0.0.1 port, in a thread."""
    app = create_app(model, ServeConfig(**settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    # no retries: a 429 or 5xx must reach the test as it was sent
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body bytes) of one raw HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when the series does not exist yet)."""
    _, _, body = request(url, "GET", "/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    series = f"{name}{{{want}}}" if labels else name
    for line in body.decode().splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def read_reply(sock: socket.socket, first: bytes = b"") -> bytes:
    """Everything the server sends until it closes the connection (its 4xx replies say Connection: close)."""
    sock.settimeout(10)
    reply = first
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:  # it closed with our unread bytes in its buffer; its reply came before
            return reply
        if not data:
            return reply
        reply += data


def wait_for(condition, seconds: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def audio_part(path: str | Path, fmt: str = "wav") -> dict:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


SCRIPTED = tasks.Result(
    transcript="hello world", emotion="happy", gender="female", age="adult", style="conversation",
    event="laugh", language="en", words=[tasks.Word("hello", 0.5, 1.25), tasks.Word("world", 1.5, 2.75)],
    answer="nice to meet you",
)


class ScriptedModel:
    """The tiny model with generation replaced by the target of SCRIPTED for the prompt's task, streamed token
    by token: a random model's output parses to nothing, this one exercises words, labels and replies."""

    def __init__(self, model):
        self._model = model
        self.specs = []  # each call's task of each item

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def generate_ids(self, features, feature_lens, prompts, generation=None, streamer=None, stopping_criteria=None,
                     encoded=None, specs=None):
        self.specs.append(specs)
        rows = []
        for p in prompts:
            spec, _ = resolve_task(self._model.tokenizer.decode(p.prefix), None, "en")
            target = tasks.format_target(spec, SCRIPTED) if spec is not None else "a free answer"
            rows.append(self._model.prompts.encode(target))
        if streamer is not None:
            end = self._model.prompts.end_id
            for step in range(max(map(len, rows))):
                streamer.put(torch.tensor([r[step] if step < len(r) else end for r in rows]))
        return rows


# ---- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_model):
    with live_server(tiny_model, max_new_tokens=8, max_wait_ms=5, max_audio_seconds=120) as url:
        yield url


@pytest.fixture(scope="module")
def scripted_server(tiny_model):
    with live_server(ScriptedModel(tiny_model), max_new_tokens=64) as url:
        yield url


# ---- API contract through the openai client ----------------------------------------------------------

def test_models_and_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client(server).models.retrieve("tiny").owned_by == "osum"
    status, _, body = request(server, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_transcription_in_every_format(server):
    api = client(server)
    out = {}
    for fmt in formats.RESPONSE_FORMATS:
        with open(EXAMPLE, "rb") as f:
            out[fmt] = api.audio.transcriptions.create(model="tiny", file=f, response_format=fmt)
    text = out["json"].text
    assert isinstance(text, str) and text  # the random model always says something in 8 tokens
    assert out["json"].usage.seconds == EXAMPLE_SECONDS and out["json"].usage.type == "duration"
    assert out["text"] == text + "\n"
    verbose = out["verbose_json"]
    assert verbose.text == text and verbose.duration == EXAMPLE_SECONDS
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(0.0, EXAMPLE_SECONDS, text)]
    assert len(verbose.segments[0].tokens) == 8
    assert out["srt"] == f"1\n00:00:00,000 --> 00:00:07,100\n{text}\n\n"
    assert out["vtt"] == f"WEBVTT\n\n00:00:00.000 --> 00:00:07.100\n{text}\n\n"


def test_word_and_segment_timestamps(scripted_server):
    with open(EXAMPLE, "rb") as f:
        r = client(scripted_server).audio.transcriptions.create(
            model="tiny", file=f, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert r.text == "hello world" and r.osum["task"] == "srwt"
    assert [(w.word, w.start, w.end) for w in r.words] == [("hello", 0.5, 1.25), ("world", 1.5, 2.75)]
    assert [(s.start, s.end, s.text) for s in r.segments] == [(0.0, EXAMPLE_SECONDS, "hello world")]


def test_the_batcher_passes_each_item_its_task(tiny_model):
    """The batcher tells generate_ids each item's task, which shapes its decoding (joint CTC decoding of a
    transcript, no stop inside one that tags or an answer follow, the tag grammar); a free instruction has none."""
    model = ScriptedModel(tiny_model)
    with live_server(model, max_new_tokens=64) as url:
        api = client(url)
        with open(EXAMPLE, "rb") as f:
            api.audio.transcriptions.create(model="tiny", file=f)
        with open(EXAMPLE, "rb") as f:
            api.audio.transcriptions.create(model="tiny", file=f, response_format="verbose_json",
                                            timestamp_granularities=["word"])
        for task in ("asr+ser", "sttc", "only:ser"):
            api.chat.completions.create(model="tiny", messages=user(audio_part(EXAMPLE)), extra_body={"osum_task": task})
        api.chat.completions.create(model="tiny", messages=user(text_part("Who is talking?"), audio_part(EXAMPLE)))
    assert [[str(s) if s is not None else None for s in specs] for specs in model.specs] == [
        ["asr"], ["srwt"], ["asr+ser"], ["sttc"], ["only:ser"], [None]]


def test_chat_prompt_picks_the_task(scripted_server):
    api = client(scripted_server)
    cases = [
        ("Transcribe the speech and tag the speaker's gender.", "asr+sgc", {"gender": "female"}),
        ("请转写语音，并在末尾标注说话人的情感。", "asr+ser", {"emotion": "happy"}),  # a Chinese prompt
        ("asr+sap+sgc", "asr+sap+sgc", {"age": "adult", "gender": "female"}),
    ]
    for prompt, task, labels in cases:
        r = api.chat.completions.create(model="tiny", messages=user(text_part(prompt), audio_part(EXAMPLE)))
        assert (r.osum["task"], r.osum["labels"], r.osum["transcript"]) == (task, labels, "hello world"), prompt
        assert r.choices[0].message.content == tasks.format_target(task, SCRIPTED)
        assert r.choices[0].finish_reason == "stop"
    r = api.chat.completions.create(model="tiny", messages=user(audio_part(EXAMPLE)), extra_body={"osum_task": "sttc"})
    assert r.osum["answer"] == "nice to meet you" and r.osum["transcript"] == "hello world"
    question = text_part("Who is talking, and why?")
    r = api.chat.completions.create(model="tiny", messages=user(question, audio_part(EXAMPLE)))
    assert r.osum["task"] is None and r.choices[0].message.content == "a free answer"


def test_chat_with_audio_and_streaming(server):
    api = client(server)
    messages = user(text_part("Transcribe this audio."), audio_part(EXAMPLE))
    whole = api.chat.completions.create(model="tiny", messages=messages)
    content = whole.choices[0].message.content
    assert content == whole.osum["raw"] and whole.osum["task"] == "asr"
    assert whole.choices[0].finish_reason == "length"  # a random model never stops within 8 tokens
    assert whole.usage.completion_tokens == 8 and whole.usage.audio_seconds == EXAMPLE_SECONDS
    chunks = list(api.chat.completions.create(model="tiny", messages=messages, stream=True,
                                              stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 4 and "".join(deltas) == content  # token by token, same text as without streaming
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == "length"
    assert final[0].osum == whole.osum
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices


def test_joint_ctc_decoding_streams_what_it_answers_whole():
    """A model whose config decodes transcripts with its CTC head: the streamed transcript equals the whole one,
    and it differs from the LLM alone's (the processor is in the server's generate call)."""
    from tests.test_model import diversify

    model = diversify(SpeechLLM(tiny_config("generation.ctc_weight=0.5"))).eval()
    messages = user(text_part("Transcribe this audio."), audio_part(EXAMPLE))
    with live_server(model, max_new_tokens=8) as url:
        api = client(url)
        whole = api.chat.completions.create(model="tiny", messages=messages)
        chunks = list(api.chat.completions.create(model="tiny", messages=messages, stream=True))
    content = whole.choices[0].message.content
    assert whole.osum["task"] == "asr" and content
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content) == content
    model.config.generation = dataclasses.replace(model.config.generation, ctc_weight=0.0)
    with live_server(model, max_new_tokens=8) as url:
        alone = client(url).chat.completions.create(model="tiny", messages=messages)
    assert alone.choices[0].message.content != content


def test_long_audio_is_chunked_not_truncated(server, tmp_path):
    path = long_file(tmp_path / "long.wav", 70.0)
    with open(path, "rb") as f:
        r = client(server).audio.transcriptions.create(model="tiny", file=f, response_format="verbose_json")
    assert r.duration == 70.0 and r.usage.seconds == 70.0
    spans = [(s.start, s.end) for s in r.segments]
    assert len(spans) >= 3 and spans[0][0] == 0.0 and spans[-1][1] == 70.0
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and all(e - s <= 30.0 for s, e in spans)
    assert r.osum["segments"] == [list(s) for s in spans]


# ---- hardening ---------------------------------------------------------------------------------------

def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_bad_audio_is_400_naming_the_problem(server, bad_audio_files, tmp_path):
    api = client(server)
    empty, text = bad_audio_files
    for path, words in ((empty, "empty (0 bytes)"), (text, "not a readable audio file")):
        with open(path, "rb") as f:
            err = error_of(lambda: api.audio.transcriptions.create(model="tiny", file=f))
        assert err.status_code == 400 and words in err.message and Path(path).name in err.message
    silent = tmp_path / "zero.wav"
    sf.write(silent, np.zeros(0, dtype=np.float32), 16000)
    err = error_of(lambda: api.chat.completions.create(model="tiny", messages=user(audio_part(silent))))
    assert err.status_code == 400 and "no samples" in err.message
    bad64 = {"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}
    err = error_of(lambda: api.chat.completions.create(model="tiny", messages=user(bad64)))
    assert err.status_code == 400 and "base64" in err.message


def test_a_beam_model_streams_and_samples_one_candidate():
    """A model whose settings search beams keeps them for a plain request; a streamed one (tokens as they come) and
    one that samples (temperature > 0: one drawn sequence, as OpenAI's API) decode a single candidate."""
    from osum.serve.inputs import generation_for

    base = GenerationConfig(num_beams=4, max_new_tokens=50)
    settings = ServeConfig()
    assert generation_for(base, settings).num_beams == 4
    assert generation_for(base, settings, temperature=0).num_beams == 4
    assert generation_for(base, settings, stream=True).num_beams == 1
    sampled = generation_for(base, settings, temperature=0.7)
    assert (sampled.num_beams, sampled.do_sample, sampled.temperature) == (1, True, 0.7)
    assert base.num_beams == 4  # the model's own settings are left as they are


def test_a_beam_model_served_searches_plain_requests_and_streams_one_candidate():
    """Through the app: a plain chat request and a transcription decode with the model's beams, a streamed request
    with one candidate whose text arrives token by token."""
    import itertools

    model = SpeechLLM(tiny_config("generation.num_beams=2")).eval()
    beams = []
    generate_ids = model.generate_ids

    def spy(*args, **kwargs):
        beams.append(args[3].num_beams)  # (features, lengths, prompts, generation, ...)
        return generate_ids(*args, **kwargs)

    model.generate_ids = spy
    messages = user(text_part("Transcribe this audio."), audio_part(EXAMPLE))
    with live_server(model, max_new_tokens=8) as url:
        api = client(url)
        whole = api.chat.completions.create(model="tiny", messages=messages)
        chunks = list(api.chat.completions.create(model="tiny", messages=messages, stream=True))
        with open(EXAMPLE, "rb") as f:
            api.audio.transcriptions.create(model="tiny", file=f)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert whole.choices[0].message.content and len(deltas) >= 4
    assert [n for n, _ in itertools.groupby(beams)] == [2, 1, 2]  # a loop guard's second try keeps its request's


def test_unknown_task_and_bad_parameters(server):
    api = client(server)
    audio = audio_part(EXAMPLE)
    cases = [
        (dict(messages=user(audio), extra_body={"osum_task": "asr+dance"}), 400, "unknown task 'dance'"),
        (dict(messages=user(audio), max_tokens=9), 400, "max_tokens=9 is outside 1..8"),
        (dict(messages=user(audio), extra_body={"max_tokens": "many"}), 422, "max_tokens"),
        (dict(messages=user(audio), extra_body={"frequency_penalty": 1}), 422, "frequency_penalty"),
        (dict(messages=user(audio_part(EXAMPLE, "aac"))), 400, "'aac' is not one of wav, mp3, flac, ogg"),
        (dict(messages=user(text_part("hi"))), 400, "one input_audio part, got 0"),
        (dict(messages=[{"role": "system", "content": "be nice"}, *user(audio)]), 400, "exactly one user message"),
    ]
    for kwargs, status, words in cases:
        err = error_of(lambda: api.chat.completions.create(model="tiny", **kwargs))
        assert err.status_code == status and words in err.message, (kwargs.get("extra_body"), err.message)
    err = error_of(lambda: api.chat.completions.create(model="whisper-1", messages=user(audio)))
    assert err.status_code == 404 and "'whisper-1' is not served here" in err.message
    with open(EXAMPLE, "rb") as f:
        for kwargs, words in [
            (dict(response_format="xml"), "response_format 'xml'"),
            (dict(response_format="json", timestamp_granularities=["word"]), "need response_format=verbose_json"),
            (dict(extra_body={"osum_task": "srwt+ser"}), "cannot be combined"),
        ]:
            f.seek(0)
            err = error_of(lambda: api.audio.transcriptions.create(model="tiny", file=f, **kwargs))
            assert err.status_code == 400 and words in err.message, err.message
    assert metric(server, "osum_errors_total", kind="unknown_task") >= 2


def test_upload_and_duration_caps(tiny_model, tmp_path):
    with live_server(tiny_model, max_new_tokens=4, max_upload_bytes=200_000, max_audio_seconds=5) as url:
        api = client(url)
        with open(EXAMPLE, "rb") as f:  # 227 KB
            err = error_of(lambda: api.audio.transcriptions.create(model="tiny", file=f))
        assert err.status_code == 413 and "max_upload_bytes=200000" in err.message
        short = tmp_path / "six_seconds.flac"
        sf.write(short, np.zeros(6 * 16000, dtype=np.float32), 16000)
        err = error_of(lambda: api.chat.completions.create(model="tiny", messages=user(audio_part(short, "flac"))))
        assert err.status_code == 413 and "lasts 6.0 s; the limit is max_audio_seconds=5" in err.message

        # chunked, without Content-Length: the cap is counted as the bytes arrive, and the 413 comes back
        # before the client has sent much more than the limit
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
            preamble = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: multipart/form-data; boundary=x\r\n\r\n"
                         + b"%x\r\n" % len(preamble) + preamble + b"\r\n")
            sock.settimeout(0.2)
            sent, reply = 0, b""
            while not reply and sent < 4_000_000:
                try:
                    sock.sendall(b"10000\r\n" + b"\0" * 65536 + b"\r\n")
                    sent += 65536
                    reply = sock.recv(65536)
                except socket.timeout:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break  # the server closed after answering; the answer is waiting to be read
            reply = read_reply(sock, reply)
        assert reply.startswith(b"HTTP/1.1 413") and b"passed 265536 bytes" in reply
        assert sent < 265536 + 4 * 65536
        assert metric(url, "osum_errors_total", kind="upload_too_large") == 2


def test_api_key_guards_every_route_but_health(tiny_model):
    with live_server(tiny_model, max_new_tokens=4, api_key="s3cret") as url:
        assert request(url, "GET", "/health")[0] == 200
        for path in ("/v1/models", "/metrics", "/", "/static/app.js"):
            status, headers, _ = request(url, "GET", path)
            assert status == 401, path
            assert headers["www-authenticate"].startswith("Bearer" if path.startswith("/v1/") else "Basic")
            assert request(url, "GET", path, headers={"Authorization": "Bearer wrong"})[0] == 403
            assert request(url, "GET", path, headers={"Authorization": "Bearer s3cret"})[0] == 200
        basic = base64.b64encode(b"anyone:s3cret").decode()  # what a browser sends after its login box
        assert request(url, "GET", "/", headers={"Authorization": f"Basic {basic}"})[0] == 200
        err = error_of(lambda: client(url, "wrong").models.list())
        assert err.status_code == 403 and "API key is wrong" in err.message
        with open(EXAMPLE, "rb") as f:
            assert client(url, "s3cret").audio.transcriptions.create(model="tiny", file=f, response_format="text")


def test_timeout_and_full_queue(tiny_model):
    with live_server(tiny_model, max_new_tokens=5000, queue_size=1, request_timeout=2.0) as url:
        api = client(url)
        slow = ThreadPoolExecutor(1).submit(
            lambda: error_of(lambda: api.chat.completions.create(model="tiny", messages=user(audio_part(EXAMPLE)))))
        wait_for(lambda: metric(url, "osum_queue_depth") == 1, what="the first request to be admitted")
        with open(EXAMPLE, "rb") as f:
            err = error_of(lambda: api.audio.transcriptions.create(model="tiny", file=f))
        assert err.status_code == 429 and "queue_size=1" in err.message and err.response.headers["retry-after"] == "1"
        err = slow.result(timeout=30)
        assert err.status_code == 504 and "request_timeout=2.0" in err.message
        wait_for(lambda: metric(url, "osum_batches_total") == 1, what="the cancelled batch to end")
        assert metric(url, "osum_cancelled_total", reason="timeout") == 1
        assert metric(url, "osum_generated_tokens_total") < 5000  # stopped early, not run to the end
        assert metric(url, "osum_queue_depth") == 0
        # a body that trickles in is cut off at the same deadline
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"model\": ")
            started = time.monotonic()
            head = read_reply(sock).decode("latin-1")
        assert head.startswith("HTTP/1.1 408") and "request_timeout=2.0" in head
        assert 1.0 < time.monotonic() - started < 5.0


# ---- batching and cancellation -----------------------------------------------------------------------

def test_32_concurrent_requests_are_batched(server):
    api = client(server)
    clips = [EXAMPLE, "examples/asterisk_weasels_8k.wav", "examples/espeak_female_weather.wav"]
    batches_before = metric(server, "osum_batches_total")
    pieces_before = metric(server, "osum_batch_size_sum")

    def one(i: int) -> str:
        with open(clips[i % len(clips)], "rb") as f:
            return api.audio.transcriptions.create(model="tiny", file=f, response_format="text")

    with ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(one, range(32)))
    assert len(texts) == 32 and all(isinstance(t, str) and t.endswith("\n") for t in texts)
    batches = metric(server, "osum_batches_total") - batches_before
    assert metric(server, "osum_batch_size_sum") - pieces_before == 32
    assert batches < 32  # merged: some batch held more than one request
    assert metric(server, "osum_batch_size_bucket", le="1") < metric(server, "osum_batch_size_count")
    assert metric(server, "osum_requests_total", route="/v1/audio/transcriptions", status="200") >= 32


def test_disconnected_clients_are_cancelled(tiny_model):
    with live_server(tiny_model, max_new_tokens=5000) as url:
        body = json.dumps({"model": "tiny", "stream": True, "messages": user(audio_part(EXAMPLE))}).encode()
        conn = http.client.HTTPConnection(url.removeprefix("http://").split(":")[0], int(url.rsplit(":", 1)[1]))
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        events = 0
        while events < 4:  # the role chunk and three tokens
            events += response.readline().startswith(b"data: ")
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        left = time.monotonic()
        wait_for(lambda: metric(url, "osum_batches_total") == 1, what="the streaming batch to end")
        assert time.monotonic() - left < 5  # 5000 tokens take far longer
        assert metric(url, "osum_cancelled_total", reason="disconnect") == 1
        assert metric(url, "osum_generated_tokens_total") < 2000 and metric(url, "osum_queue_depth") == 0

        # without streaming: the client gives up while its request is generating
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        body = json.dumps({"model": "tiny", "messages": user(audio_part(EXAMPLE))}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        wait_for(lambda: metric(url, "osum_queue_depth") == 1, what="the request to be admitted")
        sock.close()
        wait_for(lambda: metric(url, "osum_cancelled_total", reason="disconnect") == 2, what="the second cancel")
        wait_for(lambda: metric(url, "osum_batches_total") == 2, what="the second batch to end")
        assert metric(url, "osum_generated_tokens_total") < 4000


# ---- `osum serve` in its own process: default bind, and memory that stays flat under attack ----------

def peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


def streaminfo_without_length(flac: bytes) -> bytes:
    """The same FLAC with STREAMINFO's total-samples field zeroed ("unknown", as a streamed encoder writes)."""
    b = bytearray(flac)
    assert b[:4] == b"fLaC"
    field = 8 + 13  # the 36-bit count starts in the low nibble of STREAMINFO byte 13
    b[field] &= 0xF0
    b[field + 1: field + 5] = b"\0\0\0\0"
    return bytes(b)


def test_cli_server_memory_stays_flat(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "osum.cli", "serve", "--model", "tiny", "--port", str(port),
                             "--max-new-tokens", "4"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                return request(url, "GET", "/health")[0] == 200
            except OSError:
                return False

        wait_for(up, seconds=120, what="osum serve to start")
        assert f"Uvicorn running on http://127.0.0.1:{port}" in (tmp_path / "server.log").read_text()
        with open(EXAMPLE, "rb") as f:  # warm up every code path once before measuring
            assert client(url).audio.transcriptions.create(model="tiny", file=f, response_format="text")
        before = peak_rss_kib(proc.pid)

        # 30 MB announced: the 413 comes back after the first 64 KiB, the rest is never sent
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 31457280\r\n\r\n")
            sock.sendall(b"--b\r\n" + b"\0" * 65536)
            head = read_reply(sock).decode("latin-1")
        assert head.startswith("HTTP/1.1 413") and "max_upload_bytes=26214400" in head

        # two hours of digital silence: 180 KB of FLAC that would decode to 460 MB of float32
        hours = io.BytesIO()
        with sf.SoundFile(hours, "w", samplerate=8000, channels=1, format="FLAC", subtype="PCM_16") as f:
            minute = np.zeros(8000 * 60, dtype=np.int16)
            for _ in range(120):
                f.write(minute)
        flac = hours.getvalue()
        assert len(flac) < 300_000
        api = client(url)
        err = error_of(lambda: api.audio.transcriptions.create(model="tiny", file=("long.flac", flac)))
        assert err.status_code == 413 and "lasts 7200.0 s; the limit is max_audio_seconds=1800.0" in err.message
        err = error_of(lambda: api.audio.transcriptions.create(
            model="tiny", file=("stream.flac", streaminfo_without_length(flac))))
        assert err.status_code == 400 and "does not state its length" in err.message
        assert peak_rss_kib(proc.pid) - before < 20_000  # KiB: no buffered upload, no decoded hours
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


# ---- pieces ------------------------------------------------------------------------------------------

def test_batcher_merges_only_same_settings():
    calls = []

    class Recorder:
        device = torch.device("cpu")

        def stop_ids(self, gen):
            return [0]

        def encode(self, features, feature_lens):
            return None  # nothing to share: this stand-in reads no audio

        def generate_ids(self, features, feature_lens, prompts, generation, streamer=None, stopping_criteria=None,
                         encoded=None, specs=None):
            calls.append((len(prompts), generation.max_new_tokens))
            return [[7] * generation.max_new_tokens for _ in prompts]

    async def main() -> list[Job]:
        batcher = Batcher(Recorder(), max_batch_size=2, max_wait_ms=500, queue_size=8, metrics=server_metrics())
        batcher.start()
        loop = asyncio.get_running_loop()
        feats = [torch.zeros(100, 80)]
        # the loop guard off: the recorder's rows repeat one token, and it has no tokenizer to read them
        jobs = [Job(feats, "p", GenerationConfig(max_new_tokens=n, compression_ratio_threshold=None), loop)
                for n in (3, 5, 3, 3)]
        for job in jobs:
            batcher.submit(job)
        done = await asyncio.gather(*(j.future for j in jobs))
        await asyncio.to_thread(batcher.close)
        return done

    jobs = asyncio.run(main())
    assert [j.work[0].ids for j in jobs] == [[7] * 3, [7] * 5, [7] * 3, [7] * 3]
    # the first two max_new_tokens=3 pieces share a batch; the 5-token piece and the third 3 go alone
    assert sorted(calls) == [(1, 3), (1, 5), (2, 3)]


def test_resolve_task():
    assert resolve_task(None, None, "en") == (tasks.parse_spec("asr"), "Transcribe this audio.")
    assert resolve_task("  transcribe THIS audio. ", None, "en")[0] == tasks.parse_spec("asr")
    only = tasks.parse_spec("only:ser")
    assert resolve_task("Only:SER", None, "zh") == (only, tasks.default_prompt(only, "zh"))
    assert resolve_task("What is the weather?", None, "en") == (None, "What is the weather?")
    assert resolve_task("Say it", "asr+lid", "en") == (tasks.parse_spec("asr+lid"), "Say it")
    for spec in tasks.all_specs():  # every fixed prompt of every task is recognised
        for lang in tasks.PROMPT_LANGS:
            assert all(resolve_task(p, None, lang)[0] == spec for p in tasks.prompts(spec, lang))


def test_subtitles_and_metrics_text():
    segs = [{"start": 0.0, "end": 2.5, "text": "a"}, {"start": 3661.5, "end": 3662.004, "text": "b"}]
    assert formats.to_srt(segs) == "1\n00:00:00,000 --> 00:00:02,500\na\n\n2\n01:01:01,500 --> 01:01:02,004\nb\n\n"
    assert formats.to_vtt(segs[1:]) == "WEBVTT\n\n01:01:01.500 --> 01:01:02.004\nb\n\n"
    m = server_metrics()
    m.inc("osum_errors_total", kind='say "hi"')
    for size in (1, 3, 3, 200):
        m.observe("osum_batch_size", size)
    text = m.render()
    assert 'osum_errors_total{kind="say \\"hi\\""} 1' in text
    assert 'osum_batch_size_bucket{le="1"} 1\n' in text and 'osum_batch_size_bucket{le="4"} 3\n' in text
    assert 'osum_batch_size_bucket{le="+Inf"} 4\n' in text and "osum_batch_size_sum 207\n" in text
    assert "# TYPE osum_request_seconds histogram" in text and "osum_queue_depth 0\n" in text


def test_summary_tags_give_the_served_labels():
    """generation.summary_tags in the model's config: the server's gender label is the voice summary's (as
    `osum infer` gives it), streamed or not, while the text is the LLM's."""
    from osum.audio import load_audio, log_mel_spectrogram
    from osum.model.speech_llm import SpeechLLM
    from tests.conftest import tiny_config

    model = SpeechLLM(tiny_config("adaptor.summary_layers=[0,1]", "generation.max_new_tokens=6",
                                  "generation.summary_tags=[gender]")).eval()
    with torch.no_grad():
        model.summary.proj.weight.normal_(0, 0.5)
    mel = log_mel_spectrogram(load_audio(EXAMPLE)).T[None]
    want = model.summary_labels(mel, torch.tensor([mel.shape[1]]), ["gender"])[0]["gender"]
    with live_server(model) as url:
        api = client(url)
        messages = user(text_part("Transcribe the speech and tag the speaker's gender."), audio_part(EXAMPLE))
        r = api.chat.completions.create(model="tiny", messages=messages)
        assert r.osum["task"] == "asr+sgc" and r.osum["labels"] == {"gender": want}
        assert tasks.missing_tag_error("gender") not in r.osum.get("parse_errors", [])
        chunks = list(api.chat.completions.create(model="tiny", messages=messages, stream=True))
        last = [c for c in chunks if getattr(c, "osum", None)]
        assert last and last[-1].osum["labels"] == {"gender": want}
        r = api.chat.completions.create(model="tiny", messages=user(text_part("Transcribe the audio."),
                                                                  audio_part(EXAMPLE)))
        assert r.osum["labels"] == {}  # asr asks for no tag: the summary is not consulted


def test_word_timestamps_from_ctc_match_the_engine():
    """generation.word_times "ctc": the words a transcription request with word timestamps gets are the CTC
    alignment `osum infer` gives for the same text, and the LLM's missing spans are no parse errors."""
    from osum.infer.engine import Engine
    from osum.model.speech_llm import SpeechLLM
    from tests.conftest import tiny_config

    model = SpeechLLM(tiny_config("generation.max_new_tokens=8", "generation.word_times=ctc",
                                  "generation.ctc_time_offsets=[-0.1,0.05]")).eval()
    (want,) = Engine(model).run([EXAMPLE], task="srwt")
    assert want["words"]
    with live_server(model) as url, open(EXAMPLE, "rb") as f:
        r = client(url).audio.transcriptions.create(model="tiny", file=f, response_format="verbose_json",
                                                    timestamp_granularities=["word"])
    assert r.osum["raw"] == want["raw"]
    assert [(w.word, w.start, w.end) for w in r.words] == [(w["word"], w["start"], w["end"]) for w in want["words"]]
    assert not any(tasks.is_span_error(e) for e in r.osum.get("parse_errors", []))


class LoopingModel(ScriptedModel):
    """Writes a loop unless decoding with a repetition penalty of at least 1.3; records each call's penalty."""

    def __init__(self, model):
        super().__init__(model)
        self.penalties = []

    def generate_ids(self, features, feature_lens, prompts, generation=None, streamer=None, stopping_criteria=None,
                     encoded=None, specs=None):
        self.penalties.append(generation.repetition_penalty)
        text = "a plain answer" if generation.repetition_penalty >= 1.3 else "a kind of " * 30
        rows = [self._model.prompts.encode(text) for _ in prompts]
        if streamer is not None:
            for step in range(len(rows[0])):
                streamer.put(torch.tensor([r[step] for r in rows]))
        return rows


def test_server_decodes_looping_answers_again_unless_already_streamed(tiny_model):
    """The engine's loop guard in the server: a looping answer is decoded again with each fallback penalty in
    turn (counted in /metrics); a streamed one keeps the text its client already received."""
    model = LoopingModel(tiny_model)
    with live_server(model, max_wait_ms=5) as url:
        api = client(url)
        messages = user(text_part("Transcribe the audio."), audio_part(EXAMPLE))
        r = api.chat.completions.create(model="tiny", messages=messages)
        assert r.choices[0].message.content == "a plain answer" and model.penalties == [1.0, 1.1, 1.3]
        assert metric(url, "osum_redecoded_pieces_total") == 1
        chunks = list(api.chat.completions.create(model="tiny", messages=messages, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed.startswith("a kind of a kind of") and model.penalties[3:] == [1.0]
