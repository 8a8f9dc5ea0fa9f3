"""SpeechLLM: Whisper encoder → adaptor → LLM with speech-begin/end embeddings; loss and batched generation.

Each item's sequence is assembled contiguously (no padding holes inside it) and then padded as a whole:
on the right for training, on the left for generation, so batching never changes an item's positions.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from osum import tasks
from osum.audio import FRAMES_PER_SECOND
from osum.config import GenerationConfig, ModelConfig
from osum.model.adaptor import Adaptor, LayerMix, VoiceSummary, weighted_stats
from osum.model.align import align_words
from osum.model.ctc_prefix import CTCJointScores, CTCPrefixScorer
from osum.model.encoder import WhisperAudioEncoder
from osum.model.encoder_weights import load_into, read_encoder
from osum.model.llm import apply_lora, build_llm, load_tokenizer
from osum.model.prompt import PromptBuilder, PromptIds

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class Batch:
    """LLM inputs of one batch."""

    inputs_embeds: torch.Tensor  # (B, L, H)
    attention_mask: torch.Tensor  # (B, L) long, 1 = keep
    position_ids: torch.Tensor  # (B, L)
    labels: torch.Tensor | None  # (B, L), IGNORE_INDEX outside the targets


# Cosine similarities are at most 1: this scale lets the summary loss reach a confident, near-zero value.
SUMMARY_SCALE = 10.0


@dataclass
class Encoded:
    """One batch's audio through encoder and adaptor (SpeechLLM.encode): what decoding, the CTC word times and the
    voice summary's labels all read, so that a batch is encoded once."""

    adaptor_out: torch.Tensor  # (B, S, H)
    adaptor_lens: torch.Tensor  # (B,)
    summary: torch.Tensor | None  # (B, H) the voice summary position, when the model has one
    stats: torch.Tensor | None  # (B, stats_dim) its pooled statistics (float32)
    located: torch.Tensor | None = None  # (B, located_dim) the located head's (located_stats); not in training

    def take(self, index: torch.Tensor) -> Encoded:
        """The items at `index` (their padding stays the batch's: each item is read up to its own length)."""
        pick = (lambda t: None if t is None else t[index.to(t.device)])
        return Encoded(pick(self.adaptor_out), pick(self.adaptor_lens), pick(self.summary), pick(self.stats),
                       pick(self.located))


@dataclass
class ForwardOutput:
    loss: torch.Tensor  # mean over supervised tokens
    num_tokens: int
    ctc_loss: torch.Tensor | None = None  # per transcript token, when transcripts were given
    ctc_greedy: list[list[int]] | None = None  # in eval mode with transcripts: each item's greedy CTC tokens
    summary_loss: torch.Tensor | None = None  # with labels and a voice summary: see SpeechLLM.summary_loss
    summary_hits: dict[str, tuple[int, int]] | None = None  # in eval mode with it: field -> (right, labelled)


class SpeechLLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None):
        super().__init__()
        self.config = cfg
        torch.manual_seed(cfg.seed)  # random parts (tiny backbones, adaptor) are reproducible from the config
        enc_state = None
        if cfg.encoder.name is not None:
            # HF dir or hub id, named model, CTranslate2 dir, OpenAI .pt or WeNet checkpoint (encoder_weights).
            sizes, enc_state = read_encoder(cfg.encoder.name)
            # Sizes of a named encoder come from its checkpoint; the saved config then records the truth.
            cfg.audio.n_mels = sizes.pop("n_mels")
            for key, value in sizes.items():
                setattr(cfg.encoder, key, value)
        self.encoder = WhisperAudioEncoder(cfg.encoder, cfg.audio.n_mels)
        if enc_state is not None:
            load_into(self.encoder, enc_state, cfg.encoder.name)
        self.encoder.requires_grad_(cfg.encoder.trainable)
        self.encoder.embed_positions.requires_grad_(False)

        self.tokenizer = tokenizer or load_tokenizer(cfg.llm)
        llm = build_llm(cfg.llm, self.tokenizer)
        hidden = llm.config.get_text_config().hidden_size
        self.adaptor = Adaptor(cfg.adaptor, cfg.encoder.d_model, hidden)
        self.adaptor.requires_grad_(cfg.adaptor.trainable)
        # Rows 0/1: speech-begin / speech-end, scaled like the LLM's own token embeddings.
        weight = llm.get_input_embeddings().weight
        # Parameters built on the meta device (a checkpoint is mapped in afterwards) have no values to measure.
        std = 1.0 if weight.is_meta else weight.float().std().item()
        self.speech_embeds = nn.Parameter(torch.randn(2, hidden) * std)
        self.speech_embeds.requires_grad_(cfg.adaptor.trainable)
        self.layer_mix = None
        if cfg.adaptor.encoder_layers:
            self._check_blocks("encoder_layers", cfg.adaptor.encoder_layers)
            self.layer_mix = LayerMix(cfg.adaptor.encoder_layers, cfg.encoder.d_model)
            self.layer_mix.requires_grad_(cfg.adaptor.trainable)
        self.llm = apply_lora(llm, cfg.lora, cfg.llm.trainable) if cfg.lora.enabled else llm
        self.summary = None
        if cfg.adaptor.summary_layers:
            # Built last: its one random draw then leaves every other part's initialisation as it was.
            self._check_blocks("summary_layers", cfg.adaptor.summary_layers)
            unknown = [f for f in cfg.adaptor.tag_heads if f not in tasks.TAG_FIELDS]
            if unknown:
                raise ValueError(f"adaptor.tag_heads {unknown}: not tag fields ({', '.join(tasks.TAG_FIELDS)})")
            located = (cfg.adaptor.located_head, cfg.adaptor.locator_layer)
            if (located[0] is None) != (located[1] is None):
                raise ValueError(f"adaptor.located_head {located[0]!r} and adaptor.locator_layer {located[1]!r}: "
                                 "set both (a fitted frame locator) or neither")
            if located[0] is not None and located[0] not in cfg.adaptor.tag_heads:
                raise ValueError(f"adaptor.located_head {located[0]!r}: not one of the fitted heads, adaptor.tag_heads "
                                 f"{cfg.adaptor.tag_heads} (the locator weights the statistics a head reads)")
            crop = cfg.adaptor.locator_crop
            if crop is not None and (located[0] is None or isinstance(crop, bool) or not isinstance(crop, int)
                                     or crop < 1):
                raise ValueError(f"adaptor.locator_crop {crop!r}: frames each side of a frame locator's peak, a "
                                 "positive integer, with a fitted locator (adaptor.located_head)")
            self.summary = VoiceSummary(cfg.adaptor.summary_layers, cfg.encoder.d_model, hidden,
                                        {f: len(tasks.LABELS[f]) for f in cfg.adaptor.tag_heads},
                                        cfg.adaptor.locator_layer, cfg.adaptor.located_head,
                                        None if crop is None else self.crop_stats_dim(cfg.adaptor.locator_layer))
            with torch.no_grad():
                self.summary.base.normal_(0, std)
                self.summary.norm.weight.fill_(std)
            self.summary.requires_grad_(cfg.adaptor.trainable)
            self.summary.heads.requires_grad_(False)  # fitted by osum/model/tag_heads.py, never by the optimiser
            if self.summary.locator is not None:
                self.summary.locator.requires_grad_(False)  # the same
        else:
            fitted = {"tag_heads": cfg.adaptor.tag_heads, "located_head": cfg.adaptor.located_head,
                      "locator_layer": cfg.adaptor.locator_layer, "locator_crop": cfg.adaptor.locator_crop}
            fitted = [f"adaptor.{k} {v!r}" for k, v in fitted.items() if v not in (None, [])]
            if fitted:
                raise ValueError(f"{' and '.join(fitted)}: fitted on the voice summary's statistics, which this model "
                                 "does not have: set adaptor.summary_layers")
        self.prompts = PromptBuilder(self.tokenizer, cfg.prompt.layout, cfg.prompt.system, cfg.prompt.end_token)
        self._enders: list[int] | None = None  # _end_tokens, found once
        self._closers: list[int] | None = None  # transcript_closers, found once
        self._texts: list[str] | None = None  # every token's text (token_texts), found once
        self._tag_pieces: dict[str, list[int]] | None = None  # tag_pieces, found once
        self._tag_ids: dict[str, list[list[int]]] = {}  # each tag field's labels as token ids (tag_vectors)

    # ---- pieces -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.speech_embeds.device

    @property
    def base_llm(self) -> nn.Module:
        """The HF causal LM (LoRA layers live inside it when enabled)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def _check_blocks(self, name: str, layers: list[int]) -> None:
        bad = [i for i in layers if not 0 <= i < len(self.encoder.layers)]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"adaptor.{name} {layers}: each must be a distinct block of the encoder, "
                             f"0-{len(self.encoder.layers) - 1}")

    def encode(self, features: torch.Tensor, feature_lens: torch.Tensor) -> Encoded:
        """The audio's pass through encoder and adaptor, kept whole so that decoding, CTC word times and the
        summary's labels of one batch share it (see `Encoded`)."""
        wanted = sorted({*(self.layer_mix.layers if self.layer_mix else ()),
                         *(self.summary.layers if self.summary else ())})
        encoder_out, encoder_lens, hidden = self.encoder.forward_layers(features, feature_lens, wanted)
        blocks = dict(zip(wanted, hidden))
        if self.layer_mix is not None:
            encoder_out = self.layer_mix(encoder_out, [blocks[i] for i in self.layer_mix.layers])
        adaptor_out, adaptor_lens = self.adaptor(encoder_out, encoder_lens)
        summary = stats = located = None
        if self.summary is not None:
            summary, stats, located = self._summarise([blocks[i] for i in self.summary.layers], encoder_lens)
        return Encoded(adaptor_out, adaptor_lens, summary, stats, located)

    def _summarise(self, hidden: list[torch.Tensor], encoder_lens: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The summary's blocks → its position, pooled statistics and (with a frame locator) located statistics."""
        stats = self.summary.pool(hidden, encoder_lens)
        # only the fitted head reads them, never a training loss: a crop would run the later blocks for nothing
        located = (self.located_stats(hidden, encoder_lens) if self.summary.locator is not None and not self.training
                   else None)
        return self.summary.project(stats), stats, located

    def crop_stats_dim(self, locator_layer: int) -> int:
        """The width of a crop's statistics: mean and spread of the locator's block and each later one."""
        return 2 * self.config.encoder.d_model * (len(self.encoder.layers) - locator_layer)

    def located_stats(self, hidden: list[torch.Tensor], encoder_lens: torch.Tensor) -> torch.Tensor:
        """The located head's statistics from the summary's blocks (B, T', D_enc each): pooled with the frame
        locator's weights over the whole utterance, or, with `adaptor.locator_crop` = W, over the crop of the
        locator's block within W frames of each item's highest-scoring frame, every later block run again on
        that crop alone (B, 2 * D_enc * blocks from the locator's on). Whisper's blocks add no positions of
        their own, so a crop is read as if it were the whole audio."""
        crop = self.config.adaptor.locator_crop
        if crop is None:
            return self.summary.pool(hidden, encoder_lens, located=True)
        x, weights, valid = self.summary.crop(hidden, encoder_lens, crop)
        blocks, mask = [x], valid[:, None, None, :]
        for layer in list(self.encoder.layers)[self.summary.locator_layer + 1:]:
            x = layer(x, mask)
            blocks.append(x)
        return weighted_stats(blocks, weights, min_count=torch.finfo(torch.float32).tiny)

    def _encode(self, features: torch.Tensor, feature_lens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """→ adaptor_out (B, S, H), adaptor_lens (B,), and the voice summary (B, H) when configured."""
        enc = self.encode(features, feature_lens)
        return enc.adaptor_out, enc.adaptor_lens, enc.summary

    @staticmethod
    def _audio_positions(adaptor_out: torch.Tensor, adaptor_lens: torch.Tensor,
                         summary: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM's audio positions: the summary (when there is one) first, then the adaptor's frames."""
        if summary is None:
            return adaptor_out, adaptor_lens
        return torch.cat([summary[:, None].to(adaptor_out.dtype), adaptor_out], 1), adaptor_lens + 1

    def embed_audio(self, features: torch.Tensor, feature_lens: torch.Tensor,
                    encoded: Encoded | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, n_mels), feature_lens (B,) → the LLM's audio positions (B, S, H) and their counts (B,).
        `encoded`: this batch's `encode` already done."""
        enc = encoded if encoded is not None else self.encode(features, feature_lens)
        return self._audio_positions(enc.adaptor_out, enc.adaptor_lens, enc.summary)

    def _as_prompt_ids(self, prompts: list[str] | list[PromptIds]) -> list[PromptIds]:
        return [p if isinstance(p, PromptIds) else self.prompts.prompt_ids(p) for p in prompts]

    def assemble(
        self,
        adaptor_out: torch.Tensor,
        adaptor_lens: torch.Tensor,
        prompts: list[PromptIds],
        targets: list[list[int]] | None = None,
    ) -> Batch:
        """Build each item's [prefix][begin][audio][end][suffix][target] and pad (right if targets, else left)."""
        if len(prompts) != adaptor_out.shape[0] or (targets is not None and len(targets) != len(prompts)):
            raise ValueError(
                f"batch sizes disagree: audio {adaptor_out.shape[0]}, prompts {len(prompts)}, "
                f"targets {None if targets is None else len(targets)}"
            )
        embed = self.base_llm.get_input_embeddings()
        dtype = embed.weight.dtype
        begin, end = self.speech_embeds.to(dtype).unbind(0)
        seqs, labels = [], []
        for i, p in enumerate(prompts):
            target = targets[i] if targets is not None else []
            ids = torch.tensor(p.prefix + p.suffix + target, dtype=torch.long, device=self.device)
            text = embed(ids)
            n_pre, n_suf = len(p.prefix), len(p.suffix)
            audio = adaptor_out[i, : int(adaptor_lens[i])].to(dtype)
            seqs.append(
                torch.cat([text[:n_pre], begin[None], audio, end[None], text[n_pre : n_pre + n_suf], text[n_pre + n_suf :]])
            )
            labels.append([IGNORE_INDEX] * (seqs[-1].shape[0] - len(target)) + list(target))
        lengths = [s.shape[0] for s in seqs]
        L, B = max(lengths), len(seqs)
        inputs_embeds = seqs[0].new_zeros(B, L, seqs[0].shape[-1])
        attention_mask = torch.zeros(B, L, dtype=torch.long, device=self.device)
        label_tensor = torch.full((B, L), IGNORE_INDEX, dtype=torch.long, device=self.device)
        left = targets is None
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            sl = slice(L - n, L) if left else slice(0, n)
            inputs_embeds[i, sl] = s
            attention_mask[i, sl] = 1
            label_tensor[i, sl] = torch.tensor(labels[i], device=self.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return Batch(inputs_embeds, attention_mask, position_ids, label_tensor if targets is not None else None)

    # ---- training -----------------------------------------------------------------------------

    def forward(
        self,
        features: torch.Tensor,
        feature_lens: torch.Tensor,
        prompts: list[str] | list[PromptIds],
        targets: list[str] | list[list[int]],
        transcripts: list[list[int]] | None = None,
        lm: bool = True,
        labels: list[dict[str, str]] | None = None,
    ) -> ForwardOutput:
        """Mean cross-entropy over target tokens (and their end token) only; with `transcripts` (token ids of
        what each item says) also the adaptor's CTC loss against them (see `ctc_loss`); with `labels` (each item's
        tag fields) and a voice summary, `summary_loss`. lm=False skips the LLM: only the CTC loss is computed
        (`loss` is then 0 over 0 tokens)."""
        if not lm and transcripts is None:
            raise ValueError("lm=False needs transcripts: there would be no loss at all")
        adaptor_out, adaptor_lens, summary = self._encode(features, feature_lens)
        ctc = greedy = None
        if transcripts is not None:
            ctc_logits = self.ctc_logits(adaptor_out)  # once, for the loss and (in eval mode) the greedy transcripts
            ctc = self.ctc_loss(ctc_logits, adaptor_lens, transcripts)
            greedy = None if self.training else self.ctc_greedy(ctc_logits, adaptor_lens)
        summary_loss = hits = None
        if summary is not None and labels is not None:
            summary_loss = self.summary_loss(summary, labels)
            hits = None if self.training else self.summary_hits(summary, labels)
        if not lm:
            return ForwardOutput(loss=ctc.new_zeros(()), num_tokens=0, ctc_loss=ctc, ctc_greedy=greedy,
                                 summary_loss=summary_loss, summary_hits=hits)
        target_ids = [self.prompts.target_ids(t) if isinstance(t, str) else list(t) for t in targets]
        batch = self.assemble(*self._audio_positions(adaptor_out, adaptor_lens, summary),
                              self._as_prompt_ids(prompts), target_ids)
        base = self.base_llm
        hidden = base.get_decoder()(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state  # (B, L, H)
        # Position t predicts token t+1; only supervised positions go through the (large) output layer.
        shift_labels = batch.labels[:, 1:]
        keep = shift_labels != IGNORE_INDEX
        logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()  # (N, V)
        loss = F.cross_entropy(logits, shift_labels[keep])
        return ForwardOutput(loss=loss, num_tokens=int(keep.sum()), ctc_loss=ctc, ctc_greedy=greedy,
                             summary_loss=summary_loss, summary_hits=hits)

    def tag_vectors(self, field: str) -> torch.Tensor:
        """(C, H): each label of a tag field as the LLM reads its tag (`<male>`): the mean of its tokens' input
        embeddings, detached (a fixed target, even when the LLM's embeddings train)."""
        embed = self.base_llm.get_input_embeddings().weight
        if field not in self._tag_ids:  # tokenised once: the loss asks every step
            self._tag_ids[field] = [self.tokenizer(f"<{label}>", add_special_tokens=False).input_ids
                                    for label in tasks.LABELS[field]]
        rows = [embed[torch.tensor(ids, device=embed.device)].mean(0) for ids in self._tag_ids[field]]
        return torch.stack(rows).detach()

    def summary_loss(self, summary: torch.Tensor, labels: list[dict[str, str]]) -> torch.Tensor | None:
        """Mean cross-entropy over each item's labelled tag fields, the summary position scored against the LLM's
        own embeddings of the field's tags (`tag_vectors`, less their mean, so that what all of a field's tags
        share counts for nothing) by cosine similarity: the position turns towards the words the target will say
        (`<female>`, `<child>`), as the CTC loss pushes each frame towards the word spoken there. Cosine, not the
        dot product, so the scale of the LLM's embeddings does not set how hard the loss can pull. One position
        carries several fields at once: their tags' directions are nearly orthogonal. None when no item has a
        label of a known vocabulary."""
        if len(labels) != summary.shape[0]:
            raise ValueError(f"labels for {len(labels)} items, summary for {summary.shape[0]}")
        total, count = summary.new_zeros((), dtype=torch.float32), 0
        for field in tasks.TAG_FIELDS:
            vocab = tasks.LABELS[field]
            rows = [(i, vocab.index(item[field])) for i, item in enumerate(labels) if item.get(field) in vocab]
            if not rows:
                continue
            index, target = zip(*rows)
            logits = self._summary_logits(summary[list(index)], field)
            total = total + F.cross_entropy(logits, torch.tensor(target, device=logits.device), reduction="sum")
            count += len(rows)
        return total / count if count else None

    @torch.no_grad()
    def summary_hits(self, summary: torch.Tensor, labels: list[dict[str, str]]) -> dict[str, tuple[int, int]]:
        """Per tag field: how many labelled items the summary position's best tag gets right, of how many."""
        fields = [f for f in tasks.TAG_FIELDS if any(item.get(f) in tasks.LABELS[f] for item in labels)]
        guesses = self._read_summary(summary, fields)
        out = {}
        for field in fields:
            pairs = [(item[field], guess[field]) for item, guess in zip(labels, guesses)
                     if item.get(field) in tasks.LABELS[field]]
            out[field] = (sum(label == guess for label, guess in pairs), len(pairs))
        return out

    def _read_summary(self, summary: torch.Tensor, fields: list[str]) -> list[dict[str, str]]:
        """(B, H) summary positions → each item's best-scoring label of each field."""
        out: list[dict[str, str]] = [{} for _ in range(summary.shape[0])]
        for field in fields:
            for row, best in zip(out, self._summary_logits(summary, field).argmax(-1).tolist()):
                row[field] = tasks.LABELS[field][best]
        return out

    def _summary_logits(self, summary: torch.Tensor, field: str) -> torch.Tensor:
        """(N, H) summary positions → (N, C) scores of the field's labels (see `summary_loss`)."""
        tags = self.tag_vectors(field).float()
        tags = F.normalize(tags - tags.mean(0), dim=-1)
        return SUMMARY_SCALE * F.normalize(summary.float(), dim=-1) @ tags.T

    @torch.no_grad()
    def summary_labels(self, features: torch.Tensor, feature_lens: torch.Tensor,
                       fields: list[str], encoded: Encoded | None = None) -> list[dict[str, str]]:
        """Each item's label of each field read off the voice summary position alone (the best-scoring tag, as
        `summary_loss` trains it), the way Whisper reads the language off one step's language-token logits; a
        field with a fitted head (adaptor.tag_heads) is read off its head, the located field (adaptor.located_head)
        off statistics pooled where its locator hears the sound. `encoded`: this batch's `encode`."""
        if self.summary is None:
            raise ValueError("this model has no voice summary to read labels from (model.adaptor.summary_layers)")
        if encoded is not None:
            stats, summary, located = encoded.stats, encoded.summary, encoded.located
        else:  # the encoder's blocks alone: no adaptor pass
            _, lens, hidden = self.encoder.forward_layers(features, feature_lens, self.summary.layers)
            summary, stats, located = self._summarise(hidden, lens)
        out = self._read_summary(summary, [f for f in fields if f not in self.summary.heads])
        for field in fields:
            if field in self.summary.heads:
                read = located if field == self.config.adaptor.located_head else stats
                for row, best in zip(out, self.summary.head_scores(read, field).argmax(-1).tolist()):
                    row[field] = tasks.LABELS[field][best]
        return out

    @torch.no_grad()
    def summary_probs(self, features: torch.Tensor, feature_lens: torch.Tensor, field: str) -> torch.Tensor:
        """(B, C) the voice summary position's probabilities over the field's labels (tasks.LABELS order), from
        the encoder alone: the scores `summary_labels` reads where the field has no fitted head."""
        if self.summary is None:
            raise ValueError("this model has no voice summary (model.adaptor.summary_layers)")
        _, lens, hidden = self.encoder.forward_layers(features, feature_lens, self.summary.layers)
        # the pooled statistics alone: `_summarise` would also run the event locator's crop, unused here
        summary = self.summary.project(self.summary.pool(hidden, lens))
        return self._summary_logits(summary, field).float().softmax(-1)

    @torch.no_grad()
    def summary_stats(self, features: torch.Tensor, feature_lens: torch.Tensor, located: bool = False
                      ) -> torch.Tensor:
        """(B, stats_dim) the voice summary's pooled statistics of each item (VoiceSummary.pool), from the
        encoder alone; `located`: the located head's, (B, located_dim) (`located_stats`)."""
        if self.summary is None:
            raise ValueError("this model has no voice summary (model.adaptor.summary_layers)")
        _, encoder_lens, hidden = self.encoder.forward_layers(features, feature_lens, self.summary.layers)
        return self.located_stats(hidden, encoder_lens) if located else self.summary.pool(hidden, encoder_lens)

    @property
    def seconds_per_position(self) -> float:
        """Audio seconds per adaptor position: the encoder halves the mel frame rate, each conv divides it."""
        return 2 * math.prod(self.adaptor.strides) / FRAMES_PER_SECOND

    @torch.no_grad()
    def word_times(self, features: torch.Tensor, feature_lens: torch.Tensor, transcripts: list[str],
                   offsets: list[float] | tuple[float, float] = (0.0, 0.0),
                   encoded: Encoded | None = None) -> list[list[tasks.Word] | None]:
        """Each item's transcript as words with time spans (seconds) from the adaptor's CTC scores
        (model.align.align_words), for a model trained with ctc_weight > 0; None for an item whose transcript
        has more tokens than its audio has positions. `encoded`: this batch's `encode` already done."""
        if len(transcripts) != features.shape[0]:
            raise ValueError(f"{len(transcripts)} transcripts for {features.shape[0]} audio items")
        enc = encoded if encoded is not None else self.encode(features, feature_lens)
        adaptor_out, adaptor_lens = enc.adaptor_out, enc.adaptor_lens
        log_probs = self.ctc_logits(adaptor_out).float().log_softmax(-1).cpu()
        return [
            align_words(lp[:n], text, self.tokenizer, self.ctc_blank_id, self.seconds_per_position, offsets,
                        duration=int(frames) / FRAMES_PER_SECOND)
            for lp, n, frames, text in zip(log_probs, adaptor_lens.tolist(), feature_lens.tolist(), transcripts)
        ]

    @property
    def ctc_blank_id(self) -> int:
        """The token whose embedding scores CTC's blank: a special token no transcript contains."""
        t = self.tokenizer
        for token_id in (t.unk_token_id, t.pad_token_id, t.eos_token_id):
            if token_id is not None:
                return token_id
        raise ValueError("the tokenizer has no unk, pad or eos token to stand for CTC's blank")

    def ctc_logits(self, adaptor_out: torch.Tensor) -> torch.Tensor:
        """adaptor_out (B, S, H) → CTC logits (B, S, V): each position scored against the LLM's input embeddings."""
        embed = self.base_llm.get_input_embeddings().weight  # (V, H)
        return adaptor_out.to(embed.dtype) @ embed.T

    def ctc_loss(self, ctc_logits: torch.Tensor, adaptor_lens: torch.Tensor,
                 transcripts: list[list[int]]) -> torch.Tensor:
        """CTC of each item's adaptor output against its transcript, scored through the LLM's own input embeddings.

        A frozen LLM reads the adaptor's output as if it were token embeddings; this loss asks each speech
        position to lie closest to the embedding of the token spoken there (or of the blank token), a direct,
        per-position signal that aligns the adaptor far sooner than the LLM's loss alone. Items with no
        transcript, or one longer than CTC can fit into their positions, are left out; the sum is divided by
        the transcript tokens scored.
        """
        lens = adaptor_lens.tolist()
        keep = [i for i, t in enumerate(transcripts) if t and len(t) + _repeats(t) <= lens[i]]
        if not keep:
            return ctc_logits.sum() * 0.0  # keeps the graph connected for DDP
        log_probs = ctc_logits[keep].float().log_softmax(-1).transpose(0, 1)  # (S, B', V)
        targets = torch.tensor([tok for i in keep for tok in transcripts[i]], dtype=torch.long, device=self.device)
        target_lens = torch.tensor([len(transcripts[i]) for i in keep], dtype=torch.long)
        total = F.ctc_loss(log_probs, targets, torch.tensor([lens[i] for i in keep]), target_lens,
                           blank=self.ctc_blank_id, reduction="sum", zero_infinity=True)
        return total / target_lens.sum()

    @torch.no_grad()
    def ctc_greedy(self, ctc_logits: torch.Tensor, adaptor_lens: torch.Tensor) -> list[list[int]]:
        """Each item's best CTC path, repeats merged and blanks dropped: the words the adaptor's output already
        spells out (a direct view of how far its alignment has come)."""
        blank, out = self.ctc_blank_id, []
        for path, n in zip(ctc_logits.argmax(-1).tolist(), adaptor_lens.tolist()):
            path = path[:n]
            out.append([t for i, t in enumerate(path) if t != blank and (i == 0 or t != path[i - 1])])
        return out

    # ---- inference ----------------------------------------------------------------------------

    def stop_ids(self, gen: GenerationConfig) -> list[int]:
        ids = list(self.prompts.stop_ids)
        for token in gen.stop_tokens:
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == self.tokenizer.unk_token_id:
                raise ValueError(f"generation.stop_tokens: {token!r} is not a single token of this tokenizer")
            ids.append(token_id)
        return sorted(set(ids))

    def hf_generation_config(self, gen: GenerationConfig) -> HFGenerationConfig:
        kwargs = dict(
            max_new_tokens=gen.max_new_tokens,
            num_beams=gen.num_beams,
            do_sample=gen.do_sample,
            length_penalty=gen.length_penalty,
            eos_token_id=self.stop_ids(gen),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
        return HFGenerationConfig(**kwargs)

    @torch.no_grad()
    def generate_ids(
        self,
        features: torch.Tensor,
        feature_lens: torch.Tensor,
        prompts: list[str] | list[PromptIds],
        generation: GenerationConfig | None = None,
        streamer: BaseStreamer | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        encoded: Encoded | None = None,
        specs: list[tasks.TaskSpec | None] | None = None,
    ) -> list[list[int]]:
        """Batched generation with KV cache; returns each item's new token ids, stop token excluded.

        `streamer` receives each step's new tokens (B,) (HF streamer protocol; not with beam search) and
        `stopping_criteria` may end rows early (a server cancels a disconnected client's row this way).
        `encoded`: this batch's `encode` already done. `specs`: each item's task (None: a free instruction; the
        list None: all free), which shapes its decoding: a transcript that opens the output
        (TaskSpec.opens_with_transcript) is decoded jointly with the CTC head by generation.ctc_weight; one that
        tags or an answer follow (TaskSpec.continues_after_transcript) may not end the output; and with
        generation.constrain_tags, what follows it (an only-X output: all of it) keeps to the task's
        tasks.tag_grammar.
        """
        gen = generation or self.config.generation
        if gen.seed is not None:
            torch.manual_seed(gen.seed)
        enc = encoded if encoded is not None else self.encode(features, feature_lens)
        adaptor_out, adaptor_lens = self.embed_audio(features, feature_lens, enc)
        batch = self.assemble(adaptor_out, adaptor_lens, self._as_prompt_ids(prompts))
        processors = [RepetitionPenalty(gen.repetition_penalty)] if gen.repetition_penalty != 1.0 else []
        specs = [None] * len(prompts) if specs is None else list(specs)
        if len(specs) != len(prompts):
            raise ValueError(f"{len(specs)} task specs for {len(prompts)} items")
        transcribing = [s is not None and s.opens_with_transcript for s in specs]
        continuing = [s is not None and s.continues_after_transcript for s in specs]
        stops = self.stop_ids(gen)
        enders = [t for t in self._end_tokens() if t not in stops]
        grammars = [tasks.tag_grammar(s) if s is not None else None for s in specs]
        if gen.constrain_tags and any(grammars):
            # Before NoStopInTranscript: the closer it puts in a stop's place is then one the grammar allows.
            processors.append(TagGrammarScores(grammars, [s is not None and s.only for s in specs],
                                               self.token_texts(), self.tag_pieces(), enders, stops,
                                               gen.num_beams))
        if any(continuing):
            closers = [t for t in self.transcript_closers() if t not in stops]
            processors.append(NoStopInTranscript(torch.tensor(continuing), stops, enders, closers, gen.num_beams))
        if gen.ctc_weight > 0 and any(transcribing):
            # Last: it rules out every token but the candidates it scores.
            processors.append(self._ctc_joint(enc, transcribing, gen))
        out = self.base_llm.generate(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            generation_config=self.hf_generation_config(gen),
            logits_processor=LogitsProcessorList(processors),
            streamer=streamer,
            stopping_criteria=stopping_criteria,
        )
        stops = set(self.stop_ids(gen))
        results = []
        for row in out.tolist():
            ids = []
            for t in row:
                if t in stops:
                    break
                ids.append(t)
            results.append(ids)
        return results

    def _ctc_joint(self, enc: Encoded, transcribing: list[bool], gen: GenerationConfig) -> CTCJointScores:
        # The CTC head's scores (ctc_logits), formed only for the candidates the LLM proposes.
        embed = self.base_llm.get_input_embeddings().weight
        weights = torch.tensor([gen.ctc_weight if t else 0.0 for t in transcribing])
        scorer = CTCPrefixScorer(enc.adaptor_out.to(embed.dtype), embed, enc.adaptor_lens, self.ctc_blank_id,
                                 needed=weights > 0)
        return CTCJointScores(scorer, weights, self.transcript_enders(gen), gen.ctc_candidates, gen.num_beams)

    def transcript_enders(self, gen: GenerationConfig) -> list[int]:
        """The tokens that close a transcript: the stop tokens and every token holding tasks.TRANSCRIPT_END (a
        tag or sttc's answer opens there; BPE merges it with the punctuation before it, as in ".<"), the CTC blank
        excepted (a transcript cannot hold it)."""
        return sorted({*self.stop_ids(gen), *self._end_tokens()})

    def _end_tokens(self) -> list[int]:
        """Every token holding tasks.TRANSCRIPT_END but the CTC blank, found once."""
        if self._enders is None:
            tokens = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self._enders = [i for i, tok in enumerate(tokens)
                            if i != self.ctc_blank_id and tok is not None and tasks.TRANSCRIPT_END in tok]
        return self._enders

    def transcript_closers(self) -> list[int]:
        """The transcript enders a tag or sttc's answer can open with (tasks.opens_what_follows): plain text such
        as ".<", never "</" or "<=", which begin nothing a parse reads, nor an added token (chat-template, tool and
        code markers such as `<|im_start|>`), which decoding may skip, losing what follows."""
        if self._closers is None:
            added = set(self.tokenizer.added_tokens_decoder)
            self._closers = [t for t in self._end_tokens()
                             if t not in added and tasks.opens_what_follows(self.tokenizer.decode([t]))]
        return self._closers

    def token_texts(self) -> list[str]:
        """Each token id's text alone, found once; an added token's is "" (none is part of a tag)."""
        if self._texts is None:
            added = set(self.tokenizer.added_tokens_decoder)
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._texts = ["" if i in added else text for i, text in enumerate(texts)]
        return self._texts

    def tag_pieces(self) -> dict[str, list[int]]:
        """The plain tokens that can be part of a tag or sttc's separator (every character in tasks.OPENINGS),
        by text: what TagGrammarScores looks a grammar's continuations up in. Found once."""
        if self._tag_pieces is None:
            alphabet = set("".join(tasks.OPENINGS))
            pieces: dict[str, list[int]] = {}
            for i, text in enumerate(self.token_texts()):
                if text and set(text) <= alphabet:
                    pieces.setdefault(text, []).append(i)
            self._tag_pieces = pieces
        return self._tag_pieces

    def generate(
        self,
        features: torch.Tensor,
        feature_lens: torch.Tensor,
        prompts: list[str] | list[PromptIds],
        generation: GenerationConfig | None = None,
        encoded: Encoded | None = None,
        specs: list[tasks.TaskSpec | None] | None = None,
    ) -> list[str]:
        ids = self.generate_ids(features, feature_lens, prompts, generation, encoded=encoded, specs=specs)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def understand(self, audio, task: str = "asr", prompt: str | None = None) -> dict:
        """One file or waveform → parsed result dict (see `osum.infer.engine.Engine`)."""
        # Imported here: the engine is a layer above the model and must stay out of its import graph.
        from osum.infer.engine import Engine

        return Engine(self).run([audio], task=task, prompt=prompt)[0]

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


class RepetitionPenalty(LogitsProcessor):
    """CTRL's repetition penalty on every token generated so far (the prompt and audio are embeddings, not ids).

    transformers' own processor skips, in each row, as many generated tokens as that row has left padding (it
    takes input_ids to hold the prompt, which with inputs_embeds they do not), so a row in a padded batch would
    be penalised differently from the same row alone.
    """

    def __init__(self, penalty: float):
        if not penalty > 0:
            raise ValueError(f"generation.repetition_penalty must be positive, got {penalty}")
        self.penalty = penalty

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] == 0:
            return scores
        seen = scores.gather(1, input_ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, input_ids, seen)


class NoStopInTranscript(LogitsProcessor):
    """In the rows of items whose transcript must be followed by more (asr+tags: the tags; sttc: the answer), a stop
    while the transcript is open (no token of `enders`, those holding tasks.TRANSCRIPT_END, written yet) becomes
    the likeliest of `closers` (the enders that open a tag or answer) instead: its score rises to the best stop
    token's and the stop tokens are ruled out. A model that partly reads the task from the audio otherwise ends a
    question or sentence where its asr outputs end, and the answer or tags are lost; ruling the stop out alone
    makes it go on with words that were not said. Where it stops, the transcript ends, and it goes on to what
    follows. Rows are items × beams, in item order.
    """

    def __init__(self, items: torch.Tensor, stops: list[int], enders: list[int], closers: list[int],
                 num_beams: int = 1):
        if not set(closers) <= set(enders):
            raise ValueError(f"closers {sorted(set(closers) - set(enders))} are not among the enders")
        if not closers:
            raise ValueError("no token closes a transcript: the tokenizer has no plain-text token that opens a "
                             f"tag or answer with {tasks.TRANSCRIPT_END!r}")
        if not stops:
            raise ValueError("no stop tokens to rule out")
        self.items, self.num_beams = items.bool(), num_beams
        self.stops = torch.tensor(stops, dtype=torch.long)
        self.enders = torch.tensor(enders, dtype=torch.long)
        self.closers = torch.tensor(closers, dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        device = scores.device
        stops, closers = self.stops.to(device), self.closers.to(device)
        rows = torch.arange(input_ids.shape[0], device=device) // self.num_beams
        open_ = (self.items.to(device)[rows] & ~torch.isin(input_ids, self.enders.to(device)).any(1)).nonzero()[:, 0]
        if not len(open_):
            return scores
        scores = scores.clone()
        best, at = scores[open_][:, closers].max(-1)
        stop = scores[open_][:, stops].max(-1).values
        scores[open_, closers[at]] = torch.maximum(best, stop)
        scores[open_[:, None], stops[None, :]] = -float("inf")
        return scores


class TagGrammarScores(LogitsProcessor):
    """Holds each row whose item has a tasks.TagGrammar to it. While its transcript is open (no token of `enders`
    written yet), the enders that cannot begin what the grammar allows are ruled out (`</`, `<1`, `<|im_start|>`);
    from the '<' of the one written on (an only-X item: from its first token), only the tokens whose text keeps
    the output within the grammar remain: the task's own labels, in order, then only the stop tokens; for sttc,
    the answer separator, then anything. The LLM's scores choose among what remains, so the likeliest well-formed
    label wins. A row the grammar cannot continue (a tokenizer without the pieces) is left as it is. Rows are
    items × beams, in item order.
    """

    def __init__(self, grammars: list[tasks.TagGrammar | None], from_start: list[bool], texts: list[str],
                 pieces: dict[str, list[int]], enders: list[int], stops: list[int], num_beams: int = 1):
        if len(from_start) != len(grammars):
            raise ValueError(f"{len(from_start)} from_start flags for {len(grammars)} grammars")
        if not stops:
            raise ValueError("no stop tokens: a complete output could not end")
        self.grammars, self.from_start, self.num_beams = grammars, from_start, num_beams
        self.texts, self.pieces, self.stops = texts, pieces, list(stops)
        self.enders = set(enders)
        self.max_len = max((len(p) for p in pieces), default=0)
        # each grammar's enders that cannot begin it, as an index tensor on the scores' device (made once, not per
        # step): every open transcript's row masks them
        self._ruled: dict[tuple[tasks.TagGrammar, torch.device], torch.Tensor] = {}
        self._starting: dict[str, list[int]] = {}  # tokens whose text begins with a string (free_after)

    def _ruled_enders(self, grammar: tasks.TagGrammar, device: torch.device) -> torch.Tensor:
        if (grammar, device) not in self._ruled:
            ruled = []
            for t in self.enders:
                head, end, rest = self.texts[t].partition(tasks.TRANSCRIPT_END)  # an added token's text is ""
                if not end or ">" in head or grammar.state(end + rest) is None:
                    ruled.append(t)
            self._ruled[grammar, device] = torch.tensor(sorted(ruled), dtype=torch.long, device=device)
        return self._ruled[grammar, device]

    def _starting_with(self, text: str) -> list[int]:
        if text not in self._starting:
            self._starting[text] = [i for i, t in enumerate(self.texts) if t.startswith(text)]
        return self._starting[text]

    def _allowed(self, grammar: tasks.TagGrammar, written: str) -> list[int] | None:
        """The tokens that may follow `written` (the output from the grammar's start); None: any token."""
        if grammar.state(written) is None:
            return None
        if grammar.complete(written):
            return None if grammar.free_after else self.stops
        more, filling = grammar.continuations(written, self.max_len)
        allowed = {i for text in more for i in self.pieces.get(text, ())}
        allowed.update(i for text in filling for i in self._starting_with(text))
        return sorted(allowed) or None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = None
        for row, ids in enumerate(input_ids.tolist()):
            grammar = self.grammars[row // self.num_beams]
            if grammar is None:
                continue
            if self.from_start[row // self.num_beams]:
                written = "".join(self.texts[t] for t in ids)
            else:
                at = next((k for k, t in enumerate(ids) if t in self.enders), None)
                if at is None:
                    ruled = self._ruled_enders(grammar, scores.device)
                    if len(ruled):
                        out = scores.clone() if out is None else out
                        out[row, ruled] = -float("inf")
                    continue
                head = self.texts[ids[at]]
                written = head[head.find(tasks.TRANSCRIPT_END):] + "".join(self.texts[t] for t in ids[at + 1:])
            allowed = self._allowed(grammar, written)
            if allowed is None:
                continue
            out = scores.clone() if out is None else out
            keep = out[row, allowed]
            out[row] = -float("inf")
            out[row, allowed] = keep
        return scores if out is None else out


def _repeats(tokens: list[int]) -> int:
    """Adjacent equal tokens: CTC needs a blank between them, so one extra position each."""
    return sum(a == b for a, b in zip(tokens, tokens[1:]))
