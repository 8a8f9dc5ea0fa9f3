"""Open-domain sentences for the ASR data: the usage examples of WordNet 3.0 (Debian `wordnet-base`, WordNet 3.0
license: use, copy, modify and distribute with its notice).

The grammars of text.py speak about 1 500 distinct words, enough for the held-out synthetic floors and too few for
open speech: a model trained on them turns unknown words into the nearest known ones. WordNet's glosses carry
about 28 000 distinct example sentences of five words or more over some 25 000 distinct words ("they chipped
their names in the stone"), written to show each sense in use. They join the corpus as their own family `open`
(task asr), split by the same sentence hash as the grammars, so no sentence is in two splits.

    sentences = wordnet_examples()    # [Sentence(category="open", source="wordnet-3.0/data.verb:01234567#0")]
"""
from __future__ import annotations

import re
from pathlib import Path

from osum.data.synth.text import Sentence, normalized

WORDNET_DIR = "/usr/share/wordnet"
SOURCE = "wordnet-3.0"
LICENSE = "WordNet 3.0 license, (c) 2006 Princeton University (Debian wordnet-base)"
MIN_WORDS, MAX_WORDS = 5, 20  # shorter examples are noun phrases ("a dying man"), longer ones overrun a clip
# Letters and plain punctuation only: digits, brackets and symbols are read differently by every TTS engine.
_CLEAN = re.compile(r"[A-Za-z][A-Za-z ,.;:'!?-]*")
_EXAMPLE = re.compile(r'"([^"]*)"')


def wordnet_examples(root: str | Path = WORDNET_DIR) -> list[Sentence]:
    """Every distinct usable example sentence of the WordNet data files under `root`, in file order.

    Capitalised and ended with a full stop where the example has no final punctuation. Raises FileNotFoundError
    naming the package when the data files are missing.
    """
    files = sorted(Path(root).glob("data.*"))
    if not files:
        raise FileNotFoundError(f"no WordNet data files (data.noun, ...) in {root}; install the Debian package "
                                "wordnet-base (recipes/osum-tiny/install_voices.sh does)")
    out, seen = [], set()
    for path in files:
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith(" ") or "|" not in line:  # the license header lines start with two spaces
                continue
            offset = line.split(" ", 1)[0]
            for i, example in enumerate(_EXAMPLE.findall(line.split("|", 1)[1])):
                text = " ".join(example.split())
                if not _CLEAN.fullmatch(text) or not MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                    continue
                key = normalized(text)
                if key in seen:
                    continue
                seen.add(key)
                text = text[0].upper() + text[1:]
                if text[-1] not in ".!?":
                    text = text.rstrip(",;:-") + "."
                out.append(Sentence(text, "open", f"{SOURCE}/{path.name}:{offset}#{i}"))
    return out
