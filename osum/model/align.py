"""Word times from CTC: a forced alignment of a written transcript to the adaptor's CTC scores.

A model trained with `ctc_weight` > 0 scores every adaptor position (80 ms at 12.5 Hz) against the LLM's
vocabulary. Given the words the LLM wrote, the Viterbi path of their tokens through those scores says at which
positions each token is spoken (as WeNet and WhisperX take word times from a CTC model). CTC's spikes come
late and short, so a word's start and end are shifted by two constants measured on labelled data
(`fit_offsets`), stored in the model's `generation.ctc_time_offsets`.
"""
from __future__ import annotations

import re
import statistics
import unicodedata
from collections.abc import Sequence

import torch

from osum import audio as A
from osum import tasks

_WORD = re.compile(f"[{tasks.CJK_CHARS}]|[^\\s{tasks.CJK_CHARS}]+")  # a CJK character, or a run without spaces


def forced_align(log_probs: torch.Tensor, targets: Sequence[int], blank: int) -> list[tuple[int, int]] | None:
    """The best CTC path of `targets` through log_probs (T, V): each target's first and last position.

    None when the targets cannot fit (CTC needs one position per token, plus a blank between equal
    neighbours) or there are none.
    """
    T = log_probs.shape[0]
    if not targets or len(targets) + sum(a == b for a, b in zip(targets, targets[1:])) > T:
        return None
    ext = torch.full((2 * len(targets) + 1,), blank, dtype=torch.long)
    ext[1::2] = torch.tensor(list(targets), dtype=torch.long)
    S = ext.numel()
    # A state may come from itself, the one before, or (a token, unequal to the token two back) skip a blank.
    skip = torch.zeros(S, dtype=torch.bool)
    skip[2:] = (ext[2:] != blank) & (ext[2:] != ext[:-2])
    emit = log_probs.float()[:, ext]  # (T, S)
    neg = torch.tensor(float("-inf"))
    score = torch.full((S,), float("-inf"))
    score[:2] = emit[0, :2]
    back = torch.zeros((T, S), dtype=torch.long)
    for t in range(1, T):
        one = torch.cat([neg.view(1), score[:-1]])
        two = torch.where(skip, torch.cat([neg.view(1).expand(2), score[:-2]]), neg)
        best, step = torch.stack([score, one, two]).max(0)
        back[t] = step
        score = best + emit[t]
    state = S - 1 if score[S - 1] >= score[S - 2] else S - 2
    spans: dict[int, list[int]] = {}
    for t in range(T - 1, -1, -1):
        if state % 2 == 1:
            k = state // 2
            spans.setdefault(k, [t, t])[0] = t
        state -= int(back[t, state])
    return [(spans[k][0], spans[k][1]) for k in range(len(targets))]


def _strip_punctuation(word: str) -> str:
    """A word without the punctuation around it (inner apostrophes and hyphens stay: "didn't")."""
    start, end = 0, len(word)
    while start < end and unicodedata.category(word[start]).startswith("P"):
        start += 1
    while end > start and unicodedata.category(word[end - 1]).startswith("P"):
        end -= 1
    return word[start:end]


def word_spans(text: str) -> list[tuple[str, int, int]]:
    """The words of a transcript with their character ranges: runs between spaces, each CJK character alone
    (the rule `tasks.join_words` inverts), without surrounding punctuation; pure punctuation is no word."""
    out = []
    for m in _WORD.finditer(text):
        word = _strip_punctuation(m.group())
        if word:
            out.append((word, m.start(), m.end()))
    return out


def align_words(log_probs: torch.Tensor, text: str, tokenizer, blank: int, seconds_per_position: float,
                offsets: Sequence[float] = (0.0, 0.0), duration: float | None = None) -> list[tasks.Word] | None:
    """Each word of `text` with its time span (seconds) from log_probs (T, V) of one item's valid positions.

    The transcript is tokenised whole, as the CTC loss saw it in training; a token belongs to every word its
    characters overlap. Start = first position × step + offsets[0], end = (last position + 1) × step +
    offsets[1], kept within [0, duration] and in order. None when the tokens cannot fit the positions.
    """
    words = word_spans(text)
    if not words:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("CTC word times need a fast tokenizer (character offsets of each token)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = forced_align(log_probs, enc["input_ids"], blank)
    if spans is None:
        return None
    out: list[tasks.Word] = []
    limit = duration if duration is not None else log_probs.shape[0] * seconds_per_position
    for word, lo, hi in words:
        mine = [s for (a, b), s in zip(enc["offset_mapping"], spans) if a < hi and b > lo]
        if not mine:  # cannot happen for a tokenizer that covers every character; kept as a clear failure
            raise ValueError(f"no token of the transcript covers the word {word!r}")
        start = min(limit, max(0.0, mine[0][0] * seconds_per_position + offsets[0]))
        end = min(limit, max(start, (mine[-1][1] + 1) * seconds_per_position + offsets[1]))
        if out and start < out[-1].start:
            start = out[-1].start
        out.append(tasks.Word(word, round(start, 3), round(max(start, end), 3)))
    return out


# A fit whose words still miss their labelled times by this much on average (ms), on the very utterances it was
# fitted on, points to a model whose CTC head was never trained (ctc_weight 0): osum export warns.
CTC_FIT_WARN_MS = 200.0


def fit_offsets(pairs: Sequence[tuple[Sequence[tasks.Word], Sequence[tasks.Word]]]
                ) -> tuple[float, float, int, float]:
    """Median start and end shifts that take unshifted CTC word times to reference ones, how many words were
    used, and the mean absolute boundary error left after the shifts (ms; as the AAS metric counts starts and
    ends). `pairs` are (reference words, CTC words with zero offsets) per utterance; words pair up when an
    utterance has as many of each and their spellings agree (case and punctuation aside)."""
    starts, ends = [], []
    for ref, hyp in pairs:
        if len(ref) != len(hyp):
            continue
        for r, h in zip(ref, hyp):
            if _strip_punctuation(r.word).lower() == h.word.lower():
                starts.append(r.start - h.start)
                ends.append(r.end - h.end)
    if not starts:
        raise ValueError("no reference word matched an aligned word: nothing to fit the offsets on")
    start, end = round(statistics.median(starts), 3), round(statistics.median(ends), 3)
    error = sum(abs(s - start) + abs(e - end) for s, e in zip(starts, ends)) / (2 * len(starts))
    return start, end, len(starts), round(1000 * error, 1)


def fit_model_offsets(model, rows: Sequence[dict]) -> tuple[float, float, int, float, dict[str, int]]:
    """`fit_offsets` for `model` on labelled utterances: rows with an `audio` path, the `text` and its
    reference `words` ([{word, start, end}]). Also returns how many rows were left out, by reason (no word
    times in the row; a transcript longer than CTC can place in the audio)."""
    pairs, skipped = [], {"no text or words": 0, "transcript too long for the audio": 0}
    for row in rows:
        if not row.get("words") or not row.get("text"):
            skipped["no text or words"] += 1
            continue
        ref = [tasks.Word(w["word"], float(w["start"]), float(w["end"])) for w in row["words"]]
        mel = A.log_mel_spectrogram(A.load_audio(row["audio"]), n_mels=model.config.audio.n_mels).T[None]
        words = model.word_times(mel.to(model.device), torch.tensor([mel.shape[1]], device=model.device),
                                 [row["text"]])[0]
        if words is None:
            skipped["transcript too long for the audio"] += 1
            continue
        pairs.append((ref, words))
    return (*fit_offsets(pairs), {k: v for k, v in skipped.items() if v})
