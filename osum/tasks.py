"""Speech tasks: ids, label vocabularies, prompts, target formatting and output parsing.

The one place that knows what a target looks like: `format_target` writes it, `parse` reads it back.

Spec grammar (case-insensitive; spaces around "+" are ignored):

    spec := "all" | "only:all" | ["only:"] task ("+" task)*
    task := "asr" | "srwt" | "sttc" | tag
    tag  := "ved" | "ser" | "ssr" | "sap" | "sgc" | "lid"

- Tags keep the transcript ("ASR+X"): "ser" is "asr+ser" -> `transcript<happy>`.
- "only:" drops the transcript and takes tags only: "only:ser+sgc" -> `<happy><female>`.
- "all" is asr + every tag; "only:all" is every tag without the transcript.
- "srwt" and "sttc" stand alone: their targets have no place for tags.
- Tags are written in TAG_TASKS order (ved, ser, ssr, sap, sgc, lid) whatever order the spec names them.

Targets: a tag is its canonical label in angle brackets, spaces kept (`<news & science>`).
srwt writes each word followed by its span in seconds, words separated by one space:
`hello<0.12,0.48> world<0.52,0.90>`, `你好<0.00,0.40> 世界<0.40,0.90>`; the transcript of those words
joins them with a space, except between two CJK characters (`hello world`, `你好世界`, `我 love 你`).
sttc writes `transcript<answer>reply`.
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from functools import lru_cache


@dataclass(frozen=True)
class Task:
    id: str
    name: str
    field: str | None = None  # the Result field a tag task fills
    labels: tuple[str, ...] = ()  # canonical label vocabulary of a tag task


TASKS: dict[str, Task] = {t.id: t for t in (
    Task("asr", "transcription"),
    Task("srwt", "transcription with word timestamps"),
    Task("sttc", "speech-to-text chat"),
    Task("ved", "vocal event detection", "event",
         ("laugh", "cough", "cry", "screaming", "sigh", "throat clearing", "sneeze", "other")),
    Task("ser", "speech emotion recognition", "emotion",
         ("sad", "anger", "neutral", "happy", "surprise", "fear", "disgust", "other")),
    Task("ssr", "speaking style recognition", "style",
         ("news & science", "horror story", "fairy tale", "customer service", "poetry & prose",
          "audiobook", "conversation", "other")),
    Task("sap", "speaker age prediction", "age", ("child", "adult", "old")),
    Task("sgc", "speaker gender classification", "gender", ("male", "female")),
    # Beyond the paper. ISO 639 codes for the languages with large public speech corpora; "yue" is
    # Cantonese, kept apart from "zh" (Mandarin) because Chinese corpora mix both; "other" for the rest.
    Task("lid", "language identification", "language",
         ("en", "zh", "yue", "ja", "ko", "fr", "de", "es", "ru", "other")),
)}
BASE_TASKS = ("asr", "srwt", "sttc")  # tasks that produce the text part of a target
TAG_TASKS = ("ved", "ser", "ssr", "sap", "sgc", "lid")  # canonical tag order
LABELS: dict[str, tuple[str, ...]] = {TASKS[t].field: TASKS[t].labels for t in TAG_TASKS}
TAG_FIELDS = tuple(LABELS)  # ("event", "emotion", "style", "age", "gender", "language")

SPEECH_CHAT_SEPARATOR = "<answer>"  # between the transcript and the reply in sttc targets
# What closes the transcript that opens an output: every tag and the sttc separator begin with it, and no
# transcript contains it (_check_text), so the first token holding it ends the transcript.
TRANSCRIPT_END = "<"
# Every way a tag or sttc's answer opens: what a transcript's closing token may begin (opens_what_follows).
OPENINGS = (*(f"<{label}>" for labels in LABELS.values() for label in labels), SPEECH_CHAT_SEPARATOR)
ONLY_PREFIX = "only:"
AUTO_TASK = "auto"  # a dataset's `task` that means: each sample gets a task drawn from its labels
# System turn for chat-template layouts (instruct backbones, EChat); the task prompt goes in the user turn.
CHAT_SYSTEM_PROMPT = (
    "You are a helpful assistant that listens to speech. Follow the user's instruction about the audio "
    "exactly and answer in the requested format."
)


def task_of_field(field_name: str) -> str:
    """The tag task id that fills a Result field: "emotion" -> "ser"."""
    for t in TAG_TASKS:
        if TASKS[t].field == field_name:
            return t
    raise ValueError(f"unknown tag field {field_name!r}; valid fields: {', '.join(TAG_FIELDS)}")


def is_valid_label(field_name: str, value: str) -> bool:
    """True if `value` is a canonical label of `field_name` (exact match; see normalize_label)."""
    task_of_field(field_name)  # unknown field -> ValueError
    return value in LABELS[field_name]


def normalize_label(field_name: str, value: str) -> str | None:
    """Canonical label for a loosely written one ("Throat_Clearing" -> "throat clearing"), or None."""
    value = _normalize_tag(value)
    return value if is_valid_label(field_name, value) else None


def opens_what_follows(piece: str) -> bool:
    """True if the text `piece` (one token's) can close a transcript and begin its tags or sttc's answer: it holds
    TRANSCRIPT_END, what comes before that is transcript text (no '>'), and from there on it begins an OPENING.
    ".<" and "<" can; "</" and "<=" cannot, they open nothing a parse would read."""
    head, end, rest = piece.partition(TRANSCRIPT_END)
    return bool(end) and ">" not in head and any(o.startswith(end + rest) for o in OPENINGS)


def _normalize_tag(text: str) -> str:
    # Case, underscores and runs of spaces are spelling, not meaning: accept them, change nothing else.
    return " ".join(text.replace("_", " ").lower().split())


# ---------------------------------------------------------------------------------------------------
# Task specs


@dataclass(frozen=True)
class TaskSpec:
    """A validated task combination. Build it with parse_spec; str() gives the canonical spelling."""

    base: str | None  # "asr", "srwt" or "sttc"; None in only-X mode (no transcript)
    tags: tuple[str, ...] = ()  # tag task ids in TAG_TASKS order

    def __post_init__(self):
        if self.base is not None and self.base not in BASE_TASKS:
            raise ValueError(f"base task must be one of {BASE_TASKS} or None, got {self.base!r}")
        if not isinstance(self.tags, tuple) or self.tags != tuple(t for t in TAG_TASKS if t in self.tags):
            raise ValueError(f"tags must be a tuple of distinct ids in the order {TAG_TASKS}, got {self.tags!r}")
        if self.base is None and not self.tags:
            raise ValueError("an only-X spec needs at least one tag task")
        if self.base in ("srwt", "sttc") and self.tags:
            raise ValueError(f"{self.base!r} cannot carry tags, got {self.tags!r}")

    @property
    def only(self) -> bool:
        return self.base is None

    @property
    def opens_with_transcript(self) -> bool:
        """The output begins with the plain transcript, which the first TRANSCRIPT_END (a tag, sttc's answer) or
        the output's end closes: asr, asr+tags and sttc. Joint CTC decoding scores that part token by token
        (srwt's words interleave with their spans)."""
        return self.base in ("asr", "sttc")

    @property
    def continues_after_transcript(self) -> bool:
        """The transcript is followed by more (asr+tags: the tags; sttc: the answer), so the output may not end
        inside it (SpeechLLM.generate_ids' `continuing`)."""
        return self.opens_with_transcript and (self.base == "sttc" or bool(self.tags))

    @property
    def fields(self) -> tuple[str, ...]:
        """Result fields of the tags, in target order."""
        return tuple(TASKS[t].field for t in self.tags)

    def __str__(self) -> str:
        return ONLY_PREFIX + "+".join(self.tags) if self.only else "+".join((self.base, *self.tags))


def parse_spec(spec: str | TaskSpec) -> TaskSpec:
    """Validate and normalise a spec string; a TaskSpec passes through."""
    if isinstance(spec, TaskSpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"task spec must be a str or TaskSpec, got {type(spec).__name__}")
    return _parse_spec(spec)


@lru_cache(maxsize=None)
def _parse_spec(text: str) -> TaskSpec:
    s = text.strip().lower()
    only = s.startswith(ONLY_PREFIX)
    ids = [p.strip() for p in s[len(ONLY_PREFIX):].split("+")] if only else [p.strip() for p in s.split("+")]
    if ids == ["all"]:
        ids = list(TAG_TASKS) if only else ["asr", *TAG_TASKS]
    elif "all" in ids:
        raise ValueError(f"'all' already names every tag and cannot be combined with other tasks: {text!r}")
    valid = f"valid tasks: {', '.join(TASKS)}, or 'all'; prefix '{ONLY_PREFIX}' drops the transcript"
    for i in ids:
        if i not in TASKS:
            what = f"unknown task {i!r}" if i else "empty task"
            raise ValueError(f"{what} in spec {text!r}; {valid}")
    for i in ids:
        if ids.count(i) > 1:
            raise ValueError(f"task {i!r} appears twice in spec {text!r}")
    bases = [i for i in ids if i in BASE_TASKS]
    tags = tuple(t for t in TAG_TASKS if t in ids)
    if only:
        if bases:
            raise ValueError(f"{bases[0]!r} in {text!r}: '{ONLY_PREFIX}' drops the transcript and takes only "
                             f"tag tasks ({', '.join(TAG_TASKS)})")
        return TaskSpec(None, tags)
    if len(bases) > 1:
        raise ValueError(f"{bases[0]!r} and {bases[1]!r} cannot be combined in {text!r}: "
                         "each writes its own transcript")
    base = bases[0] if bases else "asr"
    if base != "asr" and tags:
        raise ValueError(f"{base!r} cannot be combined with tag tasks ({', '.join(tags)}) in {text!r}: "
                         f"its target has no place for tags; use asr+{'+'.join(tags)}")
    return TaskSpec(base, tags)


def all_specs() -> list[TaskSpec]:
    """Every valid spec: asr with any set of tags, only-X with any non-empty set, srwt, sttc."""
    subsets = [c for n in range(len(TAG_TASKS) + 1) for c in itertools.combinations(TAG_TASKS, n)]
    return ([TaskSpec("asr", c) for c in subsets] + [TaskSpec(None, c) for c in subsets if c]
            + [TaskSpec("srwt"), TaskSpec("sttc")])


@dataclass(frozen=True)
class TagGrammar:
    """What an output may hold after its transcript (an only-X output: from its start): its spec's tags in order,
    each one of its field's labels in brackets, or sttc's answer separator, after which the reply is free text.
    Decoding holds the LLM to it (generation.constrain_tags), so such an output always parses: a label outside the
    vocabulary (`<horror>`) or a broken separator (`<1>`) cannot be written. Tags are prefix-free (each ends with
    '>', which no label holds), so a text has at most one reading."""

    slots: tuple[tuple[str, ...], ...]  # each slot's strings, e.g. ("<laugh>", "<cough>", ...)
    free_after: bool = False  # sttc: the reply after the separator is not constrained

    def state(self, text: str) -> tuple[int, str] | None:
        """(slots filled, what of the next one is written) after `text`; None if no output goes on so. With
        free_after, any text past the last slot leaves the state at (len(slots), "")."""
        i = 0
        while i < len(self.slots):
            whole = next((s for s in self.slots[i] if text.startswith(s)), None)
            if whole is None:
                return (i, text) if any(s.startswith(text) for s in self.slots[i]) else None
            text, i = text[len(whole):], i + 1
        return (i, "") if self.free_after or not text else None

    def complete(self, text: str) -> bool:
        """Every slot is filled: the output may end (or, with free_after, the reply begins)."""
        state = self.state(text)
        return state is not None and state[0] == len(self.slots)

    def continuations(self, text: str, max_len: int) -> tuple[set[str], set[str]]:
        """The strings of 1 to max_len characters that may follow `text` (which the grammar must allow), and,
        with free_after, those of them that fill the last slot (anything may follow those)."""
        start = self.state(text)
        if start is None:
            raise ValueError(f"{text!r} does not begin an output of this grammar")
        out, filling = set(), set()

        def grow(i: int, part: str, written: str) -> None:
            if len(written) == max_len or i == len(self.slots):
                return
            for char in {s[len(part)] for s in self.slots[i] if s.startswith(part) and len(s) > len(part)}:
                more = written + char
                out.add(more)
                if part + char in self.slots[i]:
                    if i + 1 == len(self.slots) and self.free_after:
                        filling.add(more)
                    grow(i + 1, "", more)
                else:
                    grow(i, part + char, more)

        grow(*start, "")
        return out, filling


def tag_grammar(spec: str | TaskSpec) -> TagGrammar | None:
    """The grammar of what follows `spec`'s transcript (TagGrammar). Plain asr's is empty: nothing follows, so its
    output ends where its transcript does (with beam search, a beam that went on past it with a chat-template
    token won on length). None for srwt, whose time spans are written inside the transcript."""
    spec = parse_spec(spec)
    if spec.base == "sttc":
        return TagGrammar(((SPEECH_CHAT_SEPARATOR,),), free_after=True)
    if spec.base == "srwt":
        return None
    return TagGrammar(tuple(tuple(f"<{label}>" for label in LABELS[f]) for f in spec.fields))


# ---------------------------------------------------------------------------------------------------
# Prompts. Single tasks have their own wording; tag combinations and only-X are composed from templates
# so that every valid spec gets at least five prompts per language. prompts(...)[0] is the default.

PROMPT_LANGS = ("en", "zh")

_PROMPTS: dict[str, dict[str, tuple[str, ...]]] = {
    "asr": {
        "en": ("Transcribe this audio.",
               "Write down exactly what is said in the recording.",
               "Please convert the speech to text.",
               "What does the speaker say? Give the words verbatim.",
               "Produce a transcript of this clip.",
               "Listen and type out the spoken words."),
        "zh": ("请将这段语音转写成文字。",
               "把录音里说的话原样写下来。",
               "这段音频说了什么？请逐字写出。",
               "请给出这段语音的文字内容。",
               "听写这段录音。",
               "请把听到的话记录成文本。"),
    },
    "srwt": {
        "en": ("Transcribe the audio and give each word's start and end time in seconds.",
               "Write out the words spoken, each followed by its time span.",
               "Produce a word-level transcript with timestamps.",
               "For every word you hear, output the word and when it begins and ends.",
               "Please transcribe with word timestamps."),
        "zh": ("请转写这段语音，并给出每个词的起止时间（秒）。",
               "写出说话内容，每个词后面标注它的时间区间。",
               "生成带词级时间戳的转写文本。",
               "对听到的每个词，输出该词及其开始和结束时间。",
               "请做带时间戳的语音识别，精确到每个词。"),
    },
    "sttc": {
        "en": ("First write down what the speaker says, then reply to it.",
               "Transcribe the question you hear and answer it.",
               "Listen to the user, repeat their words as text, and then respond.",
               "Write out what was said and give a helpful reply.",
               "What did the user say? Write it down, then answer as a friendly assistant."),
        "zh": ("先写出你听到的话，再给出回答。",
               "请转写用户的语音，然后回复他。",
               "听这段话，把内容写成文字后作出回应。",
               "把说话内容写下来，并像助手一样回答。",
               "用户说了什么？请先转写，再进行回复。"),
    },
    "ved": {
        "en": ("Transcribe the audio and tag any vocal event such as laughter or coughing.",
               "Write down the words, then label the non-speech vocal sound you hear.",
               "Give the transcript followed by a vocal event tag.",
               "What is said, and is there a laugh, cough, sigh or similar? Transcript first, then the event.",
               "Convert the speech to text and append the vocal event that occurs."),
        "zh": ("请转写语音，并标注其中的声音事件，比如笑声或咳嗽。",
               "写出说话内容，再标出听到的非语言人声。",
               "给出转写文本，后面加上声音事件标签。",
               "说了什么？有没有笑、咳嗽、叹气之类的声音？先写文本，再写事件。",
               "把语音转成文字，并附上出现的人声事件。"),
    },
    "ser": {
        "en": ("Transcribe the speech and tag the speaker's emotion at the end.",
               "Write down what is said, then label how the speaker feels.",
               "Give the transcript followed by an emotion tag.",
               "What is said, and in what mood? Transcript first, then the emotion.",
               "Convert this audio to text and append the emotion you hear."),
        "zh": ("请转写语音，并在末尾标注说话人的情感。",
               "写出说话内容，再判断说话人的情绪。",
               "给出转写文本，后面加上情感标签。",
               "说了什么、情绪如何？先写文本，再写情感。",
               "把这段音频转成文字，并附上听到的情感。"),
    },
    "ssr": {
        "en": ("Transcribe the speech and tag its speaking style.",
               "Write down what is said, then label the style of delivery, such as news or storytelling.",
               "Give the transcript followed by a speaking style tag.",
               "What is said, and how is it performed? Transcript first, then the style.",
               "Convert this audio to text and append the kind of speaking you hear."),
        "zh": ("请转写语音，并标注说话风格。",
               "写出说话内容，再判断讲述风格，例如新闻播报或讲故事。",
               "给出转写文本，后面加上风格标签。",
               "说了什么、是什么风格？先写文本，再写风格。",
               "把音频转成文字，并附上听到的说话风格。"),
    },
    "sap": {
        "en": ("Transcribe the speech and tag the speaker's age group.",
               "Write down what is said, then say whether the speaker is a child, an adult or old.",
               "Give the transcript followed by an age tag.",
               "What is said, and how old does the speaker sound? Transcript first, then the age.",
               "Convert this audio to text and append the speaker's age group."),
        "zh": ("请转写语音，并标注说话人的年龄段。",
               "写出说话内容，再判断说话人是儿童、成年人还是老年人。",
               "给出转写文本，后面加上年龄标签。",
               "说了什么、说话人多大？先写文本，再写年龄。",
               "把音频转成文字，并附上说话人的年龄段。"),
    },
    "sgc": {
        "en": ("Transcribe the speech and tag the speaker's gender.",
               "Write down what is said, then say whether the voice is male or female.",
               "Give the transcript followed by a gender tag.",
               "What is said, and is the speaker a man or a woman? Transcript first, then the gender.",
               "Convert this audio to text and append the speaker's gender."),
        "zh": ("请转写语音，并标注说话人的性别。",
               "写出说话内容，再判断说话人是男声还是女声。",
               "给出转写文本，后面加上性别标签。",
               "说了什么、说话人是男是女？先写文本，再写性别。",
               "把音频转成文字，并附上说话人的性别。"),
    },
    "lid": {
        "en": ("Transcribe the speech and tag the language it is in.",
               "Write down what is said, then name the language.",
               "Give the transcript followed by a language tag.",
               "What is said, and in which language? Transcript first, then the language.",
               "Convert this audio to text and append the spoken language."),
        "zh": ("请转写语音，并标注所说的语种。",
               "写出说话内容，再说明使用的是哪种语言。",
               "给出转写文本，后面加上语种标签。",
               "说了什么、用的什么语言？先写文本，再写语种。",
               "把音频转成文字，并附上所说的语言。"),
    },
}

# What each tag describes, spliced into the combination templates below.
_TAG_PHRASES = {
    "en": {"ved": "vocal events", "ser": "emotion", "ssr": "speaking style", "sap": "age group",
           "sgc": "gender", "lid": "language"},
    "zh": {"ved": "声音事件", "ser": "情感", "ssr": "说话风格", "sap": "年龄段", "sgc": "性别", "lid": "语种"},
}
_WITH_TAGS_TEMPLATES = {
    "en": ("Transcribe the speech, then append tags for {what}.",
           "Write out what the speaker says and add tags giving {what} at the end.",
           "First give a verbatim transcript of this audio, then label {what} with tags.",
           "Please convert the recording to text and follow the text with tags for {what}.",
           "Listen carefully: output the transcript, then tags describing {what}."),
    "zh": ("请转写这段语音，然后在末尾加上{what}的标签。",
           "把说话内容写成文字，再用标签标出{what}。",
           "先给出这段音频的逐字转写，随后附上表示{what}的标签。",
           "听这段录音，输出转写文本，并在文本后用标签注明{what}。",
           "请识别语音内容，之后用标签给出{what}。"),
}
_ONLY_TEMPLATES = {
    "en": ("Without transcribing, output only the {tag} for {what}.",
           "Skip the transcript and give just the {tag} for {what}.",
           "Listen to the audio and label {what}; reply with the {tag} only, no text.",
           "Answer with the {tag} alone: identify {what} in this recording.",
           "Do not write down the words. Tag {what} and nothing else."),
    "zh": ("不用转写，只输出{what}的标签。",
           "跳过文字内容，直接给出{what}的标签。",
           "请判断{what}，只回答标签，不要输出文本。",
           "只需要标签：识别这段录音中的{what}。",
           "不要写出说话内容，仅用标签标注{what}。"),
}


def _list_phrase(items: list[str], lang: str) -> str:
    if len(items) == 1:
        return items[0]
    if lang == "zh":
        return "、".join(items[:-1]) + "和" + items[-1]
    return ", ".join(items[:-1]) + " and " + items[-1]


def prompts(spec: str | TaskSpec, lang: str = "en") -> list[str]:
    """All prompts for a spec in one language ("en" or "zh"); the first is the default."""
    spec = parse_spec(spec)
    if lang not in PROMPT_LANGS:
        raise ValueError(f"unknown prompt language {lang!r}; valid: {', '.join(PROMPT_LANGS)}")
    if not spec.tags:
        return list(_PROMPTS[spec.base][lang])
    if not spec.only and len(spec.tags) == 1:
        return list(_PROMPTS[spec.tags[0]][lang])
    what = _list_phrase([_TAG_PHRASES[lang][t] for t in spec.tags], lang)
    tag = "tag" if len(spec.tags) == 1 else "tags"  # only-X may have a single tag
    templates = _ONLY_TEMPLATES if spec.only else _WITH_TAGS_TEMPLATES
    return [t.format(what=what, tag=tag) for t in templates[lang]]


def default_prompt(spec: str | TaskSpec, lang: str = "en") -> str:
    """The fixed prompt used at inference when the caller gives none."""
    return prompts(spec, lang)[0]


def sample_prompt(spec: str | TaskSpec, rng: random.Random, lang: str | None = None) -> str:
    """A random prompt for training; lang None picks English or Chinese at random."""
    return rng.choice(prompts(spec, lang if lang is not None else rng.choice(PROMPT_LANGS)))


# ---------------------------------------------------------------------------------------------------
# Results and targets


@dataclass
class Word:
    word: str
    start: float  # seconds
    end: float


@dataclass
class Result:
    """What a target says, and what parse could not make sense of (errors)."""

    transcript: str | None = None
    emotion: str | None = None
    gender: str | None = None
    age: str | None = None
    style: str | None = None
    event: str | None = None
    language: str | None = None
    words: list[Word] | None = None
    answer: str | None = None
    errors: list[str] = field(default_factory=list)

    def labels(self) -> dict[str, str]:
        """The tag fields that are set, in target order."""
        return {f: getattr(self, f) for f in TAG_FIELDS if getattr(self, f) is not None}

    def to_dict(self) -> dict:
        """Plain dict for JSON; fields that are None are left out, errors is always present."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> Result:
        words = d.get("words")
        return cls(**{**d, "words": None if words is None else [Word(**w) for w in words]})


# CJK scripts are written without spaces between words: punctuation, kana, Han, fullwidth forms.
# Hangul is left out on purpose: Korean puts spaces between words.
CJK_CHARS = r"\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"  # a regex class body
_CJK = re.compile(f"[{CJK_CHARS}]")


def join_words(words: list[str]) -> str:
    """Transcript of srwt words: a space between words unless both sides of the gap are CJK."""
    text = ""
    for w in words:
        if text and not (_CJK.match(text[-1]) and _CJK.match(w[0])):
            text += " "
        text += w
    return text


def _decimals(time_resolution: float) -> int:
    if not time_resolution > 0:
        raise ValueError(f"time_resolution must be positive, got {time_resolution}")
    return max(0, -Decimal(str(time_resolution)).normalize().as_tuple().exponent)


def _check_text(text: str, what: str) -> str:
    # "<" and ">" delimit tags and spans; letting them into text would make the target ambiguous.
    if "<" in text or ">" in text:
        raise ValueError(f"{what} must not contain '<' or '>' (they delimit tags): {text!r}")
    return " ".join(text.split())


def format_target(spec: str | TaskSpec, result: Result, time_resolution: float = 0.01) -> str:
    """The training target for `result` under `spec`. Raises ValueError on missing or invalid fields.

    time_resolution (seconds) quantises srwt spans; the number of decimals follows it (0.01 -> "0.12").
    """
    spec = parse_spec(spec)
    if spec.base == "srwt":
        if result.words is None:
            raise ValueError("spec 'srwt' needs Result.words")
        decimals = _decimals(time_resolution)

        def t(x: float) -> str:
            return f"{round(x / time_resolution) * time_resolution:.{decimals}f}"

        items = []
        for w in result.words:
            if [_check_text(w.word, "word")] != w.word.split():
                raise ValueError(f"srwt word must be non-empty without spaces or '<>': {w.word!r}")
            if not 0 <= w.start <= w.end:
                raise ValueError(f"word {w.word!r} needs 0 <= start <= end, got {w.start}, {w.end}")
            items.append(f"{w.word}<{t(w.start)},{t(w.end)}>")
        return " ".join(items)

    parts = []
    if not spec.only:
        if result.transcript is None:
            raise ValueError(f"spec {str(spec)!r} needs Result.transcript")
        parts.append(_check_text(result.transcript, "transcript"))
    for f in spec.fields:
        value = getattr(result, f)
        if value is None:
            raise ValueError(f"spec {str(spec)!r} needs Result.{f}")
        if not is_valid_label(f, value):
            raise ValueError(f"{value!r} is not a {f} label; valid: {', '.join(LABELS[f])}")
        parts.append(f"<{value}>")
    if spec.base == "sttc":
        if result.answer is None:
            raise ValueError("spec 'sttc' needs Result.answer")
        parts.append(SPEECH_CHAT_SEPARATOR + result.answer.strip())
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------
# Parsing model output. Never raises on the text: whatever cannot be read goes to Result.errors.

_TAG = re.compile(r"<([^<>]*)>")
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_SPAN = re.compile(rf"\s*{_NUM}\s*,\s*{_NUM}\s*")


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _stray_brackets(text: str, errors: list[str]) -> str:
    """Cut text at a "<" that no ">" closes (a truncated tag) and report it; report stray ">"."""
    i = text.find("<")
    if i >= 0:
        errors.append(f"unclosed tag {_clip(text[i:])!r}")
        text = text[:i]
    if ">" in text:
        errors.append(f"stray '>' in {_clip(text.strip())!r}")
    return text.replace(">", " ")


def _describe(inner: str, filled: list[str], result: Result) -> str:
    """Why tag <inner> was not used."""
    label = _normalize_tag(inner)
    owners = [f for f in TAG_FIELDS if label in LABELS[f]]
    if f"<{label}>" == SPEECH_CHAT_SEPARATOR:
        return f"unexpected {SPEECH_CHAT_SEPARATOR} separator"
    if _SPAN.fullmatch(inner):
        return f"unexpected time span <{inner}>"
    if not owners:
        return f"unknown tag <{inner}>"
    taken = [f for f in owners if f in filled]
    if taken:
        return f"extra {taken[0]} tag <{inner}> (already <{getattr(result, taken[0])}>)"
    return f"tag <{inner}> is a {' or '.join(owners)} label, which was not asked for"


def _parse_tagged(text: str, fields: tuple[str, ...], transcript: bool, strict: bool = True) -> Result:
    """Transcript (text before the first "<") followed by tags for `fields`.

    strict=False (no spec): no field is required and a transcript is taken only if present.
    """
    result = Result()
    errors = result.errors
    cut = text.find("<")
    head, rest = (text, "") if cut < 0 else (text[:cut], text[cut:])
    if ">" in head:
        errors.append(f"stray '>' in {_clip(head.strip())!r}")
    head = " ".join(head.split())
    if transcript:
        result.transcript = head if head or strict or not rest else None
    elif head:
        errors.append(f"unexpected text before tags: {_clip(head)!r}")

    tags, pos = [], 0
    for m in _TAG.finditer(rest):
        gap = _stray_brackets(rest[pos:m.start()], errors).strip()
        if gap:
            errors.append(f"unexpected text {_clip(gap)!r} between tags")
        tags.append(m.group(1))
        pos = m.end()
    tail = _stray_brackets(rest[pos:], errors).strip()
    if tail:
        errors.append(f"unexpected text after tags: {_clip(tail)!r}")

    # Tags are matched to the earliest unfilled field whose vocabulary has the label, which is the
    # canonical order. A label several fields share ("other") is only placed that way when the tag count
    # matches the spec; otherwise its field would be a guess.
    wanted = list(fields)
    for inner in tags:
        label = _normalize_tag(inner)
        fits = [f for f in wanted if label in LABELS[f]]
        if not fits:
            errors.append(_describe(inner, [f for f in fields if f not in wanted], result))
        elif len(fits) > 1 and (not strict or len(tags) != len(fields)):
            errors.append(f"ambiguous tag <{inner}>: could be {' or '.join(fits)}")
        else:
            setattr(result, fits[0], label)
            wanted.remove(fits[0])
    if strict:
        for f in wanted:
            errors.append(missing_tag_error(f))
    return result


def missing_tag_error(field_name: str) -> str:
    """The parse error of an answer that lacks the tag of `field_name`."""
    return f"missing {field_name} tag (one of: {', '.join(LABELS[field_name])})"


# srwt parse errors about time spans (rather than words): moot when the spans come from elsewhere
# (generation.word_times "ctc"), see is_span_error.
_SPAN_ERRORS = ("word {!r} has no time span", "time span <{}> has no word before it",
                "malformed time span <{}> after {!r}", "time span <{}> of {!r} ends before it starts")
_SPAN_ERROR = re.compile("|".join(
    re.escape(f).replace(re.escape("{!r}"), ".+").replace(re.escape("{}"), ".*") for f in _SPAN_ERRORS))


def is_span_error(error: str) -> bool:
    """True for an srwt parse error about a word's time span, false for one about the words themselves."""
    return _SPAN_ERROR.fullmatch(error) is not None


def _parse_srwt(text: str) -> Result:
    result = Result(words=[])
    errors = result.errors
    spoken: list[str] = []  # every word, timed or not, for the transcript

    def take(chunk: str) -> list[str]:
        found = _stray_brackets(chunk, errors).split()
        spoken.extend(found)
        return found

    pos = 0
    for m in _TAG.finditer(text):
        found = take(text[pos:m.start()])
        pos = m.end()
        inner = m.group(1)
        if not found:
            errors.append(_SPAN_ERRORS[1].format(inner))
            continue
        for w in found[:-1]:
            errors.append(_SPAN_ERRORS[0].format(w))
        word, span = found[-1], _SPAN.fullmatch(inner)
        if span is None:
            errors.append(_SPAN_ERRORS[2].format(inner, word))
            continue
        start, end = float(span.group(1)), float(span.group(2))
        if start > end:
            errors.append(_SPAN_ERRORS[3].format(inner, word))
            continue
        result.words.append(Word(word, start, end))
    for w in take(text[pos:]):
        errors.append(_SPAN_ERRORS[0].format(w))
    result.transcript = join_words(spoken)
    return result


def _parse_chat(text: str) -> Result:
    i = text.lower().find(SPEECH_CHAT_SEPARATOR)
    if i < 0:
        result = _parse_tagged(text, (), transcript=True)
        result.errors.append(f"missing {SPEECH_CHAT_SEPARATOR} separator before the reply")
        return result
    result = _parse_tagged(text[:i], (), transcript=True)
    result.answer = text[i + len(SPEECH_CHAT_SEPARATOR):].strip()
    return result


def parse(text: str, spec: str | TaskSpec | None = None) -> Result:
    """Read generated text back into a Result under `spec`; never raises on the text.

    With spec None the layout is inferred: an <answer> separator means sttc, a time span means srwt,
    anything else is a transcript followed by whichever known tags appear.
    """
    if spec is None:
        if SPEECH_CHAT_SEPARATOR in text.lower():
            return _parse_chat(text)
        if any(_SPAN.fullmatch(m.group(1)) for m in _TAG.finditer(text)):
            return _parse_srwt(text)
        return _parse_tagged(text, TAG_FIELDS, transcript=True, strict=False)
    spec = parse_spec(spec)
    if spec.base == "srwt":
        return _parse_srwt(text)
    if spec.base == "sttc":
        return _parse_chat(text)
    return _parse_tagged(text, spec.fields, transcript=not spec.only)
