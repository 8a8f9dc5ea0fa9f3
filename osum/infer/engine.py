"""Batched inference over many files: load, split long audio at quiet points, sort by length, batch by a
frame budget, generate, parse, and join each file's pieces back together.

One bad input yields a result with an `error` and never stops the others; nothing is truncated.
"""
from __future__ import annotations

import dataclasses
import logging
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from osum import audio as A
from osum import tasks
from osum.config import GenerationConfig
from osum.infer.segment import split_long_audio
from osum.model.speech_llm import Encoded, SpeechLLM

log = logging.getLogger(__name__)

Source = str | Path | bytes | np.ndarray
T = TypeVar("T")


@dataclass
class Piece:
    """A ≤ 30 s stretch of one input, the unit the model sees."""

    item: int  # index of the input it belongs to
    offset: float  # seconds from the input's start
    seconds: float  # its duration
    features: torch.Tensor  # (T, n_mels)
    text: str = ""
    labels: dict[str, str] = field(default_factory=dict)  # read off the voice summary (generation.summary_tags)
    # srwt words timed by the CTC alignment (generation.word_times "ctc"); None = the spans the text has.
    words: list[tasks.Word] | None = None
    words_error: str | None = None  # why the CTC alignment gave no words


@dataclass
class EngineStats:
    files: int = 0
    failed: int = 0
    pieces: int = 0
    batches: int = 0
    audio_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    redecoded: int = 0  # pieces decoded again because their first output looped (compression_ratio_threshold)


def compression_ratio(text: str) -> float:
    """Bytes of the text over bytes of its zlib compression: about 1 for prose, far above for a loop."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _key_of(source: Source, index: int) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"input-{index}"


class Engine:
    def __init__(
        self,
        model: SpeechLLM,
        max_batch_size: int = 16,
        batch_frames: int = 48_000,
        generation: GenerationConfig | None = None,
        segment_method: str = "auto",
        window: int = 256,
    ):
        """`batch_frames` caps padded mel frames per batch (100 per second); `window` inputs are sorted together."""
        if max_batch_size < 1 or batch_frames < 1 or window < 1:
            raise ValueError("max_batch_size, batch_frames and window must be positive")
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_frames = batch_frames
        self.generation = generation or model.config.generation
        if self.generation.summary_tags and model.summary is None:
            raise ValueError(f"generation.summary_tags {self.generation.summary_tags}: the model has no voice "
                             "summary (model.adaptor.summary_layers)")
        self.segment_method = segment_method
        self.window = window
        self.stats = EngineStats()

    def _pieces(self, index: int, wav: np.ndarray) -> list[Piece]:
        sr = A.SAMPLE_RATE
        max_seconds = self.model.config.audio.max_seconds
        ranges = [(0, len(wav))] if len(wav) <= max_seconds * sr else split_long_audio(
            wav, sr=sr, max_seconds=max_seconds, method=self.segment_method
        )
        pieces = []
        for start, end in ranges:
            chunk = wav[start:end]
            if len(chunk) < A.MIN_SAMPLES:
                # A sliver left at the very end of a long file: pad it with silence rather than lose it.
                chunk = np.pad(chunk, (0, A.MIN_SAMPLES - len(chunk)))
            mel = A.log_mel_spectrogram(chunk, n_mels=self.model.config.audio.n_mels)  # (n_mels, T)
            pieces.append(Piece(index, start / sr, (end - start) / sr, mel.T.contiguous()))
        return pieces

    def pieces(self, wav: np.ndarray) -> list[Piece]:
        """One 16 kHz mono waveform → its pieces with features, for callers that batch themselves (the server)."""
        return self._pieces(0, wav)

    def _batches(self, pieces: list[Piece]) -> Iterator[list[Piece]]:
        """Longest first; a batch grows while (count × longest) stays within the frame budget."""
        order = sorted(pieces, key=lambda p: p.features.shape[0], reverse=True)
        batch: list[Piece] = []
        for piece in order:
            longest = batch[0].features.shape[0] if batch else piece.features.shape[0]
            if batch and (len(batch) == self.max_batch_size or (len(batch) + 1) * longest > self.batch_frames):
                yield batch
                batch = []
            batch.append(piece)
        if batch:
            yield batch

    def _padded(self, batch: list[Piece]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pieces' features zero-padded (B, T, n_mels) and their lengths (B,), on the model's device."""
        feats = [p.features for p in batch]
        lens = torch.tensor([f.shape[0] for f in feats])
        padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
        return padded.to(self.model.device), lens.to(self.model.device)

    def _generate(self, batch: list[Piece], prompt: str, spec: tasks.TaskSpec | None = None) -> None:
        features = self._padded(batch)

        def decode(index: list[int], generation: GenerationConfig) -> list[str]:
            again = [batch[i] for i in index]
            return self.model.generate(*self._padded(again), [prompt] * len(again), generation,
                                       specs=[spec] * len(again))

        # One encoder and adaptor pass for decoding, the summary's labels and the CTC word times alike.
        encoded = self.model.encode(*features)
        texts = self.model.generate(*features, [prompt] * len(batch), self.generation, encoded=encoded,
                                    specs=[spec] * len(batch))
        looped = redecode_loops(texts, str, decode, self.generation)
        if looped:
            self.stats.redecoded += looped
            log.info("%d of %d outputs repeated themselves (compression ratio > %s): decoded them again",
                     looped, len(batch), self.generation.compression_ratio_threshold)
        for piece, text in zip(batch, texts):
            piece.text = text
        self.stats.batches += 1
        self.stats.batch_sizes.append(len(batch))
        fields = [f for f in (spec.fields if spec is not None else ()) if f in self.generation.summary_tags]
        if fields:
            for piece, labels in zip(batch, self.model.summary_labels(*features, fields, encoded=encoded)):
                piece.labels = labels
        if spec is not None and spec.base == "srwt" and self.generation.word_times == "ctc":
            timed = ctc_words(self.model, [p.text for p in batch], *features, self.generation.ctc_time_offsets,
                              encoded)
            for piece, (words, error) in zip(batch, timed):
                piece.words, piece.words_error = words, error

    def run(self, inputs: list[Source] | list[tuple[str, Source]], task: str = "asr", prompt: str | None = None) -> list[dict]:
        return list(self.iter_run(inputs, task=task, prompt=prompt))

    def iter_run(
        self, inputs: Iterable[Source] | Iterable[tuple[str, Source]], task: str = "asr", prompt: str | None = None
    ) -> Iterator[dict]:
        """Yield one result dict per input, in input order."""
        spec = tasks.parse_spec(task)
        prompt = prompt or tasks.default_prompt(spec, lang=self.model.config.prompt.lang)
        window: list[tuple[str, Source]] = []
        for i, item in enumerate(inputs):
            window.append(item if isinstance(item, tuple) else (_key_of(item, i), item))
            if len(window) == self.window:
                yield from self._run_window(window, spec, prompt)
                window = []
        if window:
            yield from self._run_window(window, spec, prompt)

    def _run_window(self, window: list[tuple[str, Source]], spec: tasks.TaskSpec, prompt: str) -> list[dict]:
        results: list[dict] = []
        pieces: list[Piece] = []
        for index, (key, source) in enumerate(window):
            result = {"key": key, "audio": str(source) if isinstance(source, (str, Path)) else None}
            results.append(result)
            try:
                wav = source if isinstance(source, np.ndarray) else A.load_audio(source)
                wav = np.asarray(wav, dtype=np.float32)
                if wav.ndim != 1 or len(wav) == 0:
                    raise A.AudioError(f"{key}: expected non-empty mono audio, got shape {wav.shape}")
                result["duration"] = round(len(wav) / A.SAMPLE_RATE, 3)
                pieces.extend(self._pieces(index, wav))
            except (A.AudioError, OSError) as exc:
                result["error"] = str(exc)
        with torch.inference_mode():
            for batch in self._batches(pieces):
                self._generate(batch, prompt, spec)
        by_item: dict[int, list[Piece]] = {}
        for piece in pieces:
            by_item.setdefault(piece.item, []).append(piece)
        for index, result in enumerate(results):
            self.stats.files += 1
            if "error" in result:
                self.stats.failed += 1
                continue
            item_pieces = sorted(by_item[index], key=lambda p: p.offset)
            self.stats.pieces += len(item_pieces)
            self.stats.audio_seconds += result["duration"]
            result.update(merge(item_pieces, spec))
        return results


def redecode_loops(outputs: list[T], text_of: Callable[[T], str], decode: Callable[[list[int], GenerationConfig], list[T]],
                   generation: GenerationConfig, candidates: Iterable[int] | None = None) -> int:
    """The loop guard (as openai/whisper's): outputs whose text compresses more than
    generation.compression_ratio_threshold are decoded again, `decode(indices, settings)`, with each fallback
    repetition penalty in turn, and one is replaced when the new output repeats itself less. Changes `outputs`
    in place; returns how many looped at first. `candidates` limits which outputs may be decoded again."""
    limit = generation.compression_ratio_threshold
    if limit is None:
        return 0
    ratios = [compression_ratio(text_of(o)) for o in outputs]
    looped = [i for i in (range(len(outputs)) if candidates is None else candidates) if ratios[i] > limit]
    first = len(looped)
    for penalty in generation.fallback_repetition_penalties:
        if not looped:
            break
        for i, new in zip(looped, decode(looped, dataclasses.replace(generation, repetition_penalty=penalty))):
            ratio = compression_ratio(text_of(new))
            if ratio < ratios[i]:
                outputs[i], ratios[i] = new, ratio
        looped = [i for i in looped if ratios[i] > limit]
    return first


def ctc_words(model: SpeechLLM, texts: list[str], features: torch.Tensor, feature_lens: torch.Tensor,
              offsets: list[float], encoded: Encoded | None = None) -> list[tuple[list[tasks.Word], str | None]]:
    """Each srwt output's words timed by the CTC alignment of the transcript it gives (generation.word_times
    "ctc"), with the reason when there are none."""
    transcripts = [tasks.parse(text, "srwt").transcript or "" for text in texts]
    out = []
    for text, words in zip(transcripts, model.word_times(features, feature_lens, transcripts, offsets, encoded)):
        out.append((words, None) if words is not None else (
            [], f"no word times: the transcript has more tokens than the audio has CTC positions ({text!r})"))
    return out


def merge(pieces: list[Piece], spec: tasks.TaskSpec | None) -> dict:
    """Parse each piece and join them: transcripts and answers concatenated, word times shifted by the
    piece offset, each label the most frequent value over the pieces (first piece wins a tie).
    Spec None (a free prompt) lets `tasks.parse` infer each piece's layout. A label read off the voice summary
    (Piece.labels) takes the place of the one in the piece's text, which then need not have it; so do words
    timed by the CTC alignment (Piece.words), and the text's own time spans then do not matter."""
    parsed = []
    for p in pieces:
        r = tasks.parse(p.text, spec)
        moot = {tasks.missing_tag_error(f) for f in p.labels}
        errors = [e for e in r.errors if e not in moot]
        timed = {}
        if p.words is not None:
            timed = {"words": p.words}
            errors = [e for e in errors if not tasks.is_span_error(e)] + ([p.words_error] if p.words_error else [])
        parsed.append((p, dataclasses.replace(r, **p.labels, **timed, errors=errors)))
    out: dict = {"task": None if spec is None else str(spec), "raw": " ".join(p.text for p in pieces)}
    if len(pieces) > 1:
        out["segments"] = [[round(p.offset, 3), round(p.offset + p.seconds, 3)] for p in pieces]
    transcripts = [r.transcript for _, r in parsed if r.transcript]
    out["text"] = tasks.join_words(transcripts) if spec is None or spec.base is not None else None
    votes: dict[str, Counter] = {}
    for _, r in parsed:
        for name, value in r.labels().items():
            votes.setdefault(name, Counter())[value] += 1
    out["labels"] = {name: counter.most_common(1)[0][0] for name, counter in votes.items()}
    if any(r.words is not None for _, r in parsed):
        out["words"] = [
            {"word": w.word, "start": round(w.start + p.offset, 3), "end": round(w.end + p.offset, 3)}
            for p, r in parsed
            for w in (r.words or [])
        ]
    answers = [r.answer for _, r in parsed if r.answer]
    if answers:
        out["answer"] = tasks.join_words(answers)
    problems = [f"piece at {p.offset:.2f}s: {e}" if len(pieces) > 1 else e for p, r in parsed for e in r.errors]
    if problems:
        out["parse_errors"] = problems
    return out

