"""Dynamic batching: every request's audio pieces wait in one queue, and a worker thread merges them into
batched `generate_ids` calls of at most `max_batch_size` pieces, the oldest waiting at most `max_wait_ms`.

Tokens stream back to the request's event loop as they are generated; a cancelled request's rows stop at
the next decoding step (a stopping criterion), and its waiting pieces never reach the model.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from osum import tasks
from osum.config import GenerationConfig
from osum.infer.engine import ctc_words, redecode_loops
from osum.model.prompt import PromptIds
from osum.serve.metrics import Metrics

log = logging.getLogger(__name__)

# Called on the request's event loop: (piece index, new token ids), or (piece index, None) when it is done.
TokenCallback = Callable[[int, "list[int] | None"], None]


class QueueFull(Exception):
    """More requests than `queue_size` are admitted; the caller should retry later."""


class Unavailable(Exception):
    """The batcher is not running (not started, shutting down, or its worker died)."""


@dataclass(eq=False)
class Work:
    """One ≤ 30 s piece of a job: what the model sees and what it generated."""

    job: "Job"
    index: int
    features: torch.Tensor  # (T, n_mels)
    ids: list[int] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # read off the voice summary (Job.summary_fields)
    words: list[tasks.Word] | None = None  # timed by the CTC alignment (Job.ctc_words)
    words_error: str | None = None
    done: bool = False


class Job:
    """One request: its pieces, prompt and generation settings, cancel flag, and the event loop to report to."""

    def __init__(
        self,
        features: list[torch.Tensor],
        prompt: str | PromptIds,
        generation: GenerationConfig,
        loop: asyncio.AbstractEventLoop,
        on_tokens: TokenCallback | None = None,
        summary_fields: list[str] | None = None,
        ctc_words: bool = False,
        spec: tasks.TaskSpec | None = None,
    ):
        if not features:
            raise ValueError("a job needs at least one piece of audio")
        self.work = [Work(self, i, f) for i, f in enumerate(features)]
        self.prompt = prompt
        self.summary_fields = list(summary_fields or [])  # tag fields whose labels the voice summary gives
        self.ctc_words = ctc_words  # srwt words timed by the CTC alignment (generation.word_times "ctc")
        self.spec = spec  # the task, which shapes decoding (SpeechLLM.generate_ids); None: a free instruction
        self.generation = generation
        # Only pieces with identical decoding settings can share one generate call.
        self.key = json.dumps(dataclasses.asdict(generation), sort_keys=True)
        self.loop = loop
        self.future: asyncio.Future[Job] = loop.create_future()
        self.on_tokens = on_tokens
        self.cancelled: str | None = None  # the reason, once cancelled
        self.finished = False  # its queue slot is released
        self.enqueued = 0.0

    def call(self, fn: Callable, *args) -> None:
        """Run `fn(*args)` on the job's event loop; a loop that has closed has nobody left to tell."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            log.debug("event loop closed; dropping a notification for a finished request")


def _resolve(future: asyncio.Future, value: object = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class _Streamer(BaseStreamer):
    """Hands each row's new tokens to its job until the row's first stop token (HF streamer protocol)."""

    def __init__(self, batch: list[Work], stop_ids: set[int]):
        self.batch = batch
        self.stop_ids = stop_ids
        self.ended = [False] * len(batch)

    def put(self, value: torch.Tensor) -> None:
        if value.dim() != 1:
            return  # generate first hands over the prompt ids (B, 0): nothing new
        for i, token in enumerate(value.tolist()):
            work = self.batch[i]
            if self.ended[i] or work.job.cancelled:
                continue
            if token in self.stop_ids:
                self.ended[i] = True
            elif work.job.on_tokens is not None:
                work.job.call(work.job.on_tokens, work.index, [token])

    def end(self) -> None:
        pass


class _Cancelled(StoppingCriteria):
    """Ends the rows of cancelled jobs at the next step; the others go on."""

    def __init__(self, batch: list[Work]):
        self.batch = batch

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs) -> torch.Tensor:
        flags = torch.tensor([w.job.cancelled is not None for w in self.batch], device=input_ids.device)
        return flags.repeat_interleave(input_ids.shape[0] // len(self.batch))  # beams sit next to each other


class Batcher:
    def __init__(self, model, max_batch_size: int, max_wait_ms: float, queue_size: int, metrics: Metrics):
        if max_batch_size < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError(
                f"need max_batch_size >= 1, queue_size >= 1, max_wait_ms >= 0; got {max_batch_size}, "
                f"{queue_size}, {max_wait_ms}"
            )
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.queue_size = queue_size
        self.metrics = metrics
        self._cond = threading.Condition()
        self._pending: deque[Work] = deque()
        self._admitted = 0
        self._running = False
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._running and self._thread is not None and self._thread.is_alive()

    @property
    def depth(self) -> int:
        return self._admitted

    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="osum-batcher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the worker after its current batch; waiting jobs fail with Unavailable."""
        with self._cond:
            self._running = False
            waiting = {w.job for w in self._pending}
            self._pending.clear()
            for job in waiting:
                job.cancelled = job.cancelled or "shutdown"
                self._finish(job)
                job.call(_resolve, job.future, None, Unavailable("the server is shutting down"))
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, job: Job) -> None:
        with self._cond:
            if not self.alive:
                raise Unavailable("the batching worker is not running")
            if self._admitted >= self.queue_size:
                raise QueueFull(f"{self._admitted} requests are queued or running (queue_size={self.queue_size})")
            self._admitted += 1
            job.enqueued = time.monotonic()
            self._pending.extend(job.work)
            self._gauges()
            self._cond.notify_all()

    def cancel(self, job: Job, reason: str) -> None:
        """Drop the job's waiting pieces now; rows already generating stop at their next step."""
        with self._cond:
            if job.finished or job.cancelled:
                return
            job.cancelled = reason
            self.metrics.inc("osum_cancelled_total", reason=reason)
            kept = deque(w for w in self._pending if w.job is not job)
            for w in self._pending:
                if w.job is job:
                    w.done = True
            self._pending = kept
            if all(w.done for w in job.work):
                self._finish(job)
            self._gauges()
        job.call(job.future.cancel)

    # ---- worker ---------------------------------------------------------------------------------

    def _finish(self, job: Job) -> None:
        """Release the job's queue slot (lock held)."""
        if not job.finished:
            job.finished = True
            self._admitted -= 1

    def _gauges(self) -> None:
        self.metrics.set("osum_queue_depth", self._admitted)
        self.metrics.set("osum_queue_pieces", len(self._pending))

    def _next_batch(self) -> list[Work] | None:
        """The oldest piece and up to max_batch_size - 1 later ones with its settings, once the batch is full
        or the oldest has waited max_wait; None when closing."""
        with self._cond:
            while True:
                if not self._running:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                first = self._pending[0]
                same = [w for w in self._pending if w.job.key == first.job.key][: self.max_batch_size]
                wait = first.job.enqueued + self.max_wait - time.monotonic()
                if len(same) == self.max_batch_size or wait <= 0:
                    taken = set(map(id, same))
                    self._pending = deque(w for w in self._pending if id(w) not in taken)
                    self._gauges()
                    return same
                self._cond.wait(wait)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._generate(batch)
            except Exception as exc:  # a failed batch fails its requests; the server keeps serving
                log.exception("batched generate failed for %d pieces", len(batch))
                self._fail(batch, exc)

    def _generate(self, batch: list[Work]) -> None:
        gen = batch[0].job.generation
        feats = [w.features for w in batch]
        lens = torch.tensor([f.shape[0] for f in feats])
        padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)  # (B, T, n_mels)
        streaming = gen.num_beams == 1 and any(w.job.on_tokens is not None for w in batch)
        streamer = _Streamer(batch, set(self.model.stop_ids(gen))) if streaming else None
        device = self.model.device
        start = time.perf_counter()
        # One encoder and adaptor pass for decoding, the summary's labels and the CTC word times alike.
        with torch.no_grad():
            encoded = self.model.encode(padded.to(device), lens.to(device))
        rows = self.model.generate_ids(
            padded.to(device),
            lens.to(device),
            [w.job.prompt for w in batch],
            gen,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_Cancelled(batch)]),
            encoded=encoded,
            specs=[w.job.spec for w in batch],
        )
        # The engine's loop guard, for pieces whose text was not streamed (a streamed one keeps what its client has).
        def decode(index: list[int], generation: GenerationConfig) -> list[list[int]]:
            again = [batch[i] for i in index]
            return self.model.generate_ids(padded[index].to(device), lens[index].to(device),
                                           [w.job.prompt for w in again], generation,
                                           stopping_criteria=StoppingCriteriaList([_Cancelled(again)]),
                                           specs=[w.job.spec for w in again])

        looped = redecode_loops(rows, lambda row: self.model.tokenizer.decode(row, skip_special_tokens=True), decode,
                                gen, candidates=[i for i, w in enumerate(batch) if w.job.on_tokens is None])
        if looped:
            self.metrics.inc("osum_redecoded_pieces_total", looped)
        fields = sorted({f for w in batch for f in w.job.summary_fields})
        if fields:
            for work, labels in zip(batch, self.model.summary_labels(padded.to(device), lens.to(device), fields,
                                                                     encoded=encoded)):
                work.labels = {f: labels[f] for f in work.job.summary_fields}
        timed = [i for i, w in enumerate(batch) if w.job.ctc_words]
        if timed:
            texts = [self.model.tokenizer.decode(rows[i], skip_special_tokens=True) for i in timed]
            index = torch.tensor(timed)
            for i, (words, error) in zip(timed, ctc_words(self.model, texts, padded[index].to(device),
                                                          lens[index].to(device), gen.ctc_time_offsets,
                                                          encoded.take(index))):
                batch[i].words, batch[i].words_error = words, error
        self.metrics.observe("osum_generate_seconds", time.perf_counter() - start)
        self.metrics.inc("osum_batches_total")
        self.metrics.observe("osum_batch_size", len(batch))
        self.metrics.inc("osum_generated_tokens_total", sum(len(r) for r in rows))
        with self._cond:
            jobs: dict[int, Job] = {}
            for work, row in zip(batch, rows):
                work.ids, work.done = row, True
                job = jobs.setdefault(id(work.job), work.job)
                if job.on_tokens is not None and not job.cancelled:
                    if streamer is None:
                        job.call(job.on_tokens, work.index, list(row))  # beam search: the text arrives whole
                    job.call(job.on_tokens, work.index, None)
            for job in jobs.values():
                if all(w.done for w in job.work):
                    self._finish(job)
                    if not job.cancelled:
                        job.call(_resolve, job.future, job)
            self._gauges()

    def _fail(self, batch: list[Work], exc: Exception) -> None:
        with self._cond:
            jobs = {id(w.job): w.job for w in batch}
            for job in jobs.values():
                self._pending = deque(w for w in self._pending if w.job is not job)
                self._finish(job)
                job.call(_resolve, job.future, None, RuntimeError(f"generation failed: {exc}"))
            self._gauges()
