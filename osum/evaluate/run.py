"""Runners behind `osum eval` and `osum score`: read test sets and outputs, run the engine, score, write.

    evaluate("models/osum-tiny", "librispeech_test_clean.jsonl", "asr", "results/ls-clean")
    score_files("ref.txt", "hyp.txt", "wer")          # Kaldi/OSUM `key text` lines or JSONL on either side
    run_suite("bench.yaml")                            # several sets and tasks -> one markdown table

Eval JSONL: one object per utterance with `key`, `audio` (or `wav`; relative paths are relative to the list's
folder) and reference fields named as osum.data Samples: text, emotion, gender, age, style, event, language,
words [{word, start, end}], answer, and optionally question (for chat judging).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import yaml

from osum import tasks
from osum.config import CTC_WEIGHTS
from osum.evaluate import report
from osum.evaluate.judge import Judge

log = logging.getLogger(__name__)

SCORE_METRICS = ("wer", "cer", "mer", "acc", "aas")


# ---------------------------------------------------------------------------------------------------
# Reading


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not a JSON object: {exc}") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_key_text(path: str | Path) -> list[tuple[str, str]]:
    """Kaldi/OSUM text files: `key text...` per line (the text may be empty)."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                key, _, text = line.partition(" ")
                pairs.append((key, text.strip()))
    return pairs


def _is_jsonl(path: Path) -> bool:
    if path.suffix in (".jsonl", ".json"):
        return True
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return line.lstrip().startswith("{")
    return False


def _unique(keys: list[str], path) -> None:
    seen = set()
    for k in keys:
        if k in seen:
            raise ValueError(f"{path}: key {k!r} appears more than once")
        seen.add(k)


def read_eval_set(path: str | Path) -> list[dict]:
    """Rows of an eval JSONL with `key` and an absolute `audio` path; duplicate or missing keys are errors."""
    path = Path(path)
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        audio = row.get("audio") or row.get("wav")
        if not audio or not isinstance(audio, str):
            raise ValueError(f"{path}: row {n} needs an `audio` (or `wav`) path, got keys {sorted(row)}")
        if not row.get("key"):
            raise ValueError(f"{path}: row {n} ({audio}) has no `key`")
        row["key"] = str(row["key"])
        row["audio"] = str(Path(audio) if Path(audio).is_absolute() else path.parent / audio)
    _unique([r["key"] for r in rows], path)
    return rows


def read_references(path: str | Path) -> list[tuple[str, dict]]:
    """(key, reference fields) in file order, from an eval JSONL or `key text` lines."""
    path = Path(path)
    if _is_jsonl(path):
        rows = read_jsonl(path)
        for n, row in enumerate(rows, 1):
            if row.get("key") is None:
                raise ValueError(f"{path}: row {n} has no `key`")
        pairs = [(str(r["key"]), report.reference_of(r)) for r in rows]
    else:
        pairs = [(k, report.reference_of({"key": k, "text": t})) for k, t in read_key_text(path)]
    _unique([k for k, _ in pairs], path)
    return pairs


def read_outputs(path: str | Path, spec: tasks.TaskSpec | None = None) -> dict[str, dict]:
    """key -> output fields, from `osum infer`/`osum eval` JSONL or `key model-text` lines (parsed under spec).

    Rows that carry an `error` (failed inference) map to {"error": ...}."""
    path = Path(path)
    if _is_jsonl(path):
        rows = read_jsonl(path)
        pairs = []
        for n, row in enumerate(rows, 1):
            if row.get("key") is None:
                raise ValueError(f"{path}: row {n} has no `key`")
            if row.get("error") and not isinstance(row.get("hyp"), dict):
                pairs.append((str(row["key"]), {"error": str(row["error"])}))
            else:
                pairs.append((str(row["key"]), report.hypothesis_of(row, spec)))
    else:
        pairs = [(k, report.hypothesis_of({"raw": t}, spec)) for k, t in read_key_text(path)]
    _unique([k for k, _ in pairs], path)
    return dict(pairs)


# ---------------------------------------------------------------------------------------------------
# osum score


def score_files(ref: str | Path, hyp: str | Path, metric: str, normalizer: str = "auto",
                task: str | None = None) -> tuple[list[dict], dict]:
    """Score existing outputs. metric: wer | cer | mer | acc (every tag field of the references, or of
    `task`) | aas (word timestamps)."""
    if metric not in SCORE_METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(SCORE_METRICS)}")
    spec = tasks.parse_spec(task) if task else None
    refs = read_references(ref)
    outputs = read_outputs(hyp, spec)
    if metric == "acc":
        fields = spec.fields if spec else tuple(f for f in tasks.TAG_FIELDS if any(f in r for _, r in refs))
        if not fields:
            raise ValueError(f"{ref}: no reference has a tag field ({', '.join(tasks.TAG_FIELDS)}) to score")
        plan = report.Plan(text_metric=None, normalizer=normalizer, tag_fields=fields)
    elif metric == "aas":
        plan = report.Plan(text_metric=None, normalizer=normalizer, timestamps=True)
    else:
        plan = report.Plan(text_metric=metric, normalizer=normalizer)
    items = []
    for key, r in refs:
        out = outputs.get(key)
        failed = out is not None and "error" in out  # read_outputs marks failed inference this way only
        items.append({"key": key, "ref": r, "hyp": None if failed else out,
                      **({"error": out["error"]} if failed else {})})
    records, summary = report.score(items, plan)
    ref_keys = {k for k, _ in refs}
    summary["counts"]["extra_hyp"] = sum(1 for k in outputs if k not in ref_keys)
    summary["run"] = {"ref": str(ref), "hyp": str(hyp), "metric": metric}
    return records, summary


# ---------------------------------------------------------------------------------------------------
# osum eval


@dataclasses.dataclass
class EvalOptions:
    metric: str = "auto"
    normalizer: str = "auto"
    batch_size: int = 16
    decoding: str = "model"  # a GENERATION_PRESETS name; "model": the model's own settings
    max_new_tokens: int | None = None
    ctc_weight: float | None = None  # None: the model's generation.ctc_weight
    device: str = "cpu"
    limit: int | None = None
    plots: bool = True
    judge_url: str | None = None
    judge_model: str = "gpt-4o"
    judge_key_env: str = "OPENAI_API_KEY"

    def command_args(self) -> list[str]:
        """The options as `osum eval` flags, every one spelled out (defaults included)."""
        args = ["--metric", self.metric, "--normalizer", self.normalizer, "--batch-size", str(self.batch_size),
                "--decoding", self.decoding, "--device", self.device]
        if self.max_new_tokens is not None:
            args += ["--max-new-tokens", str(self.max_new_tokens)]
        if self.ctc_weight is not None:
            args += ["--ctc-weight", str(self.ctc_weight)]
        if self.limit is not None:
            args += ["--limit", str(self.limit)]
        if not self.plots:
            args.append("--no-plots")
        if self.judge_url:
            args += ["--judge-url", self.judge_url, "--judge-model", self.judge_model,
                     "--judge-key-env", self.judge_key_env]
        return args

    def judge(self) -> Judge | None:
        return Judge(self.judge_url, self.judge_model, self.judge_key_env) if self.judge_url else None


def data_task(rows: list[dict], path) -> str:
    """The one `task` all rows of a test set name, for runs that give no --task."""
    found = {str(tasks.parse_spec(r["task"])) for r in rows if r.get("task")}
    without = sum(1 for r in rows if not r.get("task"))
    if len(found) != 1 or without:
        raise ValueError(f"{path}: the rows do not share one task (tasks found: {sorted(found)}, rows without "
                         f"a task: {without}); give --task")
    return found.pop()


def evaluate(model, data: str | Path, task: str | None, out: str | Path, options: EvalOptions | None = None,
             command: str | None = None, model_name: str | None = None) -> dict:
    """Run `model` (a name, directory or loaded SpeechLLM, then named by `model_name`) on a test set, score
    it and write `out`."""
    import osum
    from osum.config import GENERATION_PRESETS
    from osum.infer.engine import Engine

    options = options or EvalOptions()
    if options.decoding not in GENERATION_PRESETS:
        raise ValueError(f"decoding {options.decoding!r} is not a preset; presets: {', '.join(GENERATION_PRESETS)}")
    rows = read_eval_set(data)
    total_rows = len(rows)
    if options.limit is not None:
        rows = rows[: options.limit]
    spec = tasks.parse_spec(task or data_task(rows, data))
    plan = report.Plan.for_task(spec, options.metric, options.normalizer, options.judge())
    if options.plots and spec.fields:
        from osum.evaluate.metrics import pyplot

        pyplot()  # fail before inference, not after, when matplotlib is missing

    model_name = model_name or (str(model) if isinstance(model, (str, Path)) else model.config.name)
    if isinstance(model, (str, Path)):
        model = osum.load(model, device=options.device)
    gen = dataclasses.replace(model.config.generation, **GENERATION_PRESETS[options.decoding])
    if options.max_new_tokens:
        gen.max_new_tokens = options.max_new_tokens
    if options.ctc_weight is not None:
        gen = dataclasses.replace(gen, ctc_weight=options.ctc_weight)
    engine = Engine(model, max_batch_size=options.batch_size, generation=gen)

    start = time.perf_counter()
    items = []
    for row, result in zip(rows, engine.iter_run([(r["key"], r["audio"]) for r in rows], task=str(spec))):
        item = {"key": row["key"], "audio": row["audio"], "ref": report.reference_of(row)}
        if "error" in result:
            item["error"] = result["error"]
        else:
            item["hyp"] = report.hypothesis_of(result, spec)
        items.append(item)
    wall = time.perf_counter() - start

    records, summary = report.score(items, plan)
    audio_s = engine.stats.audio_seconds
    summary["run"] = {
        "model": model_name, "data": str(data), "task": str(spec), "decoding": options.decoding,
        "max_new_tokens": gen.max_new_tokens, "batch_size": options.batch_size, "device": options.device,
        "utterances_in_data": total_rows, "limit": options.limit, "audio_seconds": round(audio_s, 2),
        "wall_seconds": round(wall, 2), "rtf": round(wall / audio_s, 4) if audio_s else None,
        "redecoded": engine.stats.redecoded, "osum_version": osum.__version__,
        "generation": dataclasses.asdict(gen),  # the decoding settings in full, the model's defaults included
        "tag_heads": list(model.config.adaptor.tag_heads),  # summary_tags fields read off a fitted head
        "located_head": model.config.adaptor.located_head,  # the one of them read where its locator hears it
        "locator_crop": model.config.adaptor.locator_crop,  # and from the frames around the locator's peak
    }
    if command is None:
        command = " ".join(["osum", "eval", "--model", model_name, "--data", str(data), "--task", str(spec),
                            "--out", str(out), *options.command_args()])
    report.write_run(out, records, summary, command=command, plots=options.plots)
    return summary


def fit_ctc_weight(model, data: list[str | Path], weights: tuple[float, ...] = CTC_WEIGHTS,
                   options: EvalOptions | None = None) -> tuple[float, list[tuple[float, float, dict[str, dict]]]]:
    """The joint CTC/LLM decoding weight (generation.ctc_weight) whose asr transcripts of the `data` lists have
    the lowest error rate pooled over them (errors over reference words; ties: the smaller weight), and each
    weight's (pooled rate, each list's text score). The lists must be held out from the test sets (valid
    splits): the weight is a setting chosen on them. The model's other decoding settings are kept."""
    if not data:
        raise ValueError("fit_ctc_weight needs at least one list")
    options = dataclasses.replace(options or EvalOptions(), plots=False)
    tried = []
    with tempfile.TemporaryDirectory(prefix="osum-fit-ctc-") as tmp:
        for w in weights:
            scores = {}
            for i, path in enumerate(data):
                summary = evaluate(model, path, "asr", Path(tmp) / f"w{w}-{i}",
                                   dataclasses.replace(options, ctc_weight=w), model_name=model.config.name)
                scores[str(path)] = summary["text"]
            words = sum(t["ref_len"] for t in scores.values())
            tried.append((w, sum(t["errors"] for t in scores.values()) / max(words, 1), scores))
    best = min(tried, key=lambda t: (t[1], t[0]))[0]
    return best, tried


# ---------------------------------------------------------------------------------------------------
# osum eval --suite


_SUITE_KEYS = {"model", "out", "defaults", "runs"}
_RUN_KEYS = {"name", "data", "task", "model"}


def run_suite(path: str | Path, out: str | Path | None = None, model: str | None = None,
              ctc_weight: float | None = None, decoding: str | None = None) -> tuple[list[dict], Path]:
    """Run every entry of a suite YAML and write `<out>/<name>/...`, `<out>/results.md` and `results.json`.

    `model` takes the place of the suite's top-level model (`osum eval --suite F --model M`: the same test sets
    for another checkpoint); runs that name their own model keep it. `ctc_weight` sets every run's joint CTC
    decoding weight (`--ctc-weight W`: the same model decoded another way), and `decoding` every run's preset
    (`--decoding beam`).

        model: models/osum-tiny          # default model of every run
        out: results/bench               # relative to this file (or `osum eval --suite F --out DIR`)
        defaults: {normalizer: auto, batch_size: 16, decoding: model}    # any EvalOptions field
        runs:
          - {name: librispeech-test-clean, data: data/ls_clean.jsonl, task: asr}
          - {name: meld-test, data: data/meld.jsonl, task: asr+ser, model: other/model}
    """
    path = Path(path)
    suite = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(suite, dict):
        raise ValueError(f"{path}: a suite is a mapping with keys {sorted(_SUITE_KEYS)}")
    unknown = set(suite) - _SUITE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown suite keys {sorted(unknown)}; valid: {sorted(_SUITE_KEYS)}")
    option_names = {f.name for f in dataclasses.fields(EvalOptions)}
    defaults = suite.get("defaults") or {}
    bad = set(defaults) - option_names
    if bad:
        raise ValueError(f"{path}: unknown defaults {sorted(bad)}; valid: {sorted(option_names)}")
    if model is not None:
        suite["model"] = model
    runs = suite.get("runs") or []
    if not runs:
        raise ValueError(f"{path}: no runs")
    out_dir = Path(out) if out is not None else path.parent / suite.get("out", "results")
    names = []
    for i, run in enumerate(runs, 1):
        bad = set(run) - _RUN_KEYS - option_names
        if bad:
            raise ValueError(f"{path}: run {i} has unknown keys {sorted(bad)}; valid: {sorted(_RUN_KEYS | option_names)}")
        for key in ("name", "data"):
            if not run.get(key):
                raise ValueError(f"{path}: run {i} needs `{key}`")
        if not (run.get("model") or suite.get("model")):
            raise ValueError(f"{path}: run {run['name']!r} has no model (set `model` at the top or in the run)")
        names.append(run["name"])
    _unique(names, f"{path} (run names)")

    loaded: dict[str, object] = {}
    rows = []
    for run in runs:
        options = EvalOptions(**{**defaults, **{k: v for k, v in run.items() if k in option_names}})
        if ctc_weight is not None:
            options = dataclasses.replace(options, ctc_weight=ctc_weight)
        if decoding is not None:
            options = dataclasses.replace(options, decoding=decoding)
        model_name = str(run.get("model") or suite["model"])
        data = Path(run["data"])
        data = data if data.is_absolute() else path.parent / data
        if model_name not in loaded:
            import osum

            loaded.clear()  # one model in memory at a time
            loaded[model_name] = osum.load(model_name, device=options.device)
        command = " ".join(["osum", "eval", "--model", model_name, "--data", str(data), "--task",
                            str(run.get("task") or "(from data)"), "--out", str(out_dir / run["name"]),
                            *options.command_args()])
        log.info("suite %s: %s", path, command)
        summary = evaluate(loaded[model_name], data, run.get("task"), out_dir / run["name"], options, command,
                           model_name=model_name)
        rows.append({"name": run["name"], "data": str(data), "task": summary["run"]["task"], "model": model_name,
                     "summary": summary})

    table = report.suite_table(rows)
    again = " ".join(["osum eval --suite", str(path), *(["--model", model] if model else []),
                      *(["--ctc-weight", str(ctc_weight)] if ctc_weight is not None else []),
                      *(["--decoding", decoding] if decoding is not None else []),
                      *(["--out", str(out)] if out is not None else [])])
    text = (f"# osum benchmark: {path.name}\n\nRegenerate with `{again}`. Per-run reports: "
            f"`<name>/report.md`, per-utterance outputs: `<name>/hyp.jsonl`.\n\n{table}")
    report.atomic_write(out_dir / "results.json", json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
    table_path = report.atomic_write(out_dir / "results.md", text)
    return rows, table_path
