"""SpeechLLM on tiny random models: encoder parity with HF Whisper, batch == single, losses, checkpoints."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from osum.config import EncoderConfig
from osum.model import checkpoint
from osum.model.adaptor import Adaptor, conv_lengths
from osum.model.encoder import WhisperAudioEncoder
from osum.model.speech_llm import SpeechLLM
from tests.conftest import tiny_config


def random_features(lengths: list[int], n_mels: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, n_mels, generator=g) for n in lengths]
    return torch.nn.utils.rnn.pad_sequence(feats, batch_first=True), torch.tensor(lengths)


def test_encoder_matches_hf_whisper_on_3000_frames():
    hf_cfg = WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=80)
    torch.manual_seed(0)
    hf = WhisperEncoder(hf_cfg).eval()
    ours = WhisperAudioEncoder(EncoderConfig(d_model=64, num_layers=2, num_heads=4, ffn_dim=128), 80).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    feats = torch.randn(2, 80, 3000)
    with torch.no_grad():
        ref = hf(feats).last_hidden_state
        out, lens = ours(feats.transpose(1, 2), torch.tensor([3000, 3000]))
    assert lens.tolist() == [1500, 1500]
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


def test_encoder_and_adaptor_batch_equals_single():
    enc = WhisperAudioEncoder(EncoderConfig(d_model=64, num_layers=2, num_heads=4, ffn_dim=128), 80).eval()
    cfg = tiny_config().adaptor
    ada = Adaptor(cfg, 64, 32).eval()
    lengths = [301, 1000, 97, 2]  # odd, even, short, tiny
    feats, lens = random_features(lengths)
    with torch.no_grad():
        enc_out, enc_lens = enc(feats, lens)
        ada_out, ada_lens = ada(enc_out, enc_lens)
        for i, n in enumerate(lengths):
            e1, l1 = enc(feats[i : i + 1, :n], lens[i : i + 1])
            a1, al1 = ada(e1, l1)
            assert l1.item() == enc_lens[i].item() == (n - 1) // 2 + 1
            assert al1.item() == ada_lens[i].item() == conv_lengths(l1, [1, 2, 2]).item()
            assert torch.allclose(enc_out[i, : l1.item()], e1[0], atol=1e-5)
            assert torch.allclose(ada_out[i, : al1.item()], a1[0], atol=1e-5)


def test_encoder_rejects_more_than_30s():
    enc = WhisperAudioEncoder(EncoderConfig(d_model=64, num_layers=1, num_heads=4, ffn_dim=128), 80)
    with pytest.raises(ValueError, match="3001 frames"):
        enc(torch.zeros(1, 3001, 80), torch.tensor([3001]))


def test_lengths_arithmetic():
    # 2 s = 200 frames → 100 encoder frames → 25 LLM positions; 30 s → 375 (OSUM fact sheet §4.3).
    assert conv_lengths(torch.tensor([100, 1500, 99, 1]), [1, 2, 2]).tolist() == [25, 375, 25, 1]


def diversify(model: SpeechLLM, std: float = 0.1) -> SpeechLLM:
    """Re-draw the LLM's matrices with a larger std: at HF's default init a tiny random LLM repeats one
    token forever, which would let batch-vs-single comparisons pass without testing positions."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.base_llm.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return model


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "qwen3_moe"])
def backbone_model(request):
    torch.manual_seed(0)
    cfg = tiny_config(f"llm.arch={request.param}", "lora.dropout=0.0", "llm.tie_word_embeddings=false")
    return diversify(SpeechLLM(cfg))


def test_forward_backward_touches_only_trainable(backbone_model):
    model = backbone_model.train()
    feats, lens = random_features([150, 90])
    model.zero_grad()
    out = model(feats, lens, ["Transcribe the audio.", "What is the emotion?"], ["hello world", "<happy>"])
    assert torch.isfinite(out.loss) and out.num_tokens > 0
    out.loss.backward()
    trainable = set(model.trainable_parameters())
    # The tiny preset trains adaptor + speech embeddings + LoRA, nothing else.
    assert trainable == {n for n, _ in model.named_parameters()
                         if n.startswith("adaptor.") or n == "speech_embeds" or "lora_" in n}
    assert any("lora_" in n for n in trainable)
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name


def test_loss_only_on_target(tiny_model):
    """Only the target's tokens (and its end token) are supervised, conditioned on the prompt and audio."""
    feats, lens = random_features([120])
    target = "some words"
    with torch.no_grad():
        out = tiny_model(feats, lens, ["Transcribe."], [target])
        other_prompt = tiny_model(feats, lens, ["Tell me the speaker's gender, please."], [target])
    assert out.num_tokens == other_prompt.num_tokens == len(tiny_model.prompts.target_ids(target))
    assert not torch.equal(out.loss, other_prompt.loss)


def test_ctc_loss_scores_adaptor_output_against_the_llm_embeddings(tiny_model):
    """Positions that are (scaled) embeddings of blank, t1, blank, t2, ... cost next to nothing; batch == single;
    items CTC cannot fit, or without a transcript, are left out."""
    emb = tiny_model.base_llm.get_input_embeddings().weight.detach()
    blank = tiny_model.ctc_blank_id
    said = tiny_model.prompts.encode("open the door")
    path = [blank] + [t for tok in said for t in (tok, blank)]
    aligned = (emb[path] * 50.0)[None]  # dot products pick out the row itself when it is scaled up
    lens = torch.tensor([len(path)])

    def loss(out, lens, texts):
        return tiny_model.ctc_loss(tiny_model.ctc_logits(out), lens, texts)

    def greedy(out, lens):
        return tiny_model.ctc_greedy(tiny_model.ctc_logits(out), lens)

    assert loss(aligned, lens, [said]).item() < 0.05
    assert greedy(aligned, lens) == [said]  # blanks dropped, the path read back
    doubled = torch.cat([aligned[:, :2], aligned[:, 1:]], dim=1)  # a token held for two positions is one token
    assert greedy(doubled, lens + 1) == [said]
    wrong = tiny_model.prompts.encode("read a book")
    assert loss(aligned, lens, [wrong]).item() > 5.0

    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 12, emb.shape[1], generator=g)
    out_lens = torch.tensor([12, 9, 12])
    texts = [tiny_model.prompts.encode(t) for t in ("good morning", "see you soon")]
    singles = [loss(out[i : i + 1, : out_lens[i]], out_lens[i : i + 1], [texts[i]]) for i in range(2)]
    too_long = list(range(5, 25))  # 20 tokens do not fit into 12 positions
    batch = loss(out, out_lens, texts + [too_long])
    weights = [len(t) for t in texts]
    expected = sum(w * s for w, s in zip(weights, singles)) / sum(weights)
    assert torch.allclose(batch, expected, atol=1e-5)
    assert torch.allclose(loss(out, out_lens, [texts[0], [], texts[1]]),
                          loss(out[[0, 2]], out_lens[[0, 2]], texts), atol=1e-5)
    assert loss(out, out_lens, [[], [], too_long]).item() == 0.0


def test_batched_generate_equals_single(backbone_model):
    model = backbone_model.eval()
    lengths = [260, 75, 181]
    feats, lens = random_features(lengths, seed=1)
    prompts = ["Transcribe the audio.", "Who is speaking? Give the gender.", "Transcribe."]
    batched = model.generate_ids(feats, lens, prompts)
    # Varied output, so that a wrong position or mask would show up as different tokens.
    assert len({t for ids in batched for t in ids}) > 10 and len({tuple(ids) for ids in batched}) == 3, batched
    for i, n in enumerate(lengths):
        single = model.generate_ids(feats[i : i + 1, :n], lens[i : i + 1], [prompts[i]])
        assert single[0] == batched[i]


def test_chat_layout_generates_and_trains():
    model = SpeechLLM(tiny_config("prompt.layout=chat"))
    p = model.prompts.prompt_ids("Transcribe.")
    assert p.suffix, "the chat layout places template tokens after the audio (end of the user turn)"
    assert model.prompts.end_id == model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    feats, lens = random_features([100, 60])
    assert torch.isfinite(model(feats, lens, ["a", "b"], ["x", "y"]).loss)
    assert len(model.eval().generate(feats, lens, ["a", "b"])) == 2


def test_checkpoint_roundtrip_identical(tiny_model, tmp_path):
    tiny_model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        tiny_model.adaptor.proj.bias.add_(0.01)  # differs from a fresh build with the same seed
    path = checkpoint.save(tiny_model, tmp_path / "m")
    loaded = checkpoint.load(path)
    feats, lens = random_features([140, 77], seed=3)
    with torch.no_grad():
        a = tiny_model(feats, lens, ["p", "q"], ["target one", "two"]).loss
        b = loaded(feats, lens, ["p", "q"], ["target one", "two"]).loss
    assert torch.equal(a, b)
    assert tiny_model.generate_ids(feats, lens, ["p", "q"]) == loaded.generate_ids(feats, lens, ["p", "q"])
    meta = json.loads((path / "config.json").read_text())
    assert set(meta["stored_groups"]) == {"adaptor", "speech_embeds", "lora", "encoder", "llm"}


def test_checkpoint_missing_tensor_fails(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    path = checkpoint.save(tiny_model, tmp_path / "m")
    state = load_file(path / "model.safetensors")
    victim = next(k for k in state if k.startswith("adaptor."))
    del state[victim]
    save_file(state, path / "model.safetensors")
    with pytest.raises(KeyError, match=victim.replace(".", r"\.")):
        checkpoint.load(path)


def test_checkpoint_save_is_atomic(tiny_model, tmp_path, monkeypatch):
    path = checkpoint.save(tiny_model, tmp_path / "m")
    before = (path / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError):
        checkpoint.save(tiny_model, path)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_stop_tokens_end_generation(backbone_model):
    import dataclasses

    model = backbone_model.eval()
    feats, lens = random_features([200], seed=4)
    gen = dataclasses.replace(model.config.generation, max_new_tokens=12)
    (full,) = model.generate_ids(feats, lens, ["Transcribe."], gen)
    stop = full[5]
    stop_token = model.tokenizer.convert_ids_to_tokens(stop)
    (cut,) = model.generate_ids(feats, lens, ["Transcribe."], dataclasses.replace(gen, stop_tokens=[stop_token]))
    assert cut == full[: full.index(stop)]
    with pytest.raises(ValueError, match="not a single token"):
        model.generate_ids(feats, lens, ["x"], dataclasses.replace(gen, stop_tokens=["two words"]))


def test_beam_and_sampling(backbone_model):
    import dataclasses

    model = backbone_model.eval()
    lengths = [220, 90]
    feats, lens = random_features(lengths, seed=5)
    prompts = ["Transcribe.", "Tag the emotion."]
    beam = dataclasses.replace(model.config.generation, num_beams=3, max_new_tokens=8)
    batched = model.generate_ids(feats, lens, prompts, beam)
    for i, n in enumerate(lengths):
        assert model.generate_ids(feats[i : i + 1, :n], lens[i : i + 1], [prompts[i]], beam) == [batched[i]]
    sample = dataclasses.replace(model.config.generation, do_sample=True, top_k=50, top_p=0.9, temperature=1.5,
                                 max_new_tokens=8, seed=123)
    first = model.generate_ids(feats, lens, prompts, sample)
    assert model.generate_ids(feats, lens, prompts, sample) == first  # the seed makes sampling reproducible
    assert first != model.generate_ids(feats, lens, prompts, dataclasses.replace(sample, seed=7))


@pytest.mark.slow
def test_osum_tiny_preset_builds_from_offline_weights():
    """whisper-base + SmolLM2-135M from the weight packages: encoder weights loaded, sizes from the checkpoint."""
    from osum.audio import load_audio, log_mel_spectrogram

    model = SpeechLLM(tiny_config().__class__.load("osum-tiny")).eval()
    assert (model.config.encoder.d_model, model.config.encoder.num_layers) == (512, 6)
    assert model.base_llm.config.hidden_size == 576 and model.base_llm.__class__.__name__ == "Qwen2ForCausalLM"
    mel = log_mel_spectrogram(load_audio("examples/librivox_mister_john_dashwood.wav")).T[None]
    out = model(mel, torch.tensor([mel.shape[1]]), ["Transcribe the audio."], ["and mister john dashwood"])
    assert torch.isfinite(out.loss)
    assert len(model.generate(mel, torch.tensor([mel.shape[1]]), ["Transcribe the audio."])) == 1


def test_layer_mix_starts_as_the_top_output_and_reloads_exactly(tiny_model, tmp_path):
    """adaptor.encoder_layers: a model initialised from one without the mix computes what it did (the
    projections start at zero); trained, the mix is its own checkpoint group and reloads exactly."""
    plain = checkpoint.save(tiny_model, tmp_path / "plain")
    mixed = SpeechLLM(tiny_config("adaptor.encoder_layers=[0,1]")).eval()
    assert checkpoint.load_weights(mixed, plain) == ["adaptor", "speech_embeds", "lora", "encoder", "llm"]
    feats, lens = random_features([140, 77], seed=4)
    with torch.no_grad():
        before = tiny_model(feats, lens, ["p", "q"], ["target one", "two"]).loss
        assert torch.equal(mixed(feats, lens, ["p", "q"], ["target one", "two"]).loss, before)
        _, _, hidden = mixed.encoder.forward_layers(feats, lens, [0, 1])
        assert [h.shape for h in hidden] == [torch.Size([2, 70, 64])] * 2
        for proj in mixed.layer_mix.projs:
            proj.weight.normal_(0, 0.05)
        after = mixed(feats, lens, ["p", "q"], ["target one", "two"]).loss
    assert not torch.equal(after, before)  # the lower blocks now reach the adaptor
    path = checkpoint.save(mixed, tmp_path / "mixed")
    assert "layer_mix" in json.loads((path / "config.json").read_text())["stored_groups"]
    with torch.no_grad():
        assert torch.equal(checkpoint.load(path)(feats, lens, ["p", "q"], ["target one", "two"]).loss, after)
    with pytest.raises(ValueError, match="encoder_layers"):
        SpeechLLM(tiny_config("adaptor.encoder_layers=[2]"))


def test_voice_summary_is_one_position_from_valid_frames_and_reloads_exactly(tiny_model, tmp_path):
    """adaptor.summary_layers: one extra audio position before the adaptor's frames, pooled over valid frames
    only (a padded item gets what it gets alone), initialised strictly from a plain checkpoint (as a constant,
    the projection at zero), its own checkpoint group, reloaded exactly; CTC still reads the frames alone."""
    plain = checkpoint.save(tiny_model, tmp_path / "plain")
    model = SpeechLLM(tiny_config("adaptor.summary_layers=[0,1]")).eval()
    assert checkpoint.load_weights(model, plain) == ["adaptor", "speech_embeds", "lora", "encoder", "llm"]
    feats, lens = random_features([140, 77], seed=5)
    with torch.no_grad():
        frames, frame_lens = tiny_model.embed_audio(feats, lens)
        positions, position_lens = model.embed_audio(feats, lens)
        assert torch.equal(position_lens, frame_lens + 1)
        assert torch.equal(positions[:, 1:], frames)  # the adaptor's frames are unchanged, one place later
        assert torch.allclose(positions[0, 0], positions[1, 0])  # a constant until the projection moves
        model.summary.proj.weight.normal_(0, 0.05)
        positions, _ = model.embed_audio(feats, lens)
        assert not torch.allclose(positions[0, 0], positions[1, 0])
        alone, _ = model.embed_audio(feats[1:, :77], lens[1:])
        assert torch.allclose(alone[0, 0], positions[1, 0], atol=1e-5)
        transcripts = [[5, 6, 7], [8, 9]]
        with_summary = model(feats, lens, ["p", "q"], ["target one", "two"], transcripts=transcripts)
        without = tiny_model(feats, lens, ["p", "q"], ["target one", "two"], transcripts=transcripts)
        assert torch.equal(with_summary.ctc_loss, without.ctc_loss)
    path = checkpoint.save(model, tmp_path / "summary")
    assert "summary" in json.loads((path / "config.json").read_text())["stored_groups"]
    with torch.no_grad():
        again = checkpoint.load(path)(feats, lens, ["p", "q"], ["target one", "two"]).loss
        assert torch.equal(again, model(feats, lens, ["p", "q"], ["target one", "two"]).loss)
    with pytest.raises(ValueError, match="summary_layers"):
        SpeechLLM(tiny_config("adaptor.summary_layers=[1,1]"))
