"""The tag grammar (tasks.TagGrammar): what may follow a transcript; the processor that holds decoding to it
(TagGrammarScores); and generation with it: every constrained output parses, batch == single."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from osum import tasks
from osum.model.speech_llm import SpeechLLM, TagGrammarScores
from tests.conftest import tiny_config
from tests.test_model import diversify, random_features

GRAMMAR_SPECS = [s for s in tasks.all_specs() if tasks.tag_grammar(s) is not None]


def walk(grammar: tasks.TagGrammar, rng: random.Random, max_len: int = 3) -> str:
    """A random output of the grammar, grown a few characters at a time from its continuations."""
    text = ""
    while not grammar.complete(text):
        text += rng.choice(sorted(grammar.continuations(text, max_len)[0]))
    return text


def test_specs_with_and_without_a_grammar():
    assert tasks.tag_grammar("srwt") is None  # its time spans are written inside the transcript
    assert {str(s) for s in GRAMMAR_SPECS} == {str(s) for s in tasks.all_specs()} - {"srwt"}
    plain = tasks.tag_grammar("asr")  # nothing follows the transcript: the output ends with it
    assert plain.complete("") and plain.state("<") is None and plain.state("<happy>") is None
    assert tasks.tag_grammar("ser+sgc") == tasks.tag_grammar("sgc+ser")  # one grammar per spec, hashable


@pytest.mark.parametrize("spec", ["asr+ser", "asr+ved+ssr+sap+sgc+lid", "only:ssr+sgc", "sttc"])
def test_every_target_is_in_its_grammar_and_every_prefix_goes_on(spec):
    grammar = tasks.tag_grammar(spec)
    parsed = tasks.parse_spec(spec)
    fields = {f: tasks.LABELS[f] for f in parsed.fields}
    for i in range(40):
        result = tasks.Result(transcript=None if parsed.only else "hello there",
                              answer="A reply." if parsed.base == "sttc" else None,
                              **{f: labels[i % len(labels)] for f, labels in fields.items()})
        target = tasks.format_target(parsed, result)
        follows = target if parsed.only else target[target.index(tasks.TRANSCRIPT_END):]
        assert grammar.complete(follows)
        for n in range(len(follows)):
            assert grammar.state(follows[:n]) is not None
            more, filling = grammar.continuations(follows[:n], 4)
            piece = follows[n:n + 4]
            assert (piece in more or any(piece.startswith(f) for f in filling)  # sttc: then the free reply
                    or grammar.complete(follows[:n]))


def test_outside_the_vocabulary_is_not_allowed():
    style = tasks.tag_grammar("asr+ssr")
    assert style.state("<horror>") is None and style.state("<horror story>") == (1, "")
    assert style.state("<horror story><") is None  # nothing after the last tag
    assert style.state("</") is None and style.state("<Horror") is None
    chat = tasks.tag_grammar("sttc")
    assert chat.state("<1") is None and chat.state("<ans") == (0, "<ans")
    assert chat.complete("<answer>") and chat.complete("<answer>It is <odd>, fine.")
    more, filling = chat.continuations("<ans", 10)
    assert more == {"w", "we", "wer", "wer>"} and filling == {"wer>"}
    assert tasks.tag_grammar("asr+ser").continuations("<happy>", 5) == (set(), set())
    with pytest.raises(ValueError, match="does not begin an output"):
        style.continuations("<x", 3)


@pytest.mark.parametrize("spec", GRAMMAR_SPECS, ids=str)
def test_any_output_of_a_grammar_parses_to_labels_of_the_vocabulary(spec):
    grammar, rng = tasks.tag_grammar(spec), random.Random(str(spec))
    for _ in range(3):
        follows = walk(grammar, rng)
        text = follows if spec.only else "some words" + follows
        if spec.base == "sttc":
            text += "a reply"
        result = tasks.parse(text, spec)
        assert result.errors == [], (text, result.errors)
        assert set(result.labels()) == set(spec.fields)


# ---- the processor, on a toy vocabulary ------------------------------------------------------------------

TEXTS = ["<stop>", "hi", " there", "<", ".<", "</", "happy", "sad", ">", "<happy>", "><", "female", "male",
         "answer", "ans", "wer>", ">It", "<1", "", "hap"]
IDS = {t: i for i, t in enumerate(TEXTS)}
STOP, ADDED = IDS["<stop>"], IDS[""]  # the added token's text is "" (SpeechLLM.token_texts)
ENDERS = [IDS[t] for t in ("<", ".<", "</", "<happy>", "><", "<1")] + [ADDED]
PIECES = {t: [i] for t, i in IDS.items() if t and set(t) <= set("".join(tasks.OPENINGS)) and i != STOP}


def allowed(spec: str | None, written: list[str]) -> set[str]:
    """The toy tokens a one-row processor for `spec` leaves possible after `written`."""
    grammar = tasks.tag_grammar(spec) if spec else None
    only = spec is not None and tasks.parse_spec(spec).only
    rule = TagGrammarScores([grammar], [only], TEXTS, PIECES, ENDERS, [STOP])
    out = rule(torch.tensor([[IDS[t] for t in written]], dtype=torch.long), torch.zeros(1, len(TEXTS)))
    return {TEXTS[i] for i in torch.isfinite(out[0]).nonzero()[:, 0].tolist()}


def test_the_processor_holds_each_row_to_its_grammar():
    everything = set(TEXTS)
    # an open transcript: the enders that cannot begin what follows are ruled out, words are not
    assert allowed("asr+ser", ["hi", " there"]) == everything - {"</", "><", "<1", ""}
    assert allowed("sttc", ["hi", " there"]) == everything - {"</", "><", "<happy>", "<1", ""}
    assert allowed(None, ["hi", "</"]) == everything  # no grammar: untouched
    # plain asr: no ender but the stop, an added token ("": a chat-template marker) included
    assert allowed("asr", ["hi", " there"]) == everything - {"<", ".<", "</", "<happy>", "><", "<1", ""}
    # from the '<' of the closer on: the rest of a label, then the end
    assert allowed("asr+ser", ["hi", ".<"]) == {"happy", "hap", "sad"}
    assert allowed("asr+ser", ["hi", "<", "happy"]) == {">"}
    assert allowed("asr+ser", ["hi", "<happy>"]) == {"<stop>"}  # every tag written: only the end
    assert allowed("asr+ser", ["hi", "</"]) == everything  # left the grammar (not by this rule): left as it is
    # only-X: from the first token; "><" closes one tag and opens the next
    assert allowed("only:ser+sgc", []) == {"<", "<happy>"}
    assert allowed("only:ser+sgc", ["<happy>"]) == {"<"}  # the gender tag opens
    assert allowed("only:ser+sgc", ["<", "sad"]) == {">", "><"}
    assert allowed("only:ser+sgc", ["<", "happy", "><", "female"]) == {">"}
    assert allowed("only:ser+sgc", ["<", "happy", "><", "male", ">"]) == {"<stop>"}
    # sttc: the separator, then anything
    assert allowed("sttc", ["hi", "<", "ans"]) == {"wer>"}
    assert allowed("sttc", ["hi", "<", "answer"]) == {">", "><", ">It"}  # a token may fill it and begin the reply
    assert allowed("sttc", ["hi", ".<", "answer", ">"]) == everything


def test_the_processor_keeps_the_scores_it_allows_and_maps_beams_to_items():
    rule = TagGrammarScores([tasks.tag_grammar("asr+ser"), None], [False, False], TEXTS, PIECES, ENDERS, [STOP],
                            num_beams=2)
    ids = torch.tensor([[IDS["<"]], [IDS["hi"]], [IDS["<"]], [IDS["<"]]])
    scores = torch.randn(4, len(TEXTS))
    out = rule(ids, scores)
    assert torch.equal(out[0, [IDS["happy"], IDS["sad"], IDS["hap"]]], scores[0, [IDS["happy"], IDS["sad"],
                                                                                  IDS["hap"]]])
    assert torch.isinf(out[0, IDS["hi"]]) and torch.isinf(out[1, IDS["</"]]) and out[1, IDS["hi"]] == scores[1, 1]
    assert torch.equal(out[2:], scores[2:])  # item 1's beams: no grammar
    with pytest.raises(ValueError, match="no stop tokens"):
        TagGrammarScores([None], [False], TEXTS, PIECES, ENDERS, [])


# ---- generation ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return diversify(SpeechLLM(tiny_config("lora.dropout=0.0", "llm.tie_word_embeddings=false"))).eval()


def test_constrained_outputs_of_a_random_model_parse(model):
    """A random LLM that would stop at once: asr+tags and sttc close the transcript at once (NoStopInTranscript)
    and write well-formed tags or the separator, only-X writes its tags from the start; every output parses with
    labels of the vocabulary; batch == single; with constrain_tags off the outputs are not all well formed."""
    specs = [tasks.parse_spec(s) for s in ("asr+ser+sgc", "only:ssr+sap", "sttc", "asr")]
    feats, lens = random_features([200, 90, 150, 120], seed=4)
    prompts = ["Describe the audio."] * len(specs)
    gen = dataclasses.replace(model.config.generation, max_new_tokens=24, compression_ratio_threshold=None)
    stops = sorted(model.stop_ids(gen))
    head = model.base_llm.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[stops] = 5.0  # the stop is likely but not certain: where the grammar allows it, the output ends
    head.bias = torch.nn.Parameter(bias)
    try:
        batched = model.generate(feats, lens, prompts, gen, specs=specs)
        single = [model.generate(feats[i:i + 1, :n], lens[i:i + 1], prompts[:1], gen, specs=[specs[i]])[0]
                  for i, n in enumerate([200, 90, 150, 120])]
        free = model.generate(feats, lens, prompts, dataclasses.replace(gen, constrain_tags=False), specs=specs)
    finally:
        head.bias = None
    assert batched == single
    for spec, text in zip(specs[:3], batched):
        result = tasks.parse(text, spec)
        assert result.errors == [], (spec, text)
        assert set(result.labels()) == set(spec.fields)
        assert all(tasks.is_valid_label(f, v) for f, v in result.labels().items())
    assert tasks.TRANSCRIPT_END not in batched[3]  # plain asr: nothing follows its transcript
    assert any(tasks.parse(t, s).errors for s, t in zip(specs[:3], free[:3]))
