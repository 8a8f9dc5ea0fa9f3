"""Joint CTC/LLM decoding: prefix scores against brute force and torch's CTC, the processor's rules, and
generation with it (batch == single, beams, only flagged items touched)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from osum import tasks
from osum.config import CTC_WEIGHTS, GenerationConfig
from osum.model.ctc_prefix import CTCJointScores, CTCPrefixScorer
from osum.model.speech_llm import SpeechLLM
from tests.conftest import tiny_config
from tests.test_model import diversify, random_features

BLANK = 0


def collapse(path: tuple[int, ...]) -> list[int]:
    return [s for i, s in enumerate(path) if s != BLANK and (i == 0 or s != path[i - 1])]


def brute_prefix(log_probs: torch.Tensor, prefix: list[int]) -> float:
    """log P(the CTC output begins with prefix), summed over every path."""
    T, V = log_probs.shape
    total = -math.inf
    for path in itertools.product(range(V), repeat=T):
        if collapse(path)[: len(prefix)] == prefix:
            total = float(torch.logaddexp(torch.tensor(total), log_probs[range(T), list(path)].sum()))
    return total


def scorer_of(log_probs: torch.Tensor, lens: torch.Tensor) -> CTCPrefixScorer:
    """A scorer reading these log-probs (B, T, V): frames that are the log-probs, an identity table."""
    return CTCPrefixScorer(log_probs, torch.eye(log_probs.shape[-1]), lens, BLANK)


def walk(scorer: CTCPrefixScorer, item: int, tokens: list[int]) -> tuple[list[float], torch.Tensor]:
    """Extend the empty prefix token by token: each prefix's score, and the last state."""
    items = torch.tensor([item])
    state, last, scores = scorer.initial(items), torch.tensor([-1]), []
    for token in tokens:
        score, states = scorer.extend(items, state, last, torch.tensor([[token, 3]]))
        scores.append(float(score[0, 0]))
        state, last = states[:, 0], torch.tensor([token])
    return scores, state


def test_prefix_scores_match_brute_force_for_items_of_different_lengths():
    torch.manual_seed(0)
    log_probs = torch.randn(2, 5, 4).log_softmax(-1)
    lens = torch.tensor([5, 4])
    scorer = scorer_of(log_probs, lens)
    for item in (0, 1):
        tokens = [1, 1, 2]  # the repeat needs a blank between its two tokens
        scores, _ = walk(scorer, item, tokens)
        n = int(lens[item])
        for i, score in enumerate(scores):
            assert score == pytest.approx(brute_prefix(log_probs[item, :n], tokens[: i + 1]), abs=1e-4)


def test_items_not_needed_skip_the_normaliser_and_the_others_score_the_same():
    torch.manual_seed(1)
    log_probs = torch.randn(3, 5, 4).log_softmax(-1)
    lens = torch.tensor([5, 4, 3])
    full = scorer_of(log_probs, lens)
    part = CTCPrefixScorer(log_probs, torch.eye(4), lens, BLANK, needed=torch.tensor([True, False, True]))
    assert part.lse[1].eq(0).all() and not full.lse[1].eq(0).all()
    for item in (0, 2):
        assert walk(part, item, [1, 1, 2])[0] == walk(full, item, [1, 1, 2])[0]


def test_end_score_is_the_ctc_log_likelihood_and_increments_telescope():
    torch.manual_seed(1)
    frames, table = torch.randn(3, 30, 8), torch.randn(12, 8)  # as the model's: positions against embeddings
    log_probs = (frames @ table.T).log_softmax(-1)
    lens = torch.tensor([30, 17, 25])
    scorer = CTCPrefixScorer(frames, table, lens, BLANK)
    for item, tokens in enumerate(([4, 4, 7, 1, 9], [2, 3, 3, 3], [11, 5, 6, 5, 11, 2])):
        _, state = walk(scorer, item, tokens)
        n = int(lens[item])
        expected = -F.ctc_loss(log_probs[item, :n, None], torch.tensor([tokens]), torch.tensor([n]),
                               torch.tensor([len(tokens)]), blank=BLANK, reduction="sum")
        assert float(scorer.end(state)[0]) == pytest.approx(float(expected), abs=1e-3)


def test_a_transcript_longer_than_the_audio_allows_scores_impossible_without_nan():
    log_probs = torch.randn(1, 3, 5).log_softmax(-1)
    scores, state = walk(scorer_of(log_probs, torch.tensor([3])), 0, [1, 1, 2])
    assert scores[-1] < -1e20 and float(scorer_of(log_probs, torch.tensor([3])).end(state)) < -1e20
    assert all(math.isfinite(s) for s in scores)


def peaked(tokens: list[int], vocab: int, stretch: int = 2) -> torch.Tensor:
    """CTC log-probs (1, T, V) that spell `tokens`, each held for `stretch` positions with a blank after it."""
    frames = [t for token in tokens for t in [token] * stretch + [BLANK]]
    logits = torch.full((len(frames), vocab), -6.0)
    logits[range(len(frames)), frames] = 6.0
    return logits.log_softmax(-1)[None]


def run_greedy(processor: CTCJointScores, llm_scores: torch.Tensor, steps: int, stop: int) -> list[int]:
    """Greedy decoding of one row through the processor, the LLM proposing `llm_scores` (V,) at every step."""
    ids: list[int] = []
    for _ in range(steps):
        out = processor(torch.tensor([ids], dtype=torch.long), llm_scores[None].clone())
        ids.append(int(out[0].argmax()))
        if ids[-1] == stop:
            break
    return ids


def test_ctc_spells_out_the_audio_and_ends_it_when_the_llm_has_no_preference():
    vocab, stop = 6, 5
    scorer = scorer_of(peaked([3, 1, 1, 2], vocab), torch.tensor([12]))
    processor = CTCJointScores(scorer, torch.tensor([0.5]), [stop], candidates=vocab)
    assert run_greedy(processor, torch.zeros(vocab), 10, stop) == [3, 1, 1, 2, stop]


def test_ctc_chooses_only_among_the_llms_candidates():
    vocab, stop = 6, 5
    scorer = scorer_of(peaked([1], vocab), torch.tensor([3]))
    llm = torch.tensor([0.0, 1.5, 0.0, 2.0, 3.0, -1.0])  # top 2: tokens 4 and 3, then 1; CTC wants 1
    out = CTCJointScores(scorer, torch.tensor([0.9]), [stop], candidates=2)(torch.zeros(1, 0, dtype=torch.long), llm[None])
    assert set(torch.nonzero(out[0] > torch.finfo(out.dtype).min).flatten().tolist()) == {3, 4}
    out = CTCJointScores(scorer, torch.tensor([0.9]), [stop], candidates=3)(torch.zeros(1, 0, dtype=torch.long), llm[None])
    assert int(out[0].argmax()) == 1  # once token 1 is a candidate the audio wins it


def test_rows_of_unflagged_items_and_finished_rows_are_left_alone():
    vocab, stop = 6, 5
    log_probs = torch.cat([peaked([2, 3], vocab), peaked([4, 1], vocab)])
    scorer = scorer_of(log_probs, torch.tensor([6, 6]))
    # Two items × two beams; item 1 is not a transcript.
    processor = CTCJointScores(scorer, torch.tensor([0.5, 0.0]), [stop], candidates=vocab, num_beams=2)
    scores = torch.randn(4, vocab)
    ids = torch.tensor([[2, stop], [2, 3], [4, 1], [4, 4]])
    out = processor(ids, scores.clone())
    assert torch.equal(out[0], scores[0])  # finished
    assert torch.equal(out[2:], scores[2:])  # item 1
    assert int(out[1].argmax()) == stop  # item 0's second beam has spelled what was said


def test_a_tag_opener_closes_the_transcript_and_what_follows_is_the_llms():
    vocab, stop, opener = 7, 5, 6  # opener: a token such as "<" that begins a tag
    scorer = scorer_of(peaked([3, 1], vocab), torch.tensor([6]))
    processor = CTCJointScores(scorer, torch.tensor([0.5]), [stop, opener], candidates=vocab)
    llm = torch.zeros(vocab)
    llm[opener] = 1.0  # the LLM wants its tag; the audio lets it come only after the words
    assert run_greedy(processor, llm, 3, opener) == [3, 1, opener]
    after = torch.randn(1, vocab)
    assert torch.equal(processor(torch.tensor([[3, 1, opener]]), after.clone()), after)


def test_transcript_enders_are_the_stops_and_tokens_opening_with_a_tag_mark(model):
    from osum import tasks

    gen = model.config.generation
    enders = model.transcript_enders(gen)
    assert set(model.stop_ids(gen)) <= set(enders)
    assert (model.ctc_blank_id in enders) == (model.ctc_blank_id in model.stop_ids(gen))  # a blank only as a stop
    opener = model.tokenizer.convert_tokens_to_ids(tasks.TRANSCRIPT_END)
    assert opener in enders
    # The first token of what follows the transcript is an ender, also where BPE merges "<" with the
    # punctuation before it (".<"); no token before it is one.
    for spec, text in itertools.product(("asr+ser", "sttc"), ("hello world", "Hello world.", "Is it?")):
        target = tasks.format_target(spec, tasks.Result(transcript=text, emotion="happy", answer="hi"))
        ids = model.prompts.encode(target)
        first = next(i for i in range(len(ids)) if tasks.TRANSCRIPT_END in model.tokenizer.decode(ids[: i + 1]))
        assert ids[first] in enders and not set(ids[:first]) & set(enders), (spec, text)


def test_a_prefix_missing_from_the_cache_is_replayed():
    vocab, stop = 6, 5
    scorer = scorer_of(peaked([3, 1, 2], vocab), torch.tensor([9]))
    fresh = CTCJointScores(scorer, torch.tensor([0.5]), [stop], candidates=vocab)
    walked = CTCJointScores(scorer, torch.tensor([0.5]), [stop], candidates=vocab)
    llm = torch.randn(vocab)
    for prefix in ([], [3]):
        walked(torch.tensor([prefix], dtype=torch.long), llm[None].clone())
    assert (0, (3, 1)) in walked.cache and not fresh.cache
    last = walked(torch.tensor([[3, 1]]), llm[None].clone())
    assert torch.allclose(fresh(torch.tensor([[3, 1]]), llm[None].clone()), last)


def test_generation_settings_are_checked():
    with pytest.raises(ValueError, match="ctc_weight must be in"):
        GenerationConfig(ctc_weight=1.5)
    with pytest.raises(ValueError, match="ctc_candidates must be at least 1"):
        GenerationConfig(ctc_candidates=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return diversify(SpeechLLM(tiny_config("lora.dropout=0.0", "llm.tie_word_embeddings=false"))).eval()


def test_joint_decoding_batch_equals_single_greedy_and_beam(model):
    lengths = [260, 75, 181]
    feats, lens = random_features(lengths, seed=1)
    prompts = ["Transcribe the audio.", "Transcribe.", "Transcribe."]
    specs = [tasks.parse_spec("asr"), tasks.parse_spec("srwt"), tasks.parse_spec("asr")]
    for beams in (1, 3):
        gen = dataclasses.replace(model.config.generation, num_beams=beams, max_new_tokens=8, ctc_weight=0.5,
                                  compression_ratio_threshold=None)
        batched = model.generate_ids(feats, lens, prompts, gen, specs=specs)
        for i, n in enumerate(lengths):
            single = model.generate_ids(feats[i : i + 1, :n], lens[i : i + 1], [prompts[i]], gen,
                                        specs=[specs[i]])
            assert single == [batched[i]], (beams, i)
        llm_only = model.generate_ids(feats, lens, prompts, dataclasses.replace(gen, ctc_weight=0.0))
        assert batched[1] == llm_only[1]  # srwt's output is the LLM's alone
        assert model.generate_ids(feats, lens, prompts, gen) == llm_only  # no specs: free instructions
    assert batched[0] != llm_only[0] or batched[2] != llm_only[2]  # and the asr ones did change


def test_engine_passes_each_item_its_task(model, monkeypatch):
    from osum.infer.engine import Engine

    seen = []
    generate = model.generate

    def spy(*args, specs=None, **kwargs):
        seen.append(specs)
        return generate(*args, specs=specs, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    gen = dataclasses.replace(model.config.generation, max_new_tokens=4, ctc_weight=0.3)
    engine = Engine(model, generation=gen)
    wav = torch.randn(16000).numpy() * 0.1
    for task in ("asr", "asr+ser", "srwt", "sttc", "only:ser"):
        engine.run([wav, wav], task=task)
    assert [str(specs[0]) for specs in seen] == ["asr", "asr+ser", "srwt", "sttc", "only:ser"]
    assert all(len(specs) == 2 and specs[0] == specs[1] for specs in seen)


def test_a_stop_inside_the_transcript_becomes_its_likeliest_closer():
    """Flagged open rows: the best closer takes the best stop's score, stops are ruled out; rows closed by any
    ender (a closer or not) and items not flagged are untouched; beams map rows to items."""
    from osum.model.speech_llm import NoStopInTranscript

    stops, enders, closers = [0, 1], [5, 6, 7], [5, 6]
    rule = NoStopInTranscript(torch.tensor([True, False]), stops, enders, closers, num_beams=2)
    ids = torch.tensor([[3, 4], [3, 5], [3, 4], [2, 2]])  # item 0: open, closed; item 1: two open beams
    scores = torch.tensor([[4.0, 2.0, 0.0, 1.0, 0.0, -1.0, 0.5, 0.0]]).repeat(4, 1)
    out = rule(ids, scores)
    assert torch.isinf(out[0, stops]).all() and out[0, 6] == 4.0 and out[0, 5] == -1.0
    assert torch.equal(out[0, 2:6], scores[0, 2:6]) and out[0].argmax() == 6  # the stop's place, taken by a closer
    assert torch.equal(out[1:], scores[1:])  # closed, or an item not flagged
    low = torch.tensor([[-3.0, -2.0, 0.0, 1.0, 0.0, 2.0, 0.5, 0.0]])
    assert rule(ids[:1], low)[0, 5] == 2.0  # a closer likelier than the stops keeps its own score
    ender = torch.tensor([[3.0, 2.0, 0.0, 1.0, 0.0, -1.0, 0.5, 9.0]])
    assert rule(ids[:1], ender)[0, 7] == 9.0 and rule(ids[:1], ender)[0, 6] == 3.0  # "</" is no closer
    assert torch.equal(rule(torch.tensor([[3, 7]]), scores[:1]), scores[:1])  # but it ends the transcript
    with pytest.raises(ValueError, match="no token closes a transcript"):
        NoStopInTranscript(torch.tensor([True]), stops, enders, [], 1)
    with pytest.raises(ValueError, match="no stop tokens"):
        NoStopInTranscript(torch.tensor([True]), [], enders, closers, 1)
    with pytest.raises(ValueError, match=r"closers \[8\] are not among the enders"):
        NoStopInTranscript(torch.tensor([True]), stops, enders, [5, 8], 1)


def test_continuing_items_do_not_stop_inside_the_transcript(model):
    """An LLM that would stop at once: with the rule a flagged item closes its (empty) transcript instead and goes
    on; batch == single; the unflagged item is decoded as without the rule."""
    feats, lens = random_features([200, 90], seed=3)
    prompts = ["Transcribe.", "Transcribe."]
    gen = dataclasses.replace(model.config.generation, max_new_tokens=6, compression_ratio_threshold=None)
    stops = set(model.stop_ids(gen))
    closers = set(model.transcript_closers()) - stops
    bias = torch.zeros(model.base_llm.get_output_embeddings().weight.shape[0])
    bias[sorted(stops)] = 50.0
    head = model.base_llm.get_output_embeddings()
    head.bias = torch.nn.Parameter(bias)
    try:
        plain = model.generate_ids(feats, lens, prompts, gen)
        specs = [tasks.parse_spec("asr+ser"), tasks.parse_spec("asr")]
        ruled = model.generate_ids(feats, lens, prompts, gen, specs=specs)
        single = model.generate_ids(feats[:1, :200], lens[:1], prompts[:1], gen, specs=specs[:1])
    finally:
        head.bias = None
    assert plain == [[], []]
    assert ruled[1] == [] and single == ruled[:1]
    assert ruled[0] and ruled[0][0] in closers  # where it would have stopped, the transcript is closed instead
    assert ruled[0][0] not in model.tokenizer.added_tokens_decoder  # by plain text, not a chat-template marker
    assert tasks.opens_what_follows(model.tokenizer.decode(ruled[0][:1]))  # that opens a tag, not "</"


def test_fit_ctc_weight_pools_the_lists_and_takes_the_smaller_weight_on_ties(monkeypatch, model):
    from osum.evaluate import run

    # errors per weight on a long synthetic list (1 000 words) and a short real one (100 words): the real list
    # alone would pick 0.5, the synthetic one 0.2; pooled, 0.2 and 0.3 tie (30 errors) and 0.2 wins
    errors = {"synth.jsonl": {0.0: 40, 0.1: 30, 0.2: 10, 0.3: 12, 0.5: 25},
              "real.jsonl": {0.0: 40, 0.1: 30, 0.2: 20, 0.3: 18, 0.5: 10}}
    words = {"synth.jsonl": 1000, "real.jsonl": 100}
    calls = []

    def scripted(model, data, task, out, options, model_name=None):
        calls.append((data, task, options.ctc_weight, options.plots))
        e, n = errors[data][options.ctc_weight], words[data]
        return {"text": {"errors": e, "ref_len": n, "rate": e / n, "utterances": 1}}

    monkeypatch.setattr(run, "evaluate", scripted)
    weights = (0.0, 0.1, 0.2, 0.3, 0.5)
    best, tried = run.fit_ctc_weight(model, ["synth.jsonl", "real.jsonl"], weights)
    assert best == 0.2 and [w for w, _, _ in tried] == list(weights)
    assert [rate for _, rate, _ in tried] == pytest.approx([80 / 1100, 60 / 1100, 30 / 1100, 30 / 1100, 35 / 1100])
    assert calls == [(d, "asr", w, False) for w in weights for d in ("synth.jsonl", "real.jsonl")]
    errors["real.jsonl"][0.5] = 0  # now 0.5 pools 25 errors, fewer than any other
    assert run.fit_ctc_weight(model, ["synth.jsonl", "real.jsonl"], weights)[0] == 0.5
    # by default every weight of CTC_WEIGHTS is tried, the LLM alone (0) among them
    for table in errors.values():
        table.update({w: 50 for w in CTC_WEIGHTS if w not in table})
    calls.clear()
    assert run.fit_ctc_weight(model, ["synth.jsonl"])[0] == 0.2
    assert [w for _, _, w, _ in calls] == list(CTC_WEIGHTS) and 0.0 in CTC_WEIGHTS
    with pytest.raises(ValueError, match="at least one list"):
        run.fit_ctc_weight(model, [])


def test_export_chooses_the_ctc_weight_on_a_held_out_list(tmp_path, model, capsys):
    from osum.cli import main
    from osum.model import checkpoint
    from tests.test_align import CLIPS, TEXTS

    data = tmp_path / "valid.jsonl"
    data.write_text("".join(json.dumps({"key": f"v{i}", "audio": str(Path(c).resolve()), "text": t}) + "\n"
                            for i, (c, t) in enumerate(zip(CLIPS, TEXTS))))
    source = checkpoint.save(model, tmp_path / "ckpt")
    assert main(["export", str(source), "--keep-lora", "--out", str(tmp_path / "out"), "--fit-ctc-weight", str(data),
                 "--ctc-weights", "0,0.7"]) == 0
    err = capsys.readouterr().err
    rates = {float(m[0]): float(m[1]) for m in re.findall(r"ctc_weight ([0-9.]+): WER ([0-9.]+)% pooled", err)}
    assert sorted(rates) == [0.0, 0.7]
    chosen = json.loads((tmp_path / "out" / "config.json").read_text())["model"]["generation"]["ctc_weight"]
    assert rates[chosen] == min(rates.values()) and f"generation.ctc_weight {chosen}" in err
    for bad in ["0,1.5", "0.3,x", "0.3,0.3"]:
        with pytest.raises(SystemExit):
            main(["export", str(source), "--out", str(tmp_path / "bad"), "--fit-ctc-weight", str(data),
                  "--ctc-weights", bad])
        assert "--ctc-weights" in capsys.readouterr().err and not (tmp_path / "bad").exists()
