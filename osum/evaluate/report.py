"""Score references against outputs and write the run: per-utterance records, summary and a markdown report.

    records, summary = score(items, Plan.for_task("asr+ser"))
    write_run("results/meld", records, summary, command="osum eval ...")
      -> hyp.jsonl, summary.json, report.md, confusion_emotion.png (each written to a temp name, then renamed)

An item is {"key", "ref": reference_of(row), "hyp": hypothesis_of(row) or None, "error": why no output}.
Every utterance is scored or counted under a named reason; a missing or failed output is scored as empty.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from osum import fileio
from osum import tasks
from osum.evaluate import metrics as M
from osum.evaluate.judge import Judge
from osum.evaluate.normalize import NORMALIZERS, get_normalizer, has_cjk

METRICS = ("auto", *M.TEXT_METRICS)


# ---------------------------------------------------------------------------------------------------
# Reading references and outputs into one shape


def _canonical_keys(row: dict) -> dict:
    """Sample field names for the aliases osum.data accepts (wav, txt, lang, transcript)."""
    from osum.data.schema import KEY_ALIASES

    return {KEY_ALIASES.get(k, k): v for k, v in row.items()}


def reference_of(row: dict) -> dict:
    """Reference fields of an eval JSONL row (osum.data Sample names and their aliases, e.g. OSUM's `txt`).

    A target-style text ("hello<happy>") is read back with tasks.parse: transcript plus tags, explicit
    fields winning over tags found in the text. Without a text, the transcript of `words` is the reference.
    """
    row = _canonical_keys(row)
    ref: dict = {}
    text = row.get("text")
    if text is not None:
        text = str(text)
        if "<" in text:
            parsed = tasks.parse(text)
            text = parsed.transcript or ""
            ref.update(parsed.labels())
            if parsed.words is not None:
                ref["words"] = [[w.word, w.start, w.end] for w in parsed.words]
            if parsed.answer is not None:
                ref["answer"] = parsed.answer
        ref["text"] = text
    for f in tasks.TAG_FIELDS:
        if row.get(f) is not None:
            ref[f] = str(row[f])
    if row.get("words") is not None:
        ref["words"] = _word_list(row["words"], f"reference {row.get('key')!r}")
    if ref.get("text") is None and ref.get("words") is not None:
        ref["text"] = tasks.join_words([w[0] for w in ref["words"]])  # srwt sets may carry only words
    for f in ("answer", "question"):
        if row.get(f) is not None:
            ref[f] = str(row[f])
    return ref


def hypothesis_of(row: dict, spec: tasks.TaskSpec | None = None) -> dict:
    """Output fields from an engine/`osum infer` row, an `osum eval` hyp.jsonl row (its "hyp"), a JSONL row
    with Sample-style fields, or {"raw": model text} (parsed under `spec`; None infers the layout)."""
    if isinstance(row.get("hyp"), dict):
        row = row["hyp"]
    row = _canonical_keys(row)
    structured = any(k in row for k in ("text", "labels", "words", "answer", *tasks.TAG_FIELDS))
    if not structured and row.get("raw") is not None:
        parsed = tasks.parse(str(row["raw"]), spec)
        hyp = {"text": parsed.transcript, "labels": parsed.labels(), "raw": row["raw"]}
        if parsed.words is not None:
            hyp["words"] = [[w.word, w.start, w.end] for w in parsed.words]
        if parsed.answer is not None:
            hyp["answer"] = parsed.answer
        if parsed.errors:
            hyp["parse_errors"] = parsed.errors
        return hyp
    labels = dict(row.get("labels") or {})
    labels.update({f: row[f] for f in tasks.TAG_FIELDS if row.get(f) is not None})
    hyp = {"text": row.get("text"), "labels": labels}
    if row.get("words") is not None:
        hyp["words"] = _word_list(row["words"], "output")
    for k in ("answer", "raw", "parse_errors"):
        if row.get(k) is not None:
            hyp[k] = row[k]
    return hyp


def _word_list(words, what: str) -> list[list]:
    """[{word, start, end}] or [[word, start, end]] -> [[word, start, end]] with float times."""
    out = []
    for w in words:
        try:
            word, start, end = (w["word"], w["start"], w["end"]) if isinstance(w, dict) else w
            out.append([str(word), float(start), float(end)])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{what}: a word must be {{word, start, end}}, got {w!r}") from exc
    return out


# ---------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Plan:
    """Which metrics a run computes."""

    text_metric: str | None = "auto"  # "auto", "wer", "cer", "mer", or None for no transcript scoring
    normalizer: str = "auto"
    tag_fields: tuple[str, ...] = ()
    timestamps: bool = False
    chat: bool = False  # sttc: judge the reply (when a judge is given; otherwise marked absent)
    judge: Judge | None = None

    def __post_init__(self):
        if self.text_metric is not None and self.text_metric not in METRICS:
            raise ValueError(f"unknown text metric {self.text_metric!r}; valid: {', '.join(METRICS)}")
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"unknown normalizer {self.normalizer!r}; valid: {', '.join(NORMALIZERS)}")
        for f in self.tag_fields:
            tasks.task_of_field(f)

    @classmethod
    def for_task(cls, spec: str | tasks.TaskSpec, metric: str = "auto", normalizer: str = "auto",
                 judge: Judge | None = None) -> Plan:
        spec = tasks.parse_spec(spec)
        return cls(text_metric=None if spec.only else metric, normalizer=normalizer, tag_fields=spec.fields,
                   timestamps=spec.base == "srwt", chat=spec.base == "sttc", judge=judge)


def resolve_metric(metric: str, refs: list[dict]) -> str:
    """"auto": MER when any reference transcript contains CJK characters (it is CER on pure Chinese and WER
    on pure English), else WER."""
    if metric != "auto":
        return metric
    return "mer" if any(has_cjk(r.get("text") or "") for r in refs) else "wer"


def score(items: list[dict], plan: Plan) -> tuple[list[dict], dict]:
    """Per-utterance records (item + "errors") and the summary of a run."""
    refs = [item["ref"] for item in items]
    records = []
    counts = Counter()
    metric = resolve_metric(plan.text_metric, refs) if plan.text_metric else None
    text_total, text_scored, text_skipped = M.ErrorCounts(), 0, Counter()
    tag_pairs: dict[str, tuple[list, list]] = {f: ([], []) for f in plan.tag_fields}
    tag_skipped: dict[str, Counter] = {f: Counter() for f in plan.tag_fields}
    aas_total, aas_scored, aas_skipped = M.AASCounts(), 0, Counter()
    judge_scores, judge_failed, judge_skipped = [], Counter(), Counter()

    for item in items:
        ref, hyp = item["ref"], item.get("hyp")
        counts["utterances"] += 1
        if item.get("error"):
            counts["failed"] += 1
        elif hyp is None:
            counts["missing_hyp"] += 1
        hyp = hyp or {}
        if hyp.get("parse_errors"):
            counts["with_parse_errors"] += 1
        errors: dict = {}
        norm = get_normalizer(plan.normalizer, ref.get("text") or "")

        if metric:
            if ref.get("text") is None:
                text_skipped["no reference text"] += 1
            else:
                r, h = norm(ref["text"]), norm(hyp.get("text") or "")
                c = M.error_counts(metric, r, h)
                text_total += c
                text_scored += 1
                errors[metric] = {**c.to_dict(), "ref": r, "hyp": h}

        for f in plan.tag_fields:
            label = ref.get(f)
            canonical = tasks.normalize_label(f, label) if label is not None else None
            if label is None:
                tag_skipped[f]["no reference label"] += 1
                continue
            if canonical is None:
                tag_skipped[f][f"invalid reference label {label!r}"] += 1
                continue
            predicted = hyp.get("labels", {}).get(f)
            predicted = tasks.normalize_label(f, predicted) if predicted is not None else None
            tag_pairs[f][0].append(canonical)
            tag_pairs[f][1].append(predicted)
            errors[f] = {"ref": canonical, "hyp": predicted, "correct": canonical == predicted}

        if plan.timestamps:
            if ref.get("words") is None:
                aas_skipped["no reference words"] += 1
            else:
                a = M.aas(_normed_words(ref["words"], norm), _normed_words(hyp.get("words") or [], norm))
                aas_total += a
                aas_scored += 1
                errors["aas"] = a.to_dict()

        if plan.chat:
            if ref.get("answer") is None:
                judge_skipped["no reference answer"] += 1
            elif plan.judge is not None:
                question = ref.get("question") or ref.get("text") or ""
                result = plan.judge.score(question, ref["answer"], hyp.get("answer") or "")
                errors["judge"] = result.to_dict()
                if result.score is None:
                    judge_failed[result.error] += 1
                else:
                    judge_scores.append(result.score)

        record = {"key": item["key"], **({"audio": item["audio"]} if item.get("audio") else {}),
                  "ref": ref, "hyp": hyp or None, "errors": errors}
        if item.get("error"):
            record["error"] = item["error"]
        records.append(record)

    summary: dict = {"counts": {k: counts[k] for k in ("utterances", "failed", "missing_hyp", "with_parse_errors")}}
    if metric:
        summary["text"] = {"metric": metric, "normalizer": plan.normalizer, **text_total.to_dict(),
                           "utterances": text_scored, "skipped": dict(text_skipped)}
    if plan.tag_fields:
        summary["tags"] = {}
        for f in plan.tag_fields:
            s = M.tag_scores(f, *tag_pairs[f])
            summary["tags"][f] = {**s.to_dict(), "skipped": dict(tag_skipped[f])}
    if plan.timestamps:
        summary["aas"] = {**aas_total.to_dict(), "normalizer": plan.normalizer, "utterances": aas_scored,
                          "skipped": dict(aas_skipped)}
    if plan.chat:
        if plan.judge is None:
            summary["judge"] = {"status": "absent", "reason": "no judge endpoint given (--judge-url)"}
        else:
            summary["judge"] = {
                "status": "scored", **plan.judge.describe(),
                "mean": sum(judge_scores) / len(judge_scores) if judge_scores else None,
                "scored": len(judge_scores), "failed": dict(judge_failed), "skipped": dict(judge_skipped),
            }
    return records, summary


def _normed_words(words: list[list], norm) -> list[tuple[str, float, float]]:
    # A word that normalises to nothing (a lone punctuation mark) keeps its own spelling rather than
    # matching every other such word.
    return [(norm(w[0]) or w[0], w[1], w[2]) for w in words]


# ---------------------------------------------------------------------------------------------------
# Writing


def atomic_write(path: str | Path, text: str) -> Path:
    """Write to a temp file beside `path`, then rename: readers never see half a file."""
    return fileio.write_text(path, text)


def write_run(out_dir: str | Path, records: list[dict], summary: dict, command: str | None = None,
              plots: bool = True) -> dict[str, Path]:
    """hyp.jsonl, summary.json, report.md and (plots=True) one confusion PNG per tag field."""
    out = Path(out_dir)
    written = {}
    if plots:
        for f, s in summary.get("tags", {}).items():
            if s["total"]:
                name = f"confusion_{f}.png"
                written[name] = M.plot_confusion(_tag_scores_from(s), out / name)
                s["plot"] = name
    if command:
        summary["command"] = command
    written["hyp.jsonl"] = atomic_write(
        out / "hyp.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    written["summary.json"] = atomic_write(out / "summary.json", json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    written["report.md"] = atomic_write(out / "report.md", render_markdown(summary))
    return written


def _tag_scores_from(d: dict) -> M.TagScores:
    keys = ("field", "total", "correct", "missing", "classes", "columns", "confusion", "per_class")
    return M.TagScores(**{k: d[k] for k in keys})


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _reasons(skipped: dict) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in skipped.items()) or "–"


def headline(summary: dict) -> list[tuple[str, str]]:
    """(metric, value) pairs for one-line tables: error rate %, tag accuracy % and macro-F1 %, AAS ms, judge."""
    rows = []
    if "text" in summary:
        t = summary["text"]
        rows.append((f"{t['metric'].upper()} %", _pct(t["rate"])))
    for f, s in summary.get("tags", {}).items():
        rows.append((f"{f} accuracy %", _pct(s["accuracy"])))
        rows.append((f"{f} macro-F1 %", _pct(s["macro_f1"])))
    if "aas" in summary:
        a = summary["aas"]
        value = "–" if a["aas_ms"] is None else f"{a['aas_ms']:.1f}"
        rows.append(("AAS ms", f"{value} ({a['unaligned_ref']} of {a['ref_words']} ref words unaligned)"))
    if "judge" in summary:
        j = summary["judge"]
        value = "absent" if j["status"] == "absent" else ("–" if j["mean"] is None else f"{j['mean']:.2f}")
        rows.append(("chat judge 1–10", value))
    return rows


def _sources_of_answers(gen: dict, tag_heads: list[str] | None = None, located: str | None = None,
                        crop: int | None = None) -> list[str]:
    """Report lines for the model's decoding defaults that take parts of an answer from outside the LLM's text."""
    lines = []
    if gen.get("summary_tags"):
        headed = [f for f in gen["summary_tags"] if f in (tag_heads or [])]
        by_head = f" ({', '.join(headed)} by a linear head fitted on its statistics)" if headed else ""
        if located in headed:
            where = (f"from the {2 * crop + 1} frames around a fitted frame locator's peak" if crop else
                     "pooled where a fitted frame locator hears it")
            by_head = by_head[:-1] + f"; for {located}, {where})"
        lines.append(f"- labels read off the voice summary, not the text: {', '.join(gen['summary_tags'])}{by_head}")
    if gen.get("word_times") == "ctc":
        start, end = gen.get("ctc_time_offsets", [0.0, 0.0])
        lines.append(f"- srwt word times from the CTC alignment of the transcript (offsets {start:+.3f} s start, "
                     f"{end:+.3f} s end)")
    return ["Decoding defaults of the model (`generation` in summary.json):", "", *lines, ""] if lines else []


def _search(run: dict) -> list[str]:
    """How the run searched, which its command may leave to the model's config (`--decoding model`)."""
    gen = run.get("generation")
    if not gen:
        return []
    beams = gen.get("num_beams", 1)
    if gen.get("do_sample"):
        how = f"sampling (temperature {gen.get('temperature')}, top-p {gen.get('top_p')}, top-k {gen.get('top_k')})"
        how += f" over {beams} beams" if beams > 1 else ""
    else:
        how = f"beam search over {beams} beams" if beams > 1 else "greedy"
    ctc = gen.get("ctc_weight") or 0
    joint = f", transcripts jointly with the CTC head (weight {ctc})" if ctc else ""
    return [f"Decoding (`--decoding {run.get('decoding', '?')}`): {how}{joint}.", ""]


def render_markdown(summary: dict) -> str:
    run = summary.get("run", {})
    c = summary["counts"]
    lines = [f"# osum eval: {run.get('data', '?')} · task {run.get('task', '?')}", ""]
    if summary.get("command"):
        lines += ["Command (every option spelled out):", "", "```", summary["command"], "```", ""]
    lines += _search(run)
    lines += _sources_of_answers(run.get("generation") or {}, run.get("tag_heads"), run.get("located_head"),
                                 run.get("locator_crop"))
    lines += ["| model | utterances | failed | missing output | with parse errors | audio s | wall s |",
              "|---|---|---|---|---|---|---|",
              f"| {run.get('model', '?')} | {c['utterances']} | {c['failed']} | {c['missing_hyp']} | "
              f"{c['with_parse_errors']} | {run.get('audio_seconds', '–')} | {run.get('wall_seconds', '–')} |", ""]
    if c["failed"] or c["missing_hyp"]:
        lines += ["Failed and missing outputs are scored as empty (all deletions, no tag).", ""]
    if "text" in summary:
        t = summary["text"]
        lines += [f"## Transcript: {t['metric'].upper()} (normalizer `{t['normalizer']}`)", "",
                  "| rate % | substitutions | deletions | insertions | ref tokens | hyp tokens | utterances | skipped |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {_pct(t['rate'])} | {t['substitutions']} | {t['deletions']} | {t['insertions']} | "
                  f"{t['ref_len']} | {t['hyp_len']} | {t['utterances']} | {_reasons(t['skipped'])} |", ""]
    if summary.get("tags"):
        lines += ["## Tags", "", "| field | accuracy % | macro-F1 % | utterances | no tag in output | skipped |",
                  "|---|---|---|---|---|---|"]
        for f, s in summary["tags"].items():
            lines.append(f"| {f} | {_pct(s['accuracy'])} | {_pct(s['macro_f1'])} | {s['total']} | {s['missing']} | "
                         f"{_reasons(s['skipped'])} |")
        lines.append("")
        for f, s in summary["tags"].items():
            if not s["total"]:
                continue
            lines += [f"### {f}", "", "| label | precision % | recall % | F1 % | support |", "|---|---|---|---|---|"]
            for label, p in s["per_class"].items():
                lines.append(f"| {label} | {_pct(p['precision'])} | {_pct(p['recall'])} | {_pct(p['f1'])} | {p['support']} |")
            lines += ["", "Confusion (rows: reference, columns: output):", "",
                      "| reference \\ output | " + " | ".join(s["columns"]) + " |",
                      "|---" * (len(s["columns"]) + 1) + "|"]
            for label, row in zip(s["classes"], s["confusion"]):
                lines.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
            lines.append("")
            if s.get("plot"):
                lines += [f"![{f} confusion]({s['plot']})", ""]
    if "aas" in summary:
        a = summary["aas"]
        aas_ms = "–" if a["aas_ms"] is None else f"{a['aas_ms']:.1f}"
        lines += ["## Timestamps: AAS", "",
                  "Mean over aligned words of (|start shift| + |end shift|) / 2 (Shi et al. 2022); words are "
                  "aligned by edit distance on their normalised text and only identical words are compared.", "",
                  "| AAS ms | aligned words | ref words not aligned | output words not aligned | utterances | skipped |",
                  "|---|---|---|---|---|---|",
                  f"| {aas_ms} | {a['aligned']} | "
                  f"{a['unaligned_ref']} of {a['ref_words']} | {a['unaligned_hyp']} of {a['hyp_words']} | "
                  f"{a['utterances']} | {_reasons(a['skipped'])} |", ""]
    if "judge" in summary:
        j = summary["judge"]
        lines += ["## Chat judge", ""]
        if j["status"] == "absent":
            lines += [f"**Not computed**: {j['reason']}.", ""]
        else:
            mean = "–" if j["mean"] is None else f"{j['mean']:.2f}"
            lines += [f"Judge `{j['model']}` at {j['url']}: mean score **{mean}** / 10 over {j['scored']} replies; "
                      f"failed: {_reasons(j['failed'])}; skipped: {_reasons(j['skipped'])}.", ""]
    return "\n".join(lines)


def suite_table(rows: list[dict]) -> str:
    """One markdown table for a suite: rows of {name, data, task, model, summary}."""
    lines = ["| test set | task | model | utterances | failed | metric | value |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        c = row["summary"]["counts"]
        for metric, value in headline(row["summary"]) or [("–", "–")]:
            lines.append(f"| {row['name']} | {row['task']} | {row['model']} | {c['utterances']} | {c['failed']} | "
                         f"{metric} | {value} |")
    return "\n".join(lines) + "\n"


def console_summary(summary: dict) -> str:
    """A few lines for the terminal: counts, then each metric with what it was computed over."""
    c = summary["counts"]
    lines = [f"utterances {c['utterances']}, failed {c['failed']}, missing output {c['missing_hyp']}"
             + (f", outputs without a reference {c['extra_hyp']}" if c.get("extra_hyp") else "")
             + f", with parse errors {c['with_parse_errors']}"]
    if "text" in summary:
        t = summary["text"]
        lines.append(f"{t['metric'].upper()} {_pct(t['rate'])}% (S {t['substitutions']}, D {t['deletions']}, "
                     f"I {t['insertions']}, reference tokens {t['ref_len']}) over {t['utterances']} utterances, "
                     f"normalizer {t['normalizer']}; skipped: {_reasons(t['skipped'])}")
    for f, s in summary.get("tags", {}).items():
        lines.append(f"{f}: accuracy {_pct(s['accuracy'])}%, macro-F1 {_pct(s['macro_f1'])}% over {s['total']} "
                     f"utterances ({s['missing']} without a tag); skipped: {_reasons(s['skipped'])}")
    if "aas" in summary:
        a = summary["aas"]
        value = "–" if a["aas_ms"] is None else f"{a['aas_ms']:.1f}"
        lines.append(f"AAS {value} ms over {a['aligned']} aligned words; not aligned: {a['unaligned_ref']} of "
                     f"{a['ref_words']} reference words, {a['unaligned_hyp']} of {a['hyp_words']} output words")
    if "judge" in summary:
        j = summary["judge"]
        if j["status"] == "absent":
            lines.append(f"chat judge: not computed ({j['reason']})")
        else:
            mean = "–" if j["mean"] is None else f"{j['mean']:.2f}"
            lines.append(f"chat judge: mean {mean} / 10 over {j['scored']} replies; failed: {_reasons(j['failed'])}")
    return "\n".join(lines)
