"""Real English recordings shipped in Debian packages, for ASR + gender data, split by utterance.

- asterisk-core-sounds-en-wav (+ asterisk-core-sounds-en for the transcripts): Allison Smith, female, 8 kHz,
  CC-BY-SA-3.0.
- pocketsphinx-testdata: five LibriVox utterances (Sense and Sensibility, male reader) and five CMU `cards`
  utterances (male), 16 kHz.

    utts, skipped = real_utterances()   # [RealUtterance], Counter of reasons
"""
from __future__ import annotations

import gzip
import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
ASTERISK_TEXT = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
POCKETSPHINX_DATA = Path("/usr/share/pocketsphinx/test/data")
TEST_SHARE = 0.2
# A real validation split, carved from what would otherwise train: decoding settings such as the joint CTC
# weight are chosen on it (`osum export --fit-ctc-weight`), since real speech favours other ones than synthetic.
VALID_SHARE = 0.1
# The clips in examples/ (the demo) are always test utterances, so the demo never shows trained-on audio.
FORCED_TEST = ("asterisk/tt-weasels", "librivox/sense_and_sensibility_01_austen_64kb-0870")
MAX_SECONDS = 30.0  # one encoder window

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


@dataclass(frozen=True)
class RealUtterance:
    id: str  # "asterisk/tt-weasels", "librivox/...", "cards/001"
    path: str
    text: str
    gender: str
    corpus: str
    license: str
    split: str


def number_words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    raise ValueError(f"number_words covers 0..99, got {n}")


def split_of(utt_id: str, valid_share: float = VALID_SHARE) -> str:
    """test, valid or train by a hash of the id: the test split never depends on valid_share (0 gives the
    corpora built before the valid split existed)."""
    if utt_id in FORCED_TEST:
        return "test"
    h = int.from_bytes(hashlib.sha256(utt_id.encode()).digest()[:8], "big") / 2 ** 64
    if h < TEST_SHARE:
        return "test"
    return "valid" if h < TEST_SHARE + valid_share else "train"


def normalize_asterisk(text: str) -> tuple[str | None, str]:
    """The spoken words of an Asterisk prompt transcript, or (None, why it cannot be used)."""
    text = re.sub(r"\[[^\]]*\]|\([^)]*\)", " ", text)  # [ascending tones], (2 seconds of silence), at [@]
    text = text.replace("...", " ").replace("*", " star ").replace("#", " pound ")
    if re.search(r"\d+\.\d|\d{3,}|\d[a-zA-Z]", text):
        return None, "number whose reading is unknown (decimal, three or more digits, or 3D)"
    text = re.sub(r"\d+", lambda m: f" {number_words(int(m.group()))} ", text)
    text = re.sub(r'["<>]', " ", text)
    if re.search(r"[^A-Za-z ,.'?!;:\-]", text):
        return None, "symbols that are not words"
    text = re.sub(r" ([,.;:?!])", r"\1", " ".join(text.split())).strip(" ,;:")
    return (text, "") if re.search(r"[A-Za-z]", text) else (None, "no speech (a tone or silence)")


def real_utterances(valid_share: float = VALID_SHARE) -> tuple[list[RealUtterance], Counter]:
    """Every usable utterance of the installed packages, with its split; skipped ones counted by reason."""
    utts: list[RealUtterance] = []
    skipped: Counter = Counter()
    if ASTERISK_TEXT.is_file() and ASTERISK_SOUNDS.is_dir():
        with gzip.open(ASTERISK_TEXT, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(";") or ":" not in line:
                    continue
                name, _, raw = line.partition(":")
                path = ASTERISK_SOUNDS / f"{name.strip()}.wav"
                if not path.is_file():
                    skipped["asterisk: transcript without a wav file"] += 1
                    continue
                text, why = normalize_asterisk(raw.strip())
                if text is None:
                    skipped[f"asterisk: {why}"] += 1
                    continue
                uid = f"asterisk/{name.strip()}"
                utts.append(RealUtterance(uid, str(path), text, "female", "asterisk-core-sounds-en",
                                          "CC-BY-SA-3.0 (Allison Smith)", split_of(uid, valid_share)))
    lib = POCKETSPHINX_DATA / "librivox"
    for folder, corpus, pattern in ((lib, "librivox", r"<s>(.*)</s>\s*\((\S+)\)"),
                                    (POCKETSPHINX_DATA / "cards", "cards", r"<s>(.*)</s>\s*\((\S+)\)")):
        listing = folder / ("transcription" if corpus == "librivox" else "cards.transcription")
        if not listing.is_file():
            continue
        for line in listing.read_text(encoding="utf-8").splitlines():
            m = re.search(pattern, line)
            if not m:
                continue
            text, stem = " ".join(m.group(1).split()), m.group(2)
            path = folder / f"{stem}.wav"
            if not path.is_file():
                skipped[f"{corpus}: transcript without a wav file"] += 1
                continue
            uid = f"{corpus}/{stem}"
            utts.append(RealUtterance(uid, str(path), text, "male", f"pocketsphinx-testdata/{corpus}",
                                      "BSD-2-Clause (pocketsphinx-testdata); LibriVox recordings public domain",
                                      split_of(uid, valid_share)))
    return utts, skipped
