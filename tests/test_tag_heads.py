"""Tag heads over the voice summary's pooled statistics: the linear fit, grouped cross-validation, installing a
head in a model, reading labels off it, saving and reloading it, and `osum export --fit-tag-heads`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from osum import tasks
from osum.audio import load_audio, log_mel_spectrogram
from osum.model.tag_heads import cross_validate, fit_linear, fit_model_head, pooled_stats
from tests.conftest import tiny_config


def _clusters(n: int, seed: int, dim: int = 12, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows around three fixed centres; `seed` draws the noise only."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), y


def test_fit_linear_separates_clusters_and_ignores_feature_scale():
    x, y = _clusters(90, seed=1)
    weight, bias = fit_linear(x, y, 3)
    assert weight.shape == (3, 12) and bias.shape == (3,)
    assert ((x @ weight.T + bias).argmax(-1) == y).all()
    held_x, held_y = _clusters(60, seed=2)  # new draws around the same centres: it generalises
    assert ((held_x @ weight.T + bias).argmax(-1) == held_y).float().mean() > 0.9
    # standardised first: features scaled by 0.01 to 1000 and shifted give the same decisions
    scaled = x * torch.linspace(0.01, 1000, 12) + 5.0
    w2, b2 = fit_linear(scaled, y, 3)
    assert torch.equal((scaled @ w2.T + b2).argmax(-1), (x @ weight.T + bias).argmax(-1))
    # a larger penalty keeps the weights smaller
    w_big, _ = fit_linear(x, y, 3, reg=1.0)
    assert w_big.norm() < weight.norm()
    with pytest.raises(ValueError, match="as many labels"):
        fit_linear(x, y[:5], 3)


def test_grouped_cross_validation_exposes_memorised_groups():
    """Labels that belong to groups (a clip each), not to anything the features share: per utterance, the other
    utterances of a group give the answer away; with groups held out together the fit is at chance."""
    g = torch.Generator().manual_seed(3)
    groups = [f"clip{i}" for i in range(40) for _ in range(6)]
    names = sorted(set(groups))
    group_vec = {name: torch.randn(128, generator=g) for name in names}
    group_label = {name: i % 2 for i, name in enumerate(names)}
    x = torch.stack([group_vec[name] + 0.1 * torch.randn(128, generator=g) for name in groups])
    y = torch.tensor([group_label[name] for name in groups])
    per_utterance = cross_validate(x, y, [str(i) for i in range(len(groups))], 2)
    grouped = cross_validate(x, y, groups, 2)
    assert per_utterance > 0.95
    assert grouped < 0.7
    assert cross_validate(x, y, ["one"] * len(groups), 2) is None  # one fold: nothing to hold out


def test_cross_validation_scores_only_the_rows_asked():
    """Rows added with random labels are fitted on but, outside `scored`, never counted: the clusters are still
    read right, where scoring every row counts the added rows' misses too."""
    x, y = _clusters(90, seed=1)
    noise_x, _ = _clusters(60, seed=4)
    noise_y = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(5))
    xs, ys = torch.cat([x, noise_x]), torch.cat([y, noise_y])
    groups = [str(i) for i in range(len(ys))]
    scored = torch.arange(len(ys)) < len(y)
    every = torch.ones(90, dtype=torch.bool)
    assert cross_validate(x, y, groups[:90], 3) == cross_validate(x, y, groups[:90], 3, scored=every)
    assert cross_validate(xs, ys, groups, 3, scored=scored) > 0.9 > cross_validate(xs, ys, groups, 3)


def _write_clips(folder, n: int) -> list[dict]:
    """Clips of two kinds the tiny encoder tells apart: low tones ("laugh") and noise bursts ("cough")."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        t = np.arange(int(16000 * rng.uniform(0.6, 1.4))) / 16000
        if i % 2 == 0:
            wav, label = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 300) * t), "laugh"
        else:
            wav, label = 0.3 * rng.standard_normal(len(t)), "cough"
        path = folder / f"c{i}.wav"
        sf.write(path, wav.astype(np.float32), 16000)
        rows.append({"key": f"c{i}", "audio": str(path), "event": label, "extra": {"clip": f"src{i // 2}"}})
    return rows


@pytest.fixture
def summary_model():
    from osum.model.speech_llm import SpeechLLM

    torch.manual_seed(0)
    return SpeechLLM(tiny_config("adaptor.summary_layers=[0,1]")).eval()


def test_fitted_head_is_installed_read_batched_and_reloaded_exactly(tmp_path, summary_model):
    from osum.model import checkpoint

    rows = _write_clips(tmp_path, 12)
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 31, np.float32), 16000)
    bad = [{"key": "nolabel", "audio": rows[0]["audio"]}, {"key": "odd", "audio": rows[0]["audio"], "event": "bark"},
           {"key": "long", "audio": str(tmp_path / "long.wav"), "event": "laugh", "extra": {"clip": "long"}}]
    fit = fit_model_head(summary_model, "event", rows + bad, reg=1e-3, group_by="extra.clip")
    assert fit.rows == 12 and fit.train_accuracy == 1.0 and fit.cv_accuracy is not None
    assert fit.cv_groups == "extra.clip"
    assert fit.skipped == {"no event label": 1, "event label not in the vocabulary": 1,
                           "longer than one encoder pass": 1}
    assert summary_model.config.adaptor.tag_heads == ["event"]
    assert not any(p.requires_grad for p in summary_model.summary.heads.parameters())

    def labels(model, batch: list[dict]) -> list[str]:
        mels = [log_mel_spectrogram(load_audio(r["audio"])).T for r in batch]
        lens = torch.tensor([m.shape[0] for m in mels])
        padded = torch.nn.utils.rnn.pad_sequence(mels, batch_first=True)
        return [out["event"] for out in model.summary_labels(padded, lens, ["event", "gender"])]

    together = labels(summary_model, rows)
    assert together == [r["event"] for r in rows]  # the head, not the position's own (untrained) scores
    assert [labels(summary_model, [r])[0] for r in rows] == together  # batch == one by one
    stats = pooled_stats(summary_model, rows[:5], batch_size=2, window=3)  # batched, two windows
    for row, batched in zip(rows[:5], stats):
        assert torch.allclose(batched, pooled_stats(summary_model, [row])[0], atol=1e-5)

    out = checkpoint.save(summary_model, tmp_path / "model")
    again = checkpoint.load(out).eval()
    assert again.config.adaptor.tag_heads == ["event"]
    for key, tensor in summary_model.summary.heads.state_dict().items():
        assert torch.equal(again.summary.heads.state_dict()[key], tensor)
    assert labels(again, rows) == together


def test_head_errors_name_what_is_wrong(tmp_path, summary_model):
    from osum.model.speech_llm import SpeechLLM

    rows = _write_clips(tmp_path, 4)
    with pytest.raises(ValueError, match="at least two labels"):
        fit_model_head(summary_model, "event", [r for r in rows if r["event"] == "laugh"])
    with pytest.raises(ValueError, match="not a tag field"):
        fit_model_head(summary_model, "mood", rows)
    with pytest.raises(ValueError, match="4 of 4 labelled rows have no extra.recording"):
        fit_model_head(summary_model, "event", rows, group_by="extra.recording")
    with pytest.raises(ValueError, match="voice summary"):
        fit_model_head(SpeechLLM(tiny_config()).eval(), "event", rows)
    with pytest.raises(ValueError, match="summary_layers"):
        SpeechLLM(tiny_config("adaptor.tag_heads=[event]"))
    with pytest.raises(ValueError, match="not tag fields"):
        SpeechLLM(tiny_config("adaptor.summary_layers=[0]", "adaptor.tag_heads=[mood]"))


@pytest.mark.parametrize("located", [False, True], ids=["whole", "located"])
def test_export_fits_a_head_and_decodes_with_it(tmp_path, summary_model, capsys, located):
    """`--fit-tag-heads`, and with `--locate-tag-head` the frame locator fitted first on the rows' event spans."""
    from osum.cli import main
    from osum.infer.engine import Engine
    from osum.model import checkpoint

    rows = _write_events(tmp_path, 10) if located else _write_clips(tmp_path, 10)
    data = tmp_path / "ved.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a second head, on other rows grouped by another key: a bare --tag-head-groups KEY would not fit both
    voiced = tmp_path / "sgc.jsonl"
    voiced.write_text("".join(json.dumps({**r, "gender": "male" if r["event"] == "laugh" else "female",
                                          "speaker": f"s{i % 3}"}) + "\n" for i, r in enumerate(rows)))
    source = checkpoint.save(summary_model, tmp_path / "ckpt")
    groups = "extra.event.clip" if located else "extra.clip"
    assert main(["export", str(source), "--keep-lora", "--dtype", "bfloat16", "--out", str(tmp_path / "out"),
                 "--fit-tag-heads", f"event={data}", "--fit-tag-heads", f"gender={voiced}", "--tag-head-reg", "0.001",
                 "--tag-head-groups", f"event={groups}", "--tag-head-groups", "gender=speaker",
                 *(["--locate-tag-head", "event"] if located else [])]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["summary.heads.event.weight"] == "F32" and dtypes["summary.proj.weight"] == "BF16"
    assert dtypes.get("summary.locator.weight") == ("F32" if located else None)
    err = capsys.readouterr().err
    assert "event head fitted on 10 utterances" in err and f"held out together: {groups})" in err
    assert "gender head fitted on 10 utterances" in err and "held out together: speaker)" in err
    assert ("event frame locator on block 1, fitted on" in err) == located
    model_cfg = json.loads((tmp_path / "out" / "config.json").read_text())["model"]
    assert model_cfg["adaptor"]["tag_heads"] == ["event", "gender"]
    assert (model_cfg["adaptor"]["located_head"], model_cfg["adaptor"]["locator_layer"]) == (
        ("event", 1) if located else (None, None))
    assert model_cfg["generation"]["summary_tags"] == ["event", "gender"]
    exported = checkpoint.load(tmp_path / "out").eval()
    results = Engine(exported, max_batch_size=4).run([r["audio"] for r in rows], task="asr+ved")
    assert [r["labels"]["event"] for r in results] == [r["event"] for r in rows]
    with pytest.raises(SystemExit, match="FIELD=LIST"):
        main(["export", str(source), "--out", str(tmp_path / "x"), "--fit-tag-heads", str(data)])
    with pytest.raises(SystemExit, match="--fit-tag-heads event=LIST"):
        main(["export", str(source), "--out", str(tmp_path / "x"), "--locate-tag-head", "event"])
    for groups_args, message in ((["a", "b"], "2 keys for every head"), (["age=speaker"], "one of the heads"),
                                 (["event="], "expected FIELD=KEY"),
                                 (["event=a", "event=b"], "two keys for the event")):
        with pytest.raises(SystemExit, match=message):
            main(["export", str(source), "--out", str(tmp_path / "x"), "--fit-tag-heads", f"event={data}",
                  *(arg for key in groups_args for arg in ("--tag-head-groups", key))])
    with pytest.raises(SystemExit, match="none is given"):
        main(["export", str(source), "--out", str(tmp_path / "x"), "--tag-head-groups", "speaker"])
    with pytest.raises(SystemExit, match="no --fit-tag-heads gender="):
        main(["export", str(source), "--out", str(tmp_path / "x"), "--locate-tag-head", "gender",
              "--fit-tag-heads", f"event={data}"])


def test_head_groups_give_each_head_its_key():
    from osum.cli import _head_groups

    assert _head_groups([], ["event", "age"]) == {}
    assert _head_groups(["extra.event.recording"], ["event"]) == {"event": "extra.event.recording"}
    assert _head_groups(["key", "age=speaker"], ["event", "age"]) == {"event": "key", "age": "speaker"}
    assert _head_groups(["age=speaker", "event=extra.event.recording"], ["event", "age"]) == {
        "event": "extra.event.recording", "age": "speaker"}


def test_event_pooling_script_matches_the_heads_fit(tmp_path, summary_model, monkeypatch, capsys):
    """recipes/osum-tiny/event_pooling.py: its row for the released head's pooling is the export's own
    recording-held-out cross-validation (fit_model_head), and the oracle row pools only the event's span."""
    import runpy
    import sys
    from pathlib import Path

    import osum

    rows = _write_clips(tmp_path, 16)
    for row in rows:
        # two clips of one recording: the cross-validation holds them out together
        recording = row["extra"]["clip"].replace("src5", "src4")
        row["extra"] = {"event": {"clip": row["extra"]["clip"], "recording": recording, "span": [0.0, 0.4]}}
    for name, part in (("train", rows[:12]), ("test", rows[12:])):
        (tmp_path / f"{name}_synth_ved.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    fit = fit_model_head(summary_model, "event", rows[:12], group_by="extra.event.recording")
    # the oracle, pooled here by the voice summary's own masked pooling over the span's 20 encoder frames (0.4 s)
    summary, stats = summary_model.summary, []
    for row in rows[:12]:
        mel = log_mel_spectrogram(load_audio(row["audio"])).T[None]
        with torch.no_grad():
            _, _, hidden = summary_model.encoder.forward_layers(mel, torch.tensor([mel.shape[1]]), summary.layers)
            stats.append(summary.pool(hidden, torch.tensor([20]))[0])
    groups = [row["extra"]["event"]["recording"] for row in rows[:12]]
    labels = torch.tensor([tasks.LABELS["event"].index(row["event"]) for row in rows[:12]])
    oracle = cross_validate(torch.stack(stats), labels, groups, len(tasks.LABELS["event"]))
    monkeypatch.setattr(osum, "load", lambda name, **kw: summary_model)
    monkeypatch.setattr(sys, "argv", ["event_pooling.py", "--data", str(tmp_path)])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "recipes" / "osum-tiny" / "event_pooling.py"),
                   run_name="__main__")
    printed = capsys.readouterr().out
    assert "12 training utterances (5 recordings), blocks [0, 1]" in printed
    assert f"| whole utterance, mean + std (release 5's head) | {fit.cv_accuracy:.1%} |" in printed
    assert printed.rstrip().endswith(f"| the event's span only, mean + std (oracle) | {oracle:.1%} | – |")
    # with a frame locator, a last row reads the located statistics the export's head is fitted on
    from osum.model.tag_heads import fit_locator

    fit_locator(summary_model, "event", rows[:12], layer=1)
    located = fit_model_head(summary_model, "event", rows[:12], group_by="extra.event.recording")
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "recipes" / "osum-tiny" / "event_pooling.py"),
                   run_name="__main__")
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith("| weighted by the model's frame locator (block 1), mean + std (the export's L-BFGS fit) | "
                           f"{located.cv_accuracy:.1%} | ")


def _write_events(folder, n: int) -> list[dict]:
    """Utterances of a quiet hum with one loud sound inside at a random place: a noise burst ("cough") or a high
    tone ("laugh"), its span recorded as osum synth records an inserted event's."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        t = np.arange(int(16000 * rng.uniform(1.5, 2.5))) / 16000
        wav = 0.02 * np.sin(2 * np.pi * rng.uniform(100, 200) * t)
        start, length = rng.uniform(0.1, t[-1] - 0.5), rng.uniform(0.25, 0.4)
        seg = slice(int(start * 16000), int((start + length) * 16000))
        k = np.arange(seg.stop - seg.start) / 16000
        if i % 2 == 0:
            wav[seg], label = 0.5 * np.sin(2 * np.pi * rng.uniform(2000, 3000) * k), "laugh"
        else:
            wav[seg], label = 0.5 * rng.standard_normal(len(k)), "cough"
        path = folder / f"e{i}.wav"
        sf.write(path, wav.astype(np.float32), 16000)
        rows.append({"key": f"e{i}", "audio": str(path), "event": label,
                     "extra": {"event": {"clip": f"src{i // 2}", "span": [round(start, 3), round(start + length, 3)]}}})
    return rows


def test_frame_locator_finds_the_sound_and_its_head_reads_located_statistics(tmp_path, summary_model):
    from osum.model import checkpoint
    from osum.model.tag_heads import fit_locator

    rows = _write_events(tmp_path, 12)
    bad = [{"key": "nospan", "audio": rows[0]["audio"], "event": "laugh"},
           {"key": "late", "audio": rows[0]["audio"], "event": "laugh", "extra": {"event": {"span": [9.0, 9.5]}}},
           {"key": "backwards", "audio": rows[0]["audio"], "event": "laugh", "extra": {"event": {"span": [1, 0.5]}}}]
    loc = fit_locator(summary_model, "event", rows + bad, layer=1)
    assert loc.rows == 12 and loc.layer == 1 and loc.top_in_span >= 0.9
    assert loc.skipped == {"no usable extra.event.span": 2, "span outside the audio": 1}
    assert loc.outside == 2 * loc.inside  # every hum is long enough to give twice the event's frames
    assert summary_model.config.adaptor.located_head == "event" and summary_model.config.adaptor.locator_layer == 1
    assert not summary_model.summary.locator.weight.requires_grad
    assert not any(name.startswith("summary.locator") for name in summary_model.trainable_parameters())

    def mels(batch):
        feats = [log_mel_spectrogram(load_audio(r["audio"])).T for r in batch]
        return torch.nn.utils.rnn.pad_sequence(feats, batch_first=True), torch.tensor([m.shape[0] for m in feats])

    # The located statistics are the frames' statistics weighted by the locator's probabilities, zero past the end;
    # its heaviest frame lies inside the event.
    summary = summary_model.summary
    padded, lens = mels(rows[:3])
    with torch.no_grad():
        _, enc_lens, hidden = summary_model.encoder.forward_layers(padded, lens, summary.layers)
        weights = summary.frame_weights(hidden, enc_lens)
        located = summary.pool(hidden, enc_lens, located=True)
    shortest = int(enc_lens.argmin())
    assert (weights[shortest, enc_lens[shortest]:] == 0).all() and enc_lens[shortest] < weights.shape[1]
    for i, row in enumerate(rows[:3]):
        start, end = (round(t * 50) for t in row["extra"]["event"]["span"])  # 50 encoder frames a second
        assert start - 1 <= int(weights[i].argmax()) <= end
        n = int(enc_lens[i])
        w = weights[i, :n, None] / weights[i, :n].sum()
        expected = []
        for block in hidden:
            h = torch.nn.functional.layer_norm(block[i, :n].float(), block.shape[-1:])
            mean = (w * h).sum(0)
            expected += [mean, ((w * (h - mean) ** 2).sum(0) + 1e-6).sqrt()]
        assert torch.allclose(located[i], torch.cat(expected), atol=1e-5)
    for row, batched in zip(rows[:5], pooled_stats(summary_model, rows[:5], batch_size=2, window=3, located=True)):
        assert torch.allclose(batched, pooled_stats(summary_model, [row], located=True)[0], atol=1e-5)
    # A locator that calls every frame the sound pools as the whole utterance does.
    saved = summary.locator.state_dict()
    with torch.no_grad():
        summary.locator.weight.zero_()
        summary.locator.bias.fill_(50.0)
        assert torch.allclose(summary.pool(hidden, enc_lens, located=True), summary.pool(hidden, enc_lens), atol=1e-5)
    summary.locator.load_state_dict(saved)

    fit = fit_model_head(summary_model, "event", rows, reg=1e-3, group_by="extra.event.clip")
    assert fit.train_accuracy == 1.0
    stats = pooled_stats(summary_model, rows, located=True)
    scores = summary.head_scores(torch.stack(stats), "event")
    assert [tasks.LABELS["event"][i] for i in scores.argmax(-1).tolist()] == [r["event"] for r in rows]

    def labels(model, batch):
        return [out["event"] for out in model.summary_labels(*mels(batch), ["event"])]

    together = labels(summary_model, rows)
    assert together == [r["event"] for r in rows]
    assert [labels(summary_model, [r])[0] for r in rows] == together  # batch == one by one
    enc = summary_model.encode(*mels(rows))
    assert [o["event"] for o in summary_model.summary_labels(None, None, ["event"], encoded=enc)] == together

    out = checkpoint.save(summary_model, tmp_path / "model", dtype=torch.bfloat16)
    again = checkpoint.load(out).eval()
    assert (again.config.adaptor.located_head, again.config.adaptor.locator_layer) == ("event", 1)
    for key, tensor in summary.locator.state_dict().items():
        assert torch.equal(again.summary.locator.state_dict()[key], tensor)  # kept in float32
    assert labels(again, rows) == together


def test_frame_locator_errors_name_what_is_wrong(tmp_path, summary_model):
    from osum.model.speech_llm import SpeechLLM
    from osum.model.tag_heads import fit_locator

    rows = _write_events(tmp_path, 2)
    with pytest.raises(ValueError, match="pools blocks"):
        fit_locator(summary_model, "event", rows, layer=3)
    with pytest.raises(ValueError, match="none of the 1 rows"):
        fit_locator(summary_model, "event", [{"key": "x", "audio": rows[0]["audio"]}], layer=0)
    with pytest.raises(ValueError, match="voice summary"):
        fit_locator(SpeechLLM(tiny_config()).eval(), "event", rows, layer=0)
    with pytest.raises(ValueError, match="set both"):
        SpeechLLM(tiny_config("adaptor.summary_layers=[0]", "adaptor.located_head=event"))
    with pytest.raises(ValueError, match="does not pool"):
        SpeechLLM(tiny_config("adaptor.summary_layers=[0]", "adaptor.tag_heads=[event]", "adaptor.located_head=event",
                              "adaptor.locator_layer=1"))
    with pytest.raises(ValueError, match="not one of the fitted heads"):
        SpeechLLM(tiny_config("adaptor.summary_layers=[0]", "adaptor.tag_heads=[event]", "adaptor.located_head=age",
                              "adaptor.locator_layer=0"))
    with pytest.raises(ValueError, match="adaptor.locator_layer 0: fitted on .* set adaptor.summary_layers"):
        SpeechLLM(tiny_config("adaptor.locator_layer=0"))
    with pytest.raises(SystemExit, match="only --locate-tag-head"):
        from osum.cli import main

        main(["export", "x", "--out", str(tmp_path / "x"), "--locator-layer", "1"])


def _fitted_event_lists(folder, model) -> tuple[list[dict], list[dict], object, float]:
    """Event utterances written as an `osum synth` folder's train and test lists (2 utterances of each label a
    recording), `model`'s locator and event head fitted on the training list as the export fits them, and the
    head's test accuracy: (train, test, head fit, test accuracy)."""
    from pathlib import Path

    from osum.model.tag_heads import fit_locator

    rows = _write_events(folder, 20)
    for i, row in enumerate(rows):
        row["extra"]["event"]["recording"] = f"rec{i // 4}-{row['event']}"  # 2 utterances of each label a recording
    rows.sort(key=lambda r: r["extra"]["event"]["recording"])
    train, test = rows[:16], rows[16:]
    for name, part in (("train", train), ("test", test)):
        (folder / f"{name}_synth_ved.jsonl").write_text(
            "".join(json.dumps({**r, "audio": Path(r["audio"]).name}) + "\n" for r in part))
    fit_locator(model, "event", train, layer=1)
    head = fit_model_head(model, "event", train, group_by="extra.event.recording")
    y_test = torch.tensor([tasks.LABELS["event"].index(r["event"]) for r in test])
    accuracy = float(((torch.stack(pooled_stats(model, test, located=True)) @ head.weight.T + head.bias)
                      .argmax(-1) == y_test).float().mean())
    return train, test, head, accuracy


def test_event_curve_script_refits_the_locator_and_head_on_each_subset(tmp_path, summary_model, monkeypatch,
                                                                       capsys):
    """recipes/osum-tiny/event_curve.py: its full-set points are the export's own fit (locator, then head) scored
    on the test list, computed with its encoder cache; its subsets keep whole recordings of every label, or part
    of every recording's utterances."""
    import math
    import random
    import runpy
    import sys
    from pathlib import Path

    import osum

    train, _, head, accuracy = _fitted_event_lists(tmp_path, summary_model)
    script = str(Path(__file__).resolve().parents[1] / "recipes" / "osum-tiny" / "event_curve.py")

    subsets = runpy.run_path(script)["subsets"]
    by_recording = {}
    for row in train:
        by_recording.setdefault(row["extra"]["event"]["recording"], []).append(row["key"])
    few = subsets(train, "recordings", 0.25, random.Random(0))
    kept = {row["extra"]["event"]["recording"] for row in few}
    assert {row["event"] for row in few} == {"laugh", "cough"} and len(kept) == 2  # one of each label's four
    assert sorted(row["key"] for row in few) == sorted(k for rec in kept for k in by_recording[rec])
    half = subsets(train, "utterances", 0.5, random.Random(0))
    assert sorted(row["extra"]["event"]["recording"] for row in half) == sorted(by_recording)  # one of each's two
    assert len(subsets(train, "utterances", 0.75, random.Random(0))) == len(by_recording) * math.ceil(0.75 * 2)

    monkeypatch.setattr(osum, "load", lambda name, **kw: summary_model)
    monkeypatch.setattr(sys, "argv", ["event_curve.py", "--data", str(tmp_path), "--draws", "2"])
    runpy.run_path(script, run_name="__main__")
    printed = capsys.readouterr().out
    assert printed.startswith("16 training utterances of 8 recordings; test: 4 utterances; locator on block 1")
    for axis in ("recordings", "utterances"):
        assert f"| {axis} | 1 | 8 | 16 | {head.cv_accuracy:.1%} | {accuracy:.1%} |" in printed
        assert sum(line.startswith(f"| {axis} | ") for line in printed.splitlines()) == 5


def test_event_sources_script_adds_inserted_clips_to_the_heads_fit(tmp_path, summary_model, monkeypatch, capsys):
    """recipes/osum-tiny/event_sources.py: new clips are inserted into training speech with their spans and a
    group of their own; its row without them is the export's own fit (held out by recording, and on test), and
    it prints a row for each label's clips and for all of them; bad --clips are refused by name."""
    import runpy
    import sys
    from pathlib import Path

    import osum
    from osum.data.synth import effects

    _, _, head, accuracy = _fitted_event_lists(tmp_path, summary_model)
    t = np.arange(16000 * 2) / 16000
    sf.write(tmp_path / "speech.wav", (0.1 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
    speech = {"key": "s", "audio": "speech.wav", "words": [{"word": "one", "start": 0.2, "end": 0.8},
                                                           {"word": "two", "start": 1.1, "end": 1.7}]}
    (tmp_path / "train_synth_srwt.jsonl").write_text(json.dumps(speech) + "\n")
    clips = tmp_path / "clips"
    clips.mkdir()
    k = np.arange(int(16000 * 0.3)) / 16000
    for i, hz in enumerate((2200, 2700)):
        sf.write(clips / f"tone{i}.wav", (0.5 * np.sin(2 * np.pi * hz * k)).astype(np.float32), 16000)
    sf.write(clips / "noise0.wav", (0.5 * np.random.default_rng(0).standard_normal(len(k))).astype(np.float32), 16000)
    script = str(Path(__file__).resolve().parents[1] / "recipes" / "osum-tiny" / "event_sources.py")

    ns = runpy.run_path(script)
    out = tmp_path / "made"
    out.mkdir()
    made = ns["insert_clips"]({"laugh": [str(clips / "tone0.wav")]},
                              [{**speech, "audio": str(tmp_path / "speech.wav")}],
                              3, out, 0)
    assert [r["event"] for r in made] == ["laugh"] * 3
    assert {r["extra"]["event"]["recording"] for r in made} == {f"extra/{effects.clip_digest(clips / 'tone0.wav')}"}
    for r in made:
        start, end = r["extra"]["event"]["span"]
        assert 0 <= start < end <= sf.info(r["audio"]).duration and 0.2 < end - start < 0.45  # the clip, pitch moved
    for bad, why in (("bark=*.wav", "not an event label"), (f"laugh={clips}/none*.wav", "no file matches"),
                     ("laugh", "expected LABEL=GLOB")):
        with pytest.raises(SystemExit, match=why):
            ns["parse_clips"]([bad])

    monkeypatch.setattr(osum, "load", lambda name, **kw: summary_model)
    monkeypatch.setattr(sys, "argv", ["event_sources.py", "--data", str(tmp_path), "--per", "3",
                                      "--clips", f"laugh={clips}/tone*.wav", "--clips", f"cough={clips}/noise*.wav"])
    runpy.run_path(script, run_name="__main__")
    printed = capsys.readouterr().out
    assert printed.startswith("16 training utterances of 8 recordings; test: 4; new: 1 cough clips, 2 laugh clips, "
                              "3 utterances each")
    assert f"| nothing | 0 | 0 | {head.cv_accuracy:.1%} | {accuracy:.1%} |" in printed
    for name, recordings, utterances in (("cough", 1, 3), ("laugh", 2, 6), ("all", 3, 9)):
        assert f"| {name} | {recordings} | {utterances} | " in printed

    # --write: the utterances and their list, audio paths relative to it, for the export to fit on
    from osum.evaluate.run import read_eval_set

    listed = tmp_path / "lists" / "extra_ved.jsonl"
    monkeypatch.setattr(sys, "argv", ["event_sources.py", "--data", str(tmp_path), "--per", "2", "--write",
                                      str(listed), "--clips", f"laugh={clips}/tone*.wav"])
    runpy.run_path(script, run_name="__main__")
    assert capsys.readouterr().out == f"{listed}: 4 utterances of 2 laugh clips, 2 each\n"
    assert all(not json.loads(line)["audio"].startswith("/") for line in listed.read_text().splitlines())
    written = read_eval_set(listed)
    assert [r["event"] for r in written] == ["laugh"] * 4
    assert len({r["extra"]["event"]["recording"] for r in written}) == 2
    assert all(Path(r["audio"]).parent == listed.parent / "extra_ved" and Path(r["audio"]).is_file() for r in written)


def test_event_finetune_script_crops_at_the_locator_and_trains_copies_of_the_later_blocks(tmp_path, monkeypatch,
                                                                                        capsys):
    """recipes/osum-tiny/event_finetune.py: each crop holds the utterance's highest locator weight and the
    released head's statistics bit for bit; a trained reader lowers its loss, changes its copy of the last block
    and never the model's, and is the same on a second run; its first row is the export's own fit; a --tune past
    the encoder's blocks is refused by name."""
    import runpy
    import sys
    from argparse import Namespace
    from pathlib import Path

    import osum
    from osum.model.speech_llm import SpeechLLM

    torch.manual_seed(0)
    model = SpeechLLM(tiny_config("adaptor.summary_layers=[0,1]", "encoder.num_layers=3")).eval()
    train, _, head, accuracy = _fitted_event_lists(tmp_path, model)
    script = str(Path(__file__).resolve().parents[1] / "recipes" / "osum-tiny" / "event_finetune.py")
    ns = runpy.run_path(script)

    crops = ns["crop_rows"](model, train, window=5)
    assert torch.equal(crops.released, torch.stack(pooled_stats(model, train, located=True)))
    assert crops.frames.shape[:2] == crops.weights.shape == crops.valid.shape and crops.frames.shape[1] <= 11
    for i, row in enumerate(train):
        mel = log_mel_spectrogram(load_audio(row["audio"]), n_mels=model.config.audio.n_mels).T
        with torch.no_grad():
            _, lens, hidden = model.encoder.forward_layers(mel[None], torch.tensor([mel.shape[0]]), [0, 1])
            w = model.summary.frame_weights(hidden, lens)[0]
        peak = int(w.argmax())
        first, last = max(0, peak - 5), min(len(w), peak + 6)
        assert int(crops.valid[i].sum()) == last - first
        torch.testing.assert_close(crops.frames[i, :last - first], hidden[1][0, first:last], rtol=0, atol=1e-5)
        torch.testing.assert_close(crops.weights[i, :last - first], w[first:last], rtol=0, atol=1e-5)

    later = list(model.encoder.layers)[2:]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = torch.tensor([tasks.LABELS["event"].index(r["event"]) for r in train])
    args = Namespace(seed=0, dropout=0.0, head_lr=1e-2, block_lr=1e-3, weight_decay=0.0, batch=4, epochs=8)
    inputs = ns["frozen_outputs"](later, crops, 0)
    rows = torch.arange(len(y))
    reader, losses = ns["train_reader"](later, 1, inputs, crops, y, rows, args, len(tasks.LABELS["event"]))
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(reader.tuned[0].fc1.weight, later[0].fc1.weight)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    again, _ = ns["train_reader"](later, 1, inputs, crops, y, rows, args, len(tasks.LABELS["event"]))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in reader.state_dict().items())
    frozen, _ = ns["train_reader"](later, 0, ns["frozen_outputs"](later, crops, 1), crops, y, rows, args,
                                   len(tasks.LABELS["event"]))
    assert len(frozen.tuned) == 0 and all(p.requires_grad for p in reader.tuned.parameters())

    monkeypatch.setattr(osum, "load", lambda name, **kw: model)
    monkeypatch.setattr(sys, "argv", ["event_finetune.py", "--data", str(tmp_path), "--epochs", "2", "--batch", "4",
                                      "--window", "5"])
    runpy.run_path(script, run_name="__main__")
    printed = capsys.readouterr().out
    assert printed.startswith("16 training utterances of 8 recordings; test: 4; crops of 11 frames at most")
    assert f"| 0 | {head.cv_accuracy:.1%} | {accuracy:.1%} |" in printed.splitlines()[4]
    assert [line.split(" | ")[1] for line in printed.splitlines() if line.startswith("| crop")] == ["0", "1"]
    monkeypatch.setattr(sys, "argv", ["event_finetune.py", "--data", str(tmp_path), "--tune", "2"])
    with pytest.raises(SystemExit, match=r"1 encoder block\(s\) follow the locator's \(block 1\), so each count "
                                         "must be 0 to 1"):
        runpy.run_path(script, run_name="__main__")


def test_dropout_fit_separates_clusters_from_its_own_seed():
    """fit_linear(dropout=P): AdamW with dropped features, the same head from the same rows, the caller's random
    state untouched; a share outside [0, 1) is refused by name."""
    x, y = _clusters(300, seed=1)
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    weight, bias = fit_linear(x * 100.0 + 3.0, y, 3, dropout=0.3)
    assert torch.equal(torch.rand(3), before)  # its own generator
    held_x, held_y = _clusters(60, seed=2)
    assert ((held_x * 100.0 + 3.0) @ weight.T + bias).argmax(-1).eq(held_y).float().mean() > 0.9
    again = fit_linear(x * 100.0 + 3.0, y, 3, dropout=0.3)
    assert torch.equal(again[0], weight) and torch.equal(again[1], bias)
    assert not torch.equal(fit_linear(x, y, 3, dropout=0.5)[0], fit_linear(x, y, 3, dropout=0.3)[0])
    groups = [str(i % 10) for i in range(len(y))]
    assert cross_validate(x, y, groups, 3, dropout=0.3) > 0.9
    with pytest.raises(ValueError, match="dropout 1.0"):
        fit_linear(x, y, 3, dropout=1.0)


@pytest.fixture
def crop_model():
    """Four encoder blocks, the summary on blocks 0 and 1: a crop at block 1 runs blocks 2 and 3 again, and its
    statistics (three blocks) are wider than the summary's (two)."""
    from osum.model.speech_llm import SpeechLLM

    torch.manual_seed(0)
    return SpeechLLM(tiny_config("adaptor.summary_layers=[0,1]", "encoder.num_layers=4")).eval()


def test_locator_crop_reruns_the_later_blocks_on_the_frames_around_the_peak(tmp_path, crop_model):
    from osum.model import checkpoint
    from osum.model.adaptor import weighted_stats
    from osum.model.tag_heads import fit_locator, set_locator_crop

    rows = _write_events(tmp_path, 12)
    fit_locator(crop_model, "event", rows, layer=1)
    summary = crop_model.summary
    feats = [log_mel_spectrogram(load_audio(r["audio"])).T for r in rows[:3]]
    padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    lens = torch.tensor([m.shape[0] for m in feats])
    with torch.no_grad():
        _, enc_lens, hidden = crop_model.encoder.forward_layers(padded, lens, [0, 1, 2, 3])
        weights = summary.frame_weights(hidden[:2], enc_lens)
        # A crop wider than every utterance is the whole utterance: blocks 1-3 of the one full pass.
        set_locator_crop(crop_model, 100000)
        whole = crop_model.located_stats(hidden[:2], enc_lens)
        assert whole.shape == (3, crop_model.crop_stats_dim(1)) == (3, 2 * 3 * hidden[0].shape[-1])
        assert crop_model.crop_stats_dim(1) != summary.stats_dim
        assert torch.allclose(whole, weighted_stats(hidden[1:], weights, min_count=1e-30), atol=1e-5)
        # A narrow one: block 1's frames within 3 of the peak, blocks 2 and 3 run on them alone, item by item.
        set_locator_crop(crop_model, 3)
        narrow = crop_model.located_stats(hidden[:2], enc_lens)
        for i in range(3):
            n, peak = int(enc_lens[i]), int(weights[i].argmax())
            first, last = max(0, peak - 3), min(n, peak + 4)
            x = [hidden[1][i:i + 1, first:last]]
            for block in crop_model.encoder.layers[2:]:
                x.append(block(x[-1], None))
            expected = weighted_stats(x, weights[i:i + 1, first:last], 1e-30)
            assert torch.allclose(narrow[i], expected[0], atol=1e-5)
        assert not torch.allclose(narrow, whole, atol=1e-3)
    for row, batched in zip(rows[:5], pooled_stats(crop_model, rows[:5], batch_size=2, window=3, located=True)):
        assert torch.allclose(batched, pooled_stats(crop_model, [row], located=True)[0], atol=1e-5)

    fit = fit_model_head(crop_model, "event", rows, group_by="extra.event.clip", dropout=0.3)
    assert fit.weight.shape == (len(tasks.LABELS["event"]), crop_model.crop_stats_dim(1))
    assert crop_model.summary.heads["event"].weight.shape == fit.weight.shape

    def labels(model):
        return [out["event"] for out in model.summary_labels(padded, lens, ["event"])]

    enc = crop_model.encode(padded, lens)  # the decoding path reads the same crop
    assert torch.allclose(enc.located, narrow, atol=1e-5)
    out = checkpoint.save(crop_model, tmp_path / "model", dtype=torch.bfloat16)
    again = checkpoint.load(out).eval()
    assert again.config.adaptor.locator_crop == 3
    assert torch.equal(again.summary.heads["event"].weight, crop_model.summary.heads["event"].weight)
    assert labels(again) == labels(crop_model)
    # A locator fitted again on another block keeps the crop, its statistics from that block on, and a head fitted
    # again on them is saved and read back at that width.
    fit_locator(crop_model, "event", rows, layer=0)
    assert crop_model.summary.located_dim == crop_model.crop_stats_dim(0) == 4 * 2 * hidden[0].shape[-1]
    fit_model_head(crop_model, "event", rows, group_by="extra.event.clip", dropout=0.3)
    again = checkpoint.load(checkpoint.save(crop_model, tmp_path / "refit")).eval()
    assert again.config.adaptor.locator_layer == 0
    assert again.summary.heads["event"].weight.shape[1] == 4 * 2 * hidden[0].shape[-1]
    assert labels(again) == labels(crop_model)
    # The located statistics belong to one head: a locator for another field is refused while it is there.
    from osum.model.tag_heads import install_locator

    with pytest.raises(ValueError, match="the event head reads this model's located statistics"):
        install_locator(crop_model, "age", 0, torch.zeros(1, hidden[0].shape[-1]), torch.zeros(1))
    set_locator_crop(crop_model, None)
    assert crop_model.summary.located_dim == crop_model.summary.stats_dim
    assert crop_model.config.adaptor.locator_crop is None


def test_locator_crop_errors_name_what_is_wrong(crop_model):
    from osum.model.speech_llm import SpeechLLM
    from osum.model.tag_heads import set_locator_crop

    with pytest.raises(ValueError, match="needs a fitted frame locator"):
        set_locator_crop(crop_model, 3)
    with pytest.raises(ValueError, match="adaptor.locator_crop 3: .* with a fitted locator"):
        SpeechLLM(tiny_config("adaptor.summary_layers=[0]", "adaptor.locator_crop=3"))
    with pytest.raises(ValueError, match="adaptor.locator_crop 0: .* a positive integer"):
        SpeechLLM(tiny_config("adaptor.summary_layers=[0]", "adaptor.tag_heads=[event]", "adaptor.located_head=event",
                              "adaptor.locator_layer=0", "adaptor.locator_crop=0"))
    with pytest.raises(ValueError, match="adaptor.locator_crop 2: fitted on .* set adaptor.summary_layers"):
        SpeechLLM(tiny_config("adaptor.locator_crop=2"))


def test_export_fits_a_cropped_head_with_dropout_on_two_lists(tmp_path, crop_model, capsys):
    """`--locator-crop`, `--tag-head-dropout` and a field's head fitted on two lists (its locator on the first)."""
    from osum.cli import _head_dropout, main
    from osum.model import checkpoint

    rows = _write_events(tmp_path, 14)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    second.write_text("".join(json.dumps({**r, "extra": {"event": {"clip": "other"}}}) + "\n" for r in rows[10:]))
    source = checkpoint.save(crop_model, tmp_path / "ckpt")
    assert main(["export", str(source), "--out", str(tmp_path / "out"), "--fit-tag-heads", f"event={first}",
                 "--fit-tag-heads", f"event={second}", "--locate-tag-head", "event", "--locator-layer", "1",
                 "--locator-crop", "5", "--tag-head-dropout", "event=0.3",
                 "--tag-head-groups", "event=extra.event.clip"]) == 0
    err = capsys.readouterr().err
    assert f"in 10 utterances of {first}" in err  # the locator: the first list's spans (the second has none)
    assert "event head reads the 11 frames around the locator's peak" in err
    assert f"event head fitted on 14 utterances of {first} + {second}" in err
    exported = checkpoint.load(tmp_path / "out").eval()
    adaptor = exported.config.adaptor
    assert (adaptor.located_head, adaptor.locator_layer, adaptor.locator_crop) == ("event", 1, 5)
    stats = torch.stack(pooled_stats(exported, rows, located=True))
    assert stats.shape[1] == exported.crop_stats_dim(1)
    reference = fit_linear(stats, torch.tensor([tasks.LABELS["event"].index(r["event"]) for r in rows]),
                           len(tasks.LABELS["event"]), dropout=0.3)
    assert torch.allclose(exported.summary.heads["event"].weight, reference[0], atol=1e-4)
    # From a cropped model, a head fitted again without --locate-tag-head reads the same crop.
    assert main(["export", str(tmp_path / "out"), "--out", str(tmp_path / "again"), "--fit-tag-heads",
                 f"event={first}"]) == 0
    assert checkpoint.load(tmp_path / "again").config.adaptor.locator_crop == 5
    with pytest.raises(SystemExit, match="given twice"):
        main(["export", str(source), "--out", str(tmp_path / "x"), "--fit-tag-heads", f"event={first}",
              "--fit-tag-heads", f"event={first}"])
    for args, message in ((["--locator-crop", "5"], "only --locate-tag-head"),
                          (["--locate-tag-head", "event", "--locator-crop", "0"], "at least 1"),
                          (["--tag-head-dropout", "event=0.3"], "none is given")):
        extra = [] if "none is given" in message else ["--fit-tag-heads", f"event={first}"]
        with pytest.raises(SystemExit, match=message):
            main(["export", str(source), "--out", str(tmp_path / "x"), *extra, *args])
    assert _head_dropout(["event=0.5"], ["event", "age"]) == {"event": 0.5}
    for specs, message in ((["age=0.5"], "one of the heads"), (["event=1"], "between 0 and 1"),
                           (["event=x"], "between 0 and 1"), (["event=0.2", "event=0.3"], "two values")):
        with pytest.raises(SystemExit, match=message):
            _head_dropout(specs, ["event"])


def test_event_readers_script_compares_the_exports_fits(tmp_path, crop_model, monkeypatch, capsys):
    """recipes/osum-tiny/event_readers.py: its first row is the export's whole-utterance L-BFGS fit (held out by
    recording, and on test); a row for each statistics, fit and extra-list choice, the added rows never scored;
    bad arguments are refused by name."""
    import runpy
    import sys
    from pathlib import Path

    import osum
    from osum.model.tag_heads import set_locator_crop

    train, _, head, accuracy = _fitted_event_lists(tmp_path, crop_model)
    (tmp_path / "train_extra_ved.jsonl").write_text("".join(
        json.dumps({**r, "key": f"x{r['key']}", "audio": Path(r["audio"]).name,
                    "extra": {"event": {"recording": "extra/one"}}}) + "\n" for r in train[:2]))
    script = str(Path(__file__).resolve().parents[1] / "recipes" / "osum-tiny" / "event_readers.py")
    monkeypatch.setattr(osum, "load", lambda name, **kw: crop_model)
    monkeypatch.setattr(sys, "argv", ["event_readers.py", "--data", str(tmp_path), "--crop", "3", "--regs", "0.01",
                                      "--dropouts", "0.3"])
    runpy.run_path(script, run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "16 training utterances, 2 extra (train_extra_ved.jsonl), 4 test; held-out accuracy scored on " \
                       "the 16 training utterances"
    rows = [line for line in lines if line.startswith("| ") and "%" in line]
    assert len(rows) == 2 * 2 * 2  # statistics x fits x extra list
    assert rows[0] == (f"| whole utterance, locator-weighted | L-BFGS, L2 0.01 | no | {head.cv_accuracy:.1%} | "
                       f"{accuracy:.1%} |")
    assert rows[-1].startswith("| crop of 7 frames at the peak, blocks re-run | AdamW, dropout 0.3 | yes | ")
    assert crop_model.config.adaptor.locator_crop == 3  # the script leaves the model with its last reader
    set_locator_crop(crop_model, None)
    for argv, message in ((["--crop", "0"], "at least one frame"), (["--regs", "x"], "comma-separated numbers"),
                          (["--dropouts", "1"], "below 1"), (["--extra", "none.jsonl"], "none.jsonl: not found")):
        monkeypatch.setattr(sys, "argv", ["event_readers.py", "--data", str(tmp_path), *argv])
        with pytest.raises(SystemExit, match=message):
            runpy.run_path(script, run_name="__main__")
