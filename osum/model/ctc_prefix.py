"""Joint CTC/LLM decoding: the adaptor's CTC scores weigh in on every transcript token the LLM writes.

The LLM alone may write what it expects rather than what was said (on unfamiliar speech it rewrites). Hybrid
CTC/attention decoding (Watanabe et al., 2017, as in ESPnet and WeNet) scores each candidate next token by a
weighted sum of the LLM's log-probability and the CTC *prefix* score's increase: the log-probability, under the
CTC head, that the transcript begins with the prefix extended by that token. Only the LLM's top candidates are
scored (CTC over the whole vocabulary would cost a vocabulary-sized recursion per step); every other token is
ruled out, so the LLM still proposes and CTC chooses among its proposals. Scores telescope: over a finished
transcript the CTC increases sum to its full CTC log-likelihood, which makes the weighted scores beam-searchable.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

# A finite stand-in for log(0): differences of two impossible prefixes stay finite (inf - inf would be NaN).
NEG = -1e30


class CTCPrefixScorer:
    """CTC prefix scores over one batch's audio, extended one token at a time.

    The CTC log-probabilities are log_softmax(frames @ table.T): frames (B, T, D) are the batch's CTC positions and
    table (V, D) scores each vocabulary entry (the LLM's input embeddings, for osum's CTC head). Only the columns
    of the candidates scored are ever formed, with each position's normaliser computed once, so memory stays
    (B, T) rather than (B, T, V). lens (B,) are each item's valid positions. A prefix's state is (T, 2): the
    log-probabilities that the first t+1 positions spell the prefix and end in a token (column 0) or in the blank
    (column 1). Beyond an item's length the blank is certain and every token impossible, so the states carry over
    unchanged and one loop over the longest item serves every item. `needed` (B,) marks the items that will be
    scored (default all): the normaliser, a vocabulary-sized product per position, is formed for those alone.
    """

    def __init__(self, frames: torch.Tensor, table: torch.Tensor, lens: torch.Tensor, blank: int,
                 needed: torch.Tensor | None = None):
        if frames.dim() != 3 or table.dim() != 2 or frames.shape[-1] != table.shape[-1] or lens.shape != frames.shape[:1]:
            raise ValueError(f"frames must be (B, T, D), table (V, D) and lens (B,), got {tuple(frames.shape)}, "
                             f"{tuple(table.shape)} and {tuple(lens.shape)}")
        if int(lens.min()) < 1:
            raise ValueError("every item needs at least one CTC position")
        self.frames, self.table, self.blank = frames.detach().float(), table.detach(), blank
        self.pad = torch.arange(frames.shape[1], device=frames.device)[None, :] >= lens.to(frames.device)[:, None]
        # Each position's log-normaliser, one item at a time: (T, V) at most is formed at once. Items not needed
        # get zeros, which nothing reads.
        needed = [True] * len(lens) if needed is None else needed.tolist()
        table_t = self.table.T.float()  # converted once, not per item (a copy when the LLM runs in bf16)
        self.lse = torch.stack([(f @ table_t).logsumexp(-1) if n else f.new_zeros(f.shape[0])
                                for f, n in zip(self.frames, needed)])  # (B, T)
        items = torch.arange(len(lens), device=frames.device)
        blank_lp = self._columns(items, torch.full((len(lens), 1), blank, device=frames.device))[..., 0]
        self.blank_lp = blank_lp.masked_fill(self.pad, 0.0)  # (B, T)

    def _columns(self, items: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log-probabilities (R, T, K) of tokens (R, K) at every position of the rows' items (R,)."""
        logits = torch.bmm(self.frames[items], self.table[tokens].float().transpose(1, 2))  # (R, T, K)
        lp = (logits - self.lse[items][..., None]).clamp(min=NEG)
        return lp.masked_fill(self.pad[items][..., None], NEG)

    def initial(self, items: torch.Tensor) -> torch.Tensor:
        """States (R, T, 2) of the empty prefix for rows reading `items` (R,): blanks only so far."""
        blank = self.blank_lp[items].cumsum(-1)  # (R, T)
        return torch.stack([torch.full_like(blank, NEG), blank], dim=-1)

    def end(self, states: torch.Tensor) -> torch.Tensor:
        """(R,) log-probability that the transcript is exactly the prefix: every position consumed."""
        return states[:, -1].logsumexp(-1)

    def extend(self, items: torch.Tensor, states: torch.Tensor, last: torch.Tensor,
               candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Extend each row's prefix by each of its candidate tokens.

        items (R,) the item each row reads; states (R, T, 2) its prefix's states; last (R,) the prefix's last token
        (-1 for the empty prefix); candidates (R, K). Returns the extended prefixes' scores (R, K) and states
        (R, K, T, 2).
        """
        xc = self._columns(items, candidates)  # (R, T, K)
        xb = self.blank_lp[items]  # (R, T)
        T = xc.shape[1]
        prev = states.logsumexp(-1)  # (R, T): the prefix spelled by position t, either ending
        # A token equal to the prefix's last one needs a blank between them to count again.
        repeat = candidates == last[:, None]  # (R, K)
        phi = torch.where(repeat[:, None, :], states[:, :, 1:2], prev[:, :, None])  # (R, T, K)
        # The first position may spell the candidate only when the prefix is empty.
        first = torch.where((last < 0)[:, None], xc[:, 0], torch.full_like(xc[:, 0], NEG))  # (R, K)
        entered = phi[:, :-1] + xc[:, 1:]  # (R, T - 1, K): the candidate's first position is t = 1, 2, ...
        r_tok, r_blank = [first], [torch.full_like(first, NEG)]
        for t in range(1, T):
            r_tok.append(torch.logaddexp(r_tok[-1] + xc[:, t], entered[:, t - 1]))
            r_blank.append(torch.logaddexp(r_blank[-1], r_tok[-2]) + xb[:, t, None])
        new = torch.stack([torch.stack(r_tok, -1), torch.stack(r_blank, -1)], -1)  # (R, K, T, 2)
        # The prefix score sums over where the candidate begins; the blank is no token of a transcript.
        score = torch.cat([first[:, None], entered], 1).logsumexp(1).masked_fill(candidates == self.blank, NEG)
        return score.clamp(min=NEG), new.clamp(min=NEG)


class CTCJointScores(LogitsProcessor):
    """Rescores the LLM's next-token candidates with the CTC prefix scores (the last processor in the list).

    Rows are items × beams, in item order (transformers' layout); `weights` (B,) gives each item's CTC weight
    (0 leaves the item's rows to the LLM alone: a batch may mix a transcript task with others). `enders` are the
    tokens that close the transcript (the stop tokens; osum's tags and sttc answer open with one too): a row
    whose prefix holds one is past its transcript and left to the LLM. Each row's next score for candidate c is
    (1 - w) * log p_LLM(c) + w * (psi(prefix + c) - psi(prefix)); an ender's CTC part is the prefix's end score.
    Tokens outside the LLM's top `candidates` are ruled out.
    """

    def __init__(self, scorer: CTCPrefixScorer, weights: torch.Tensor, enders: list[int], candidates: int,
                 num_beams: int = 1):
        if candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {candidates}")
        device = scorer.frames.device  # the model's, as are the scores and ids transformers passes
        self.scorer, self.num_beams, self.k = scorer, num_beams, candidates
        self.weights = weights.float().to(device)
        self.enders = torch.tensor(sorted(enders), device=device)
        # (item, prefix) → (state (T, 2), psi): last step's extensions, the rows' prefixes of this step.
        self.cache: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}

    def _state(self, item: int, prefix: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """A prefix's state and score: from the cache, else replayed from the empty prefix (a row whose last
        token was not among the candidates scored, which the mask below rules out but a later processor may not)."""
        if (item, prefix) in self.cache:
            return self.cache[(item, prefix)]
        device = self.weights.device
        items = torch.tensor([item], device=device)
        state, psi = self.scorer.initial(items), torch.zeros((), device=device)
        for i, token in enumerate(prefix):
            last = torch.tensor([prefix[i - 1] if i else -1], device=device)
            scores, states = self.scorer.extend(items, state, last, torch.tensor([[token]], device=device))
            state, psi = states[:, 0], scores[0, 0]
        return state[0], psi

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        device = self.weights.device
        input_ids = input_ids.to(device)
        rows = torch.arange(input_ids.shape[0], device=device)
        items = rows // self.num_beams
        weights = self.weights[items]
        done = torch.isin(input_ids, self.enders).any(1)
        active = rows[(weights > 0) & ~done]
        if not len(active):
            return scores
        top = scores.to(device).float().log_softmax(-1)[active].topk(min(self.k, scores.shape[-1]), dim=-1)
        cands = top.indices  # (A, K)
        prefixes = [tuple(input_ids[r].tolist()) for r in active.tolist()]
        known = [self._state(int(items[r]), p) for r, p in zip(active.tolist(), prefixes)]
        states = torch.stack([s for s, _ in known])
        psi = torch.stack([p for _, p in known])
        last = torch.tensor([p[-1] if p else -1 for p in prefixes], device=device)
        ext_scores, ext_states = self.scorer.extend(items[active], states, last, cands)
        ext_scores = torch.where(torch.isin(cands, self.enders), self.scorer.end(states)[:, None], ext_scores)
        w = weights[active][:, None]
        joint = (1 - w) * top.values + w * (ext_scores - psi[:, None])
        self.cache = {}
        for j, (r, prefix) in enumerate(zip(active.tolist(), prefixes)):
            for k, token in enumerate(cands[j].tolist()):
                self.cache[(int(items[r]), prefix + (token,))] = (ext_states[j, k], ext_scores[j, k])
        out = scores.clone()
        at = active.to(out.device)
        out[at] = torch.finfo(out.dtype).min
        out[at[:, None], cands.to(out.device)] = joint.to(device=out.device, dtype=out.dtype)
        return out
