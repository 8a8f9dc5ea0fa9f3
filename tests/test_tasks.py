"""Tests for osum.tasks: spec grammar, prompts, target round trips and robust parsing."""
import itertools
import random
import re

import pytest

from osum.tasks import (
    CHAT_SYSTEM_PROMPT, LABELS, SPEECH_CHAT_SEPARATOR, TAG_FIELDS, TAG_TASKS, TASKS, Result, TaskSpec, Word,
    all_specs, default_prompt, format_target, is_valid_label, join_words, normalize_label, opens_what_follows, parse,
    parse_spec, prompts, sample_prompt, task_of_field,
)

# Every valid spec, spelled independently of all_specs(): asr + any tag subset, only-X, srwt, sttc.
SUBSETS = [c for n in range(len(TAG_TASKS) + 1) for c in itertools.combinations(TAG_TASKS, n)]
SPEC_STRINGS = (["+".join(("asr", *c)) for c in SUBSETS] + ["only:" + "+".join(c) for c in SUBSETS if c]
                + ["srwt", "sttc"])
SPECS = [parse_spec(s) for s in SPEC_STRINGS]

EN_WORDS = ["hello", "world", "it's", "fine,", "OK.", "the", "42", "naïve", "don't", "Yes!"]
ZH_WORDS = ["你好", "世界", "今天", "天气", "很好", "。", "我们", "走吧"]
ANSWERS = ["Sure, here you go.", "a < b and c > d", "Line one\nline two", "好的，没问题。", ""]


def random_result(spec: TaskSpec, rng: random.Random, resolution: float = 0.01) -> Result:
    """A result that format_target can write for `spec`, already in normalised form."""
    pool = rng.choice([EN_WORDS, ZH_WORDS, EN_WORDS + ZH_WORDS])
    tokens = [rng.choice(pool) for _ in range(rng.randint(0, 8))]
    r = Result()
    if spec.base == "srwt":
        t, r.words = 0, []
        for w in tokens:
            start = t + rng.randint(0, 30)
            t = start + rng.randint(0, 80)
            r.words.append(Word(w, round(start * resolution, 6), round(t * resolution, 6)))
        r.transcript = join_words(tokens)
        return r
    if not spec.only:
        r.transcript = " ".join(tokens)
    for f in spec.fields:
        setattr(r, f, rng.choice(LABELS[f]))
    if spec.base == "sttc":
        r.answer = rng.choice(ANSWERS)
    return r


# ---- registry and specs ------------------------------------------------------------------------------

def test_registry():
    assert set(TASKS) == {"asr", "srwt", "sttc", "ved", "ser", "ssr", "sap", "sgc", "lid"}
    assert TAG_TASKS == ("ved", "ser", "ssr", "sap", "sgc", "lid")
    assert {task_of_field(f): f for f in TAG_FIELDS} == {
        "ved": "event", "ser": "emotion", "ssr": "style", "sap": "age", "sgc": "gender", "lid": "language"}
    assert LABELS["gender"] == ("male", "female") and LABELS["age"] == ("child", "adult", "old")
    assert "throat clearing" in LABELS["event"] and "news & science" in LABELS["style"]
    assert is_valid_label("emotion", "happy") and not is_valid_label("emotion", "Happy")
    assert not is_valid_label("gender", "happy")
    assert normalize_label("event", " Throat_Clearing ") == "throat clearing"
    assert normalize_label("emotion", "joyful") is None
    with pytest.raises(ValueError, match="'mood'"):
        task_of_field("mood")
    with pytest.raises(ValueError, match="'mood'"):
        is_valid_label("mood", "happy")
    assert "answer" not in {label for labels in LABELS.values() for label in labels}


def test_all_specs_enumerated():
    assert len(SPECS) == 64 + 63 + 2 == len(set(SPECS))
    assert set(all_specs()) == set(SPECS)


@pytest.mark.parametrize("text", SPEC_STRINGS)
def test_spec_canonical_string_round_trips(text):
    spec = parse_spec(text)
    assert str(spec) == text and parse_spec(str(spec)) == spec


def test_spec_canonical_order():
    assert parse_spec("asr+sgc+sap") == parse_spec("asr+sap+sgc") == parse_spec(" SGC + sap ")
    r = Result(transcript="hi", age="adult", gender="female")
    assert format_target("asr+sgc+sap", r) == "hi<adult><female>"
    for perm in itertools.permutations(TAG_TASKS):
        assert parse_spec("+".join(perm)) == parse_spec("all") == TaskSpec("asr", TAG_TASKS)
        assert parse_spec("only:" + "+".join(perm)) == parse_spec("only:all") == TaskSpec(None, TAG_TASKS)


def test_spec_shorthands():
    assert parse_spec("ser") == parse_spec("asr+ser") == TaskSpec("asr", ("ser",))
    assert parse_spec("only:ser").only and parse_spec("only:ser").fields == ("emotion",)
    assert parse_spec("all").fields == TAG_FIELDS
    assert parse_spec(parse_spec("ser")) == parse_spec("ser")


@pytest.mark.parametrize("text, pattern", [
    ("asr+emotion", r"unknown task 'emotion'.*valid tasks: asr, srwt, sttc, ved"),
    ("xyz", r"unknown task 'xyz'"),
    ("", r"empty task"),
    ("asr+", r"empty task"),
    ("only:", r"empty task"),
    ("srwt+ser", r"'srwt' cannot be combined with tag tasks \(ser\)"),
    ("sttc+sgc+sap", r"'sttc' cannot be combined with tag tasks \(sap, sgc\)"),
    ("asr+srwt", r"'asr' and 'srwt' cannot be combined"),
    ("asr+sttc", r"'asr' and 'sttc' cannot be combined"),
    ("only:asr+ser", r"'asr'.*'only:' drops the transcript"),
    ("only:srwt", r"'srwt'.*only:"),
    ("ser+ser", r"'ser' appears twice"),
    ("all+ser", r"'all'.*cannot be combined"),
])
def test_spec_errors(text, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_spec(text)


def test_taskspec_validates_direct_construction():
    with pytest.raises(ValueError):
        TaskSpec("asr", ("sgc", "sap"))  # not canonical order
    with pytest.raises(ValueError):
        TaskSpec(None, ())
    with pytest.raises(ValueError):
        TaskSpec("srwt", ("ser",))
    with pytest.raises(TypeError):
        parse_spec(None)


# ---- prompts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=SPEC_STRINGS)
def test_prompts_per_spec(spec):
    for lang in ("en", "zh"):
        ps = prompts(spec, lang)
        assert len(ps) >= 5 and len(set(ps)) == len(ps)
        assert all(p.strip() == p and p for p in ps)
        assert "{" not in "".join(ps)
        assert default_prompt(spec, lang) == ps[0]
    assert all(p.isascii() for p in prompts(spec, "en"))
    assert all(re.search(r"[\u4e00-\u9fff]", p) for p in prompts(spec, "zh"))


def test_prompts_identify_their_spec():
    # A prompt shared by two specs would teach the model two targets for one instruction.
    seen = {}
    for spec in SPECS:
        for lang in ("en", "zh"):
            for p in prompts(spec, lang):
                assert seen.setdefault(p, spec) == spec, (p, seen[p], spec)


def test_sample_prompt():
    rng = random.Random(0)
    got = {sample_prompt("asr+ser", rng) for _ in range(200)}
    assert got == set(prompts("ser", "en")) | set(prompts("ser", "zh"))
    assert {sample_prompt("sgc", rng, lang="zh") for _ in range(50)} <= set(prompts("sgc", "zh"))
    a, b = random.Random(7), random.Random(7)
    assert [sample_prompt("all", a) for _ in range(5)] == [sample_prompt("all", b) for _ in range(5)]
    with pytest.raises(ValueError, match="'fr'"):
        prompts("asr", "fr")
    assert CHAT_SYSTEM_PROMPT and SPEECH_CHAT_SEPARATOR == "<answer>"


# ---- targets -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=SPEC_STRINGS)
def test_round_trip_every_spec(spec):
    rng = random.Random(str(spec))
    for _ in range(25):
        x = random_result(spec, rng)
        target = format_target(spec, x)
        assert parse(target, spec) == x, target
        if spec.base != "srwt" and spec.fields:
            # Without a spec, every tag found is right and only labels several fields share can be missed.
            got = parse(target).labels()
            assert got.items() <= x.labels().items()
            assert all(sum(v in LABELS[g] for g in TAG_FIELDS) > 1 for f, v in x.labels().items() if f not in got)


def test_target_layouts():
    r = Result(transcript="good morning", emotion="happy", gender="female", event="throat clearing",
               style="news & science", answer="Morning!")
    assert format_target("asr", r) == "good morning"
    assert format_target("ser", r) == "good morning<happy>"
    assert format_target("only:ser+sgc", r) == "<happy><female>"
    assert format_target("ved+ssr", r) == "good morning<throat clearing><news & science>"
    assert format_target("sttc", r) == "good morning<answer>Morning!"
    assert parse("good morning<throat clearing><news & science>", "ssr+ved") == Result(
        transcript="good morning", event="throat clearing", style="news & science")


@pytest.mark.parametrize("spec", [s for s in SPECS if s.continues_after_transcript], ids=str)
def test_every_piece_of_a_target_that_closes_its_transcript_opens_what_follows(spec):
    rng = random.Random(str(spec))
    for _ in range(25):
        target = format_target(spec, random_result(spec, rng))
        end = target.index("<")
        for a, b in itertools.product(range(max(end - 2, 0), end + 1), range(end + 1, len(target) + 1)):
            if ">" not in target[end:b - 1]:  # a piece reaching past the first tag's end is not one token's
                assert opens_what_follows(target[a:b]), target[a:b]


def test_pieces_that_open_nothing_a_parse_reads_close_no_transcript():
    for piece in ["</", " </", "<=", "<<", "><", "a", "", "<hap>", "<answer x", "<Happy"]:
        assert not opens_what_follows(piece), piece
    for piece in ["<", ".<", ' "<', "<ans", "<answer>", "<happy>", "<throat cl"]:
        assert opens_what_follows(piece), piece


def test_multiword_labels_round_trip():
    for event, style in itertools.product(LABELS["event"], LABELS["style"]):
        x = Result(transcript="one two", event=event, style=style)
        assert parse(format_target("ved+ssr", x), "ved+ssr") == x
        y = Result(event=event, style=style)
        assert parse(format_target("only:ved+ssr", y), "only:ved+ssr") == y


def test_srwt_format_and_resolution():
    words = [Word("hello", 0.12, 0.48), Word("world", 0.52, 0.9)]
    assert format_target("srwt", Result(words=words)) == "hello<0.12,0.48> world<0.52,0.90>"
    assert format_target("srwt", Result(words=words), time_resolution=0.1) == "hello<0.1,0.5> world<0.5,0.9>"
    assert format_target("srwt", Result(words=[Word("a", 0.13, 1.0)]), time_resolution=0.02) == "a<0.12,1.00>"
    assert format_target("srwt", Result(words=[Word("a", 1.4, 2.6)]), time_resolution=1) == "a<1,3>"
    assert parse("hello<0.12,0.48> world<0.52,0.90>", "srwt") == Result(transcript="hello world", words=words)
    # OSUM writes no space between timed words; still readable.
    assert parse("hello<0.12,0.48>world<0.52,0.90>", "srwt") == Result(transcript="hello world", words=words)
    assert parse("", "srwt") == Result(transcript="", words=[])
    rng = random.Random(1)
    for _ in range(20):
        x = random_result(TaskSpec("srwt"), rng, resolution=0.1)
        assert parse(format_target("srwt", x, time_resolution=0.1), "srwt") == x


def test_chinese_round_trips():
    zh = Result(transcript="今天天气很好。", emotion="happy")
    assert format_target("ser", zh) == "今天天气很好。<happy>"
    assert parse("今天天气很好。<happy>", "ser") == zh
    assert parse("今天天气很好。", "asr") == Result(transcript="今天天气很好。")
    words = [Word("今天", 0.0, 0.4), Word("天气", 0.4, 0.8), Word("很好", 0.8, 1.2)]
    target = format_target("srwt", Result(words=words))
    assert target == "今天<0.00,0.40> 天气<0.40,0.80> 很好<0.80,1.20>"
    assert parse(target, "srwt") == Result(transcript="今天天气很好", words=words)
    assert join_words(["我", "love", "你", "。"]) == "我 love 你。"
    assert join_words(["안녕", "세상"]) == "안녕 세상"  # Korean keeps its spaces


def test_format_target_rejects_bad_results():
    with pytest.raises(ValueError, match="Result.emotion"):
        format_target("ser", Result(transcript="hi"))
    with pytest.raises(ValueError, match="Result.transcript"):
        format_target("asr", Result())
    with pytest.raises(ValueError, match="'joyful' is not a emotion label"):
        format_target("ser", Result(transcript="hi", emotion="joyful"))
    with pytest.raises(ValueError, match="'<'"):
        format_target("asr", Result(transcript="a <b> c"))
    with pytest.raises(ValueError, match="Result.words"):
        format_target("srwt", Result(transcript="hi"))
    with pytest.raises(ValueError, match="start <= end"):
        format_target("srwt", Result(words=[Word("a", 2.0, 1.0)]))
    with pytest.raises(ValueError, match="without spaces"):
        format_target("srwt", Result(words=[Word("a b", 0.0, 1.0)]))
    with pytest.raises(ValueError, match="Result.answer"):
        format_target("sttc", Result(transcript="hi"))
    with pytest.raises(ValueError, match="time_resolution"):
        format_target("srwt", Result(words=[]), time_resolution=0)


def test_result_helpers():
    r = Result(transcript="hi", gender="male", event="cough", words=[Word("hi", 0.0, 0.5)])
    assert r.labels() == {"event": "cough", "gender": "male"}
    d = r.to_dict()
    assert d == {"transcript": "hi", "gender": "male", "event": "cough",
                 "words": [{"word": "hi", "start": 0.0, "end": 0.5}], "errors": []}
    assert Result.from_dict(d) == r


# ---- parsing model output ----------------------------------------------------------------------------

def errors_of(text, spec):
    return " | ".join(parse(text, spec).errors)


def test_parse_is_lenient_about_spelling():
    assert parse("  hello   world  <HAPPY> ", "ser") == Result(transcript="hello world", emotion="happy")
    assert parse("x< Throat_Clearing ><NEWS &  Science>", "ved+ssr") == Result(
        transcript="x", event="throat clearing", style="news & science")
    assert parse("x<female><adult>", "asr+sap+sgc") == Result(transcript="x", age="adult", gender="female")
    assert parse("x<other><other>", "ved+ser") == Result(transcript="x", event="other", emotion="other")


@pytest.mark.parametrize("text, spec, expected, error", [
    ("hi<joyful>", "ser", Result(transcript="hi"), r"unknown tag <joyful>.*missing emotion tag"),
    ("hi<hap", "ser", Result(transcript="hi"), r"unclosed tag '<hap'.*missing emotion tag"),
    ("hi<happy><hap", "ser", Result(transcript="hi", emotion="happy"), r"unclosed tag '<hap'"),
    ("hi<happy> and more", "ser", Result(transcript="hi", emotion="happy"), r"unexpected text after tags: 'and more'"),
    ("hi<happy> oops <male>", "ser+sgc", Result(transcript="hi", emotion="happy", gender="male"),
     r"unexpected text 'oops' between tags"),
    ("hi<happy><sad>", "ser", Result(transcript="hi", emotion="happy"), r"extra emotion tag <sad> \(already <happy>\)"),
    ("hi<happy><male>", "ser", Result(transcript="hi", emotion="happy"),
     r"<male> is a gender label, which was not asked for"),
    ("hi<other>", "ved+ser", Result(transcript="hi"), r"ambiguous tag <other>: could be event or emotion"),
    ("hi", "ser+sgc", Result(transcript="hi"), r"missing emotion tag.*missing gender tag"),
    ("oops<happy>", "only:ser", Result(emotion="happy"), r"unexpected text before tags: 'oops'"),
    ("hi > there<happy>", "ser", Result(transcript="hi > there", emotion="happy"), r"stray '>'"),
    ("hi<0.1,0.2>", "asr", Result(transcript="hi"), r"unexpected time span"),
    ("hi<answer>yo", "ser", Result(transcript="hi"), r"unexpected <answer> separator"),
])
def test_parse_reports_instead_of_guessing(text, spec, expected, error):
    result = parse(text, spec)
    assert re.search(error, " | ".join(result.errors)), result.errors
    result.errors = []
    assert result == expected


def test_parse_srwt_malformed():
    r = parse("hello<0.10,0.50> world<1.2> foo<2.0,1.0> bar<1.0,1.5 baz", "srwt")
    assert r.words == [Word("hello", 0.1, 0.5)]
    assert r.transcript == "hello world foo bar"
    e = " | ".join(r.errors)
    assert "malformed time span <1.2> after 'world'" in e
    assert "<2.0,1.0> of 'foo' ends before it starts" in e
    assert "unclosed tag '<1.0,1.5 baz'" in e and "word 'bar' has no time span" in e
    r = parse("one two<0.1,0.2> <0.3,0.4> three<happy>", "srwt")
    assert r.words == [Word("two", 0.1, 0.2)]
    e = " | ".join(r.errors)
    assert "word 'one' has no time span" in e and "time span <0.3,0.4> has no word" in e
    assert "malformed time span <happy> after 'three'" in e


def test_parse_chat():
    assert parse("what's up?<answer> Not much. ", "sttc") == Result(transcript="what's up?", answer="Not much.")
    assert parse("a<ANSWER>b<answer>c", "sttc") == Result(transcript="a", answer="b<answer>c")
    r = parse("just talking", "sttc")
    assert r.transcript == "just talking" and r.answer is None and "missing <answer>" in r.errors[0]


def test_parse_without_spec():
    assert parse("hello<happy><male>") == Result(transcript="hello", emotion="happy", gender="male")
    assert parse("<sad><child>") == Result(emotion="sad", age="child")
    assert parse("") == Result(transcript="")
    assert parse("hi<0.00,0.30> there<0.30,0.60>") == Result(
        transcript="hi there", words=[Word("hi", 0.0, 0.3), Word("there", 0.3, 0.6)])
    assert parse("q<answer>a") == Result(transcript="q", answer="a")
    r = parse("hi<other><joyful>")
    assert r.labels() == {} and "ambiguous tag <other>" in r.errors[0] and "unknown tag <joyful>" in r.errors[1]


def test_parse_never_raises():
    rng = random.Random(0)
    alphabet = list("<>,.0123 ab你") + ["happy", "other", "<answer>", "<male>", "<0.1,0.2>", "  ", "\n"]
    specs = [None] + SPECS
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        for spec in rng.sample(specs, 10):
            r = parse(text, spec)
            assert isinstance(r, Result) and all(isinstance(e, str) for e in r.errors)
            for f, v in r.labels().items():
                assert is_valid_label(f, v)
