"""How far does the LLM's transcript stray from what the adaptor's CTC head hears?

For each utterance of an `osum eval` run, decode the adaptor's greedy CTC transcript (SpeechLLM.ctc_greedy, the
view that `valid_ctc_wer` logs in training) and score it against the reference beside the run's own LLM
transcripts, by the same WER and English normaliser. A CTC transcript far better than the LLM's says the LLM
rewrites what it hears into sentences its training text makes likely (what joint CTC decoding,
generation.ctc_weight, counters; `--ctc-weight 0` gives the LLM's own transcripts):

    osum eval --suite recipes/osum-tiny/eval.yaml --decoding greedy --ctc-weight 0 --out exp/osum-tiny/eval-llm
    python recipes/osum-tiny/ctc_vs_llm.py exp/osum-tiny/eval-llm/real --model osum-tiny
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import osum
from osum.audio import load_audio, log_mel_spectrogram
from osum.evaluate.metrics import corpus_counts
from osum.evaluate.normalize import english


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="an `osum eval` output folder (summary.json, hyp.jsonl)")
    ap.add_argument("--model", help="default: the run's own model")
    args = ap.parse_args()
    summary = json.loads((args.run / "summary.json").read_text())
    model = osum.load(args.model or summary["run"]["model"]).eval()
    refs, ctc, llm = [], [], []
    for line in (args.run / "hyp.jsonl").read_text().splitlines():
        row = json.loads(line)
        if not row.get("ref", {}).get("text") or "text" not in row.get("hyp", {}):
            continue
        mel = log_mel_spectrogram(load_audio(row["audio"]), n_mels=model.config.audio.n_mels).T[None]
        with torch.no_grad():
            enc = model.encode(mel.to(model.device), torch.tensor([mel.shape[1]], device=model.device))
            tokens = model.ctc_greedy(model.ctc_logits(enc.adaptor_out), enc.adaptor_lens)[0]
        refs.append(english(row["ref"]["text"]))
        ctc.append(english(model.tokenizer.decode(tokens)))
        llm.append(english(row["hyp"]["text"]))
    llm_wer, ctc_wer = (corpus_counts("wer", refs, hyps).rate for hyps in (llm, ctc))
    print(f"{len(refs)} utterances of {args.run}: WER of the LLM's transcripts {100 * llm_wer:.1f} %, "
          f"of the adaptor's greedy CTC transcripts {100 * ctc_wer:.1f} %")


if __name__ == "__main__":
    main()
