"""`seqrec recommend`: top-K items for histories of ORIGINAL item ids, from an exported model.

Loads only safe formats: the weights from safetensors (a directory without them is refused).
Each history (most recent `max_len - 1` items kept) gets a mask token appended (next-item models,
`query: last_item` in seqrec_items.json: scored at the last item), is encoded by the plain
`BertForMaskedLM` (with position ids counted back from the tail where the model was trained so,
`positions` in seqrec_items.json), and its MLM logits at the item tokens rank the full catalogue;
history items are excluded unless asked otherwise. With `query: mask_and_previous` the scored
state is the mask token's last hidden state plus the one of the position before it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM

from seqrec.errors import InputError
from seqrec.hf_files import open_model_directory, quiet_transformers, read_model_items
from seqrec.masking import tail_positions
from seqrec.model import MASK_ITEM, ItemVocabulary, SeqRecModel, position_ids_for, scored_states
from seqrec.runtime import attention_kernel, resolve_device

log = logging.getLogger(__name__)


@dataclass
class Recommendation:
    item: str
    title: str
    score: float


class Recommender:
    def __init__(self, model_dir: Path, device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None):
        model_dir, meta = open_model_directory(model_dir)
        self.device = resolve_device(str(device), "--device")
        with quiet_transformers():
            self.model = AutoModelForMaskedLM.from_pretrained(model_dir, use_safetensors=True).to(self.device).eval()
        # The kernel training picks on this device, so a run's own test evaluation and this one
        # compute the same scores (transformers' default would be sdpa).
        self.model.set_attn_implementation(attention_kernel("auto", self.device))
        self.causal = meta["attention"] == "causal"
        self.autocast_dtype = autocast_dtype
        self.first_token = int(meta["first_item_token"])
        self.num_items = int(meta["num_items"])
        self.next_item = meta["query"] == "last_item"
        self.add_previous = meta["query"] == "mask_and_previous"
        self.direct_head = meta["head"] == "direct"
        self.position_scheme = meta["positions"]
        self.max_len = min(int(meta.get("max_len") or self.model.config.max_position_embeddings), self.model.config.max_position_embeddings)
        self.tokenizer = _tokenizer(model_dir)
        self.mask_token = int(self.tokenizer.mask_token_id)
        self.original_ids, self.titles = read_model_items(model_dir, self.num_items)
        self.index = {original: item for item, original in enumerate(self.original_ids, start=1)}

    def seqrec_model(self) -> SeqRecModel:
        """These weights (shared, not copied) as the training code's model, which the evaluator
        that shards the catalogue across ranks takes."""
        vocab = ItemVocabulary(self.num_items, self.first_token, int(self.tokenizer.pad_token_id), self.mask_token)
        query = "mask_and_previous" if self.add_previous else "mask"
        return SeqRecModel(
            self.model, self.tokenizer, vocab, causal=self.causal, positions=self.position_scheme, next_item=self.next_item,
            item_head="direct" if self.direct_head else "transform", query=query,
        ).eval()

    def to_items(self, history: list[str], where: str, skip_unknown: bool) -> list[int]:
        unknown = [item for item in history if item not in self.index]
        if unknown and not skip_unknown:
            raise InputError(where, f"unknown item ids {sorted(set(unknown))[:20]} (pass --skip-unknown to drop them)")
        if unknown:
            log.warning("%s: dropped unknown item ids %s", where, sorted(set(unknown))[:20])
        return [self.index[item] for item in history if item in self.index]

    @torch.no_grad()
    def scores(self, items: torch.Tensor) -> torch.Tensor:
        """Scores over the whole catalogue [B, N] (float32) for right-padded rows of 1-based item
        ids [B, L] (0 = pad), each ending in MASK_ITEM unless the model is a next-item one, as
        `seqrec.evaluate.history_batches` builds them: the row's last entry is scored."""
        items = items.to(self.device)
        tokens = torch.where(items > 0, items + (self.first_token - 1), 0)
        tokens = torch.where(items == MASK_ITEM, self.mask_token, tokens)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            hidden = self.model.bert(
                input_ids=tokens, attention_mask=(tokens != 0).long(), position_ids=position_ids_for(self.position_scheme, tokens)
            ).last_hidden_state
            rows = torch.arange(len(tokens), device=self.device)
            gathered = scored_states(hidden, rows * hidden.shape[1] + tail_positions(tokens), self.add_previous)
            item_tokens = slice(self.first_token, self.first_token + self.num_items)
            if self.direct_head:
                # The export's pass-through transform holds only for a final LayerNorm's output,
                # which a sum of two states is not; the direct head never needs it anyway.
                head = self.model.cls.predictions
                return torch.nn.functional.linear(gathered, head.decoder.weight[item_tokens], head.bias[item_tokens]).float()
            return self.model.cls.predictions(gathered)[:, item_tokens].float()

    def recommend(self, histories: list[list[int]], k: int, exclude_history: bool = True) -> list[list[Recommendation]]:
        keep = self.max_len if self.next_item else self.max_len - 1
        rows = [history[-keep:] + ([] if self.next_item else [MASK_ITEM]) for history in histories]
        items = torch.zeros(len(rows), max(1, max(len(row) for row in rows)), dtype=torch.long)
        for index, row in enumerate(rows):
            items[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        scores = self.scores(items)
        if exclude_history:
            for index, history in enumerate(histories):
                if history:
                    scores[index, torch.tensor(history, device=self.device) - 1] = float("-inf")
        top = torch.topk(scores, min(k, self.num_items), dim=1)
        return [
            [Recommendation(self.original_ids[item], self.titles[item], float(score))
             for score, item in zip(values.tolist(), items.tolist()) if score != float("-inf")]
            for values, items in zip(top.values, top.indices)
        ]


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
