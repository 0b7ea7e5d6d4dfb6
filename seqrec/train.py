"""The training loop: stream each rank's shards, mask on the device, step the DeepSpeed engine,
checkpoint, validate, stop early, test.

The same loop runs as one plain process or as one rank of many (deepspeed, torchrun, srun).
Every rank takes the same number of optimiser steps per epoch: before each step the ranks agree
(over a CPU group) that all of them still have a full step of micro-batches; the first rank to
run dry ends the epoch for all, and the surplus of the others is reported, not silently trained on.
The same agreement carries stop signals (seqrec.stop_signals): all ranks stop before one step.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import monotonic

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save

from seqrec import checkpoint, distributed, progress, universal
from seqrec.atomic import atomic_file
from seqrec.config import JobConfig
from seqrec.data.prepared import ITEMS_FILE, PreparedDataset
from seqrec.data.split import MIN_EVAL_LENGTH
from seqrec.data.stream import StreamOptions, batches_per_rank, sequence_loader
from seqrec.distributed import DistInfo
from seqrec.ema import WeightAverage
from seqrec.divergence import DivergenceWatch
from seqrec.errors import ConfigError, TrainingDiverged, TrainingStopped
from seqrec.engine import BatchPlan, TrainingEngine, plan_batches
from seqrec.evaluate import evaluate_model, format_table, popularity_baseline
from seqrec.hf_files import RUN_MODEL_DIR
from seqrec.losses import LossParts, LossWeights, MaskedItemObjective
from seqrec.model import build_model
from seqrec.optim import planned_total_steps
from seqrec.runtime import autocast_dtype, keep_freed_host_memory, peak_memory_mb, require_compile_toolchain
from seqrec.stop_signals import StopSignals, held_back
from seqrec.tracking import Tracker
from seqrec.universal import PARAMETERS

log = logging.getLogger(__name__)

EARLY_STOP_METRIC = "NDCG@10"
BEST_WEIGHTS = "best_weights.safetensors"


def _clock() -> float:
    """Seconds on a clock that only moves forward (the checkpoint period's)."""
    return monotonic()


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict


@dataclass
class EpochEnd:
    """How `_train_epoch` ended: its steps done (each rank's leftover micro-batches, or None when
    the step budget ended it first), or a stop the ranks agreed on before its next step."""

    leftover: list[int] | None = None
    stopped: bool = False


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint, so a resumed run picks up exactly here."""

    step: int = 0
    epoch: int = 0
    micro_batches_in_epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    best_step: int = 0
    best_valid: dict = field(default_factory=dict)
    stale: int = 0
    sequences_seen: int = 0
    train_seconds: float = 0.0
    world_size: int = 1
    global_batch: int = 0
    # Micro-batches per step per rank. Checkpoints from before it was saved used the default
    # micro-batch (batch / world size), whose accumulation is 1.
    accumulation: int = 1


# The fastest encoder rate seen to train all 6 MiniLM layers (ML-1M, GPU); 1e-3 stayed at popularity.
_DEEP_ENCODER_MAX_LR = 5e-4


def not_learned_hint(layers: int, encoder_lr: float, state: LoopState) -> str:
    """What to try when the model does not beat popularity, from what was seen to cause it."""
    if layers > 2 and encoder_lr > _DEEP_ENCODER_MAX_LR:
        return (
            f"{layers} encoder layers trained at {encoder_lr:g}: a deep encoder wants a lower rate (on ML-1M all 6 MiniLM "
            "layers stayed at popularity with the encoder at 1e-3, and trained with it at 2e-4 or 3e-4, configs/ml-1m-gpu.yaml); "
            "lower optim.lr, optim.pretrained_lr_scale or model.keep_layers"
        )
    if state.stale == 0:
        return f"the last validation, after {state.epoch} epoch(s), was the best yet: train longer (train.epochs)"
    return f"validation peaked at epoch {state.best_epoch} of {state.epoch}: try a lower optim.lr or more data"


def optimizer_step(engine: TrainingEngine, items: list[torch.Tensor], draws: list[torch.Tensor], loss_weights: LossWeights, world_size: int) -> LossParts:
    """One optimiser step over this rank's micro-batches (the engine accumulates, then steps);
    returns the mean loss parts. The masked term is normalised by the masked-position count of
    all ranks, so N ranks x micro-batch b train exactly like one process with batch N x b."""
    totals = None
    for batch, batch_draws in zip(items, draws):
        sums = engine.forward(batch, batch_draws)
        masked_count = sums.masked_count.detach().clone()
        dist.all_reduce(masked_count)
        parts = sums.combine(loss_weights, masked_count, world_size)
        engine.backward_and_step(parts.total)
        detached = (parts.total.detach(), parts.tail, parts.masked, parts.contrastive)
        totals = detached if totals is None else tuple(None if a is None else a + b for a, b in zip(totals, detached))
    total, tail, masked, contrastive = (None if value is None else value / len(items) for value in totals)
    return LossParts(total, tail, masked, 0, contrastive)


def run(config: JobConfig, resume: str | None = None) -> TrainResult:
    """Train (or resume) one job on this process's rank; joins the process group the launcher made."""
    with StopSignals(config.train.stop_signals) as stop:
        device, info = distributed.start(config.train.device, config.distributed.timeout_minutes)
        if device.type != "cuda" and config.train.keep_host_memory and not keep_freed_host_memory():
            log.info("train.keep_host_memory: not glibc; freed host memory is returned to the system as usual")
        if not info.is_main:
            logging.getLogger("seqrec").setLevel(logging.WARNING)
        return _Trainer(config, info, device, stop).run(resume)


class _Trainer:
    def __init__(self, config: JobConfig, info: DistInfo, device: torch.device, stop: StopSignals):
        self.config, self.info, self.device, self.stop = config, info, device, stop
        self.run_dir = config.run_path
        self.checkpoints = self.run_dir / "checkpoints"
        self.amp = autocast_dtype(config.train.precision, device)
        if config.model.compile:
            require_compile_toolchain(device)
        self.plan: BatchPlan = plan_batches(config, info.world_size)
        self.data = PreparedDataset.open(config.data.dataset)
        if self.data.meta["counts"]["evaluated_users"] == 0:
            raise ConfigError(
                f"data.dataset: {self.data.root} has no user with at least {MIN_EVAL_LENGTH} interactions, so nothing to "
                "validate or test (leave-one-out holds out each such user's last two items); training needs some"
            )
        self.stream_options = StreamOptions(
            config.data.max_len, config.data.shuffle_buffer, config.train.seed, config.data.pad_multiple,
            windows=config.data.long_sequences == "windows",
            prefix_prob=0.0 if config.model.attention == "causal" else config.loss.prefix_prob,
        )

    # ---- setup -------------------------------------------------------------------------------

    def _steps_per_epoch(self, epoch: int, sample_counts: dict[str, int]) -> int:
        per_rank = [
            batches_per_rank(sample_counts, self.stream_options, rank, self.info.world_size, epoch, self.plan.micro_batch, self.config.data.num_workers)
            for rank in range(self.info.world_size)
        ]
        return min(per_rank) // self.plan.accumulation

    def _sample_counts(self) -> dict[str, int]:
        if not self.stream_options.windows:
            return self.data.shard_counts()
        counts: dict[str, int] = {}
        options = StreamOptions(self.config.data.max_len, shuffle_buffer=0, windows=True)
        for sample in self.data.sequences(options):
            counts[sample.url] = counts.get(sample.url, 0) + 1
        return {url: counts.get(url, 0) for url in self.data.shard_counts()}

    def _setup(self) -> None:
        config, info = self.config, self.info
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        torch.manual_seed(config.train.seed)
        original_ids, titles = self.data.items()
        model, self.init_report = build_model(config.model, self.data.num_items, config.data.max_len, titles, self.device, original_ids)
        model.to(self.device)
        if info.is_main:
            (self.run_dir / "item_init.json").write_text(json.dumps(self.init_report) + "\n")

        sample_counts = self._sample_counts()
        self.epoch_steps = [self._steps_per_epoch(epoch, sample_counts) for epoch in range(config.train.epochs)]
        if self.epoch_steps[0] == 0:
            raise ConfigError(
                f"data.dataset: {self.data.root} has {len(self.data.shard_paths())} shard(s) for {info.world_size} process(es) with "
                f"{config.data.num_workers} worker(s) each and micro-batches of {self.plan.micro_batch} x {self.plan.accumulation}: "
                "some rank gets no full step; re-run prepare with a smaller --shard-size or use fewer processes"
            )
        total = sum(self.epoch_steps)
        self.total_steps = min(total, config.train.max_steps) if config.train.max_steps else total
        self.objective = MaskedItemObjective(
            model, config.loss.mask_prob, config.loss.tail_only_prob, config.loss.views, config.loss.contrastive_temperature,
            config.loss.exclude_row_items, config.loss.label_smoothing,
        )
        self.engine = TrainingEngine(self.objective, config, self.plan, self.total_steps, self.amp)
        self.model = self.engine.model
        self.average = None
        if config.train.ema_decay is not None:
            self.average = WeightAverage(list(self.model.parameters()), config.train.ema_decay, partitioned=self.engine.zero_stage == 3)
        if config.model.compile:
            self.model.compile_encoder()
        self.generator = torch.Generator(device=self.device).manual_seed(config.train.seed * 1_000_003 + info.rank)
        self.divergence = DivergenceWatch(self.device, enabled=self.amp != torch.float16)
        self.loss_weights = LossWeights(0.0, 1.0) if model.next_item else LossWeights(
            config.loss.tail_weight, config.loss.masked_weight, config.loss.contrastive_weight,
        )
        log.info(
            "training %s on %s: %d items, %d sequences; %d process(es) (%s, %s), ZeRO-%d, micro-batch %d x accumulation %d "
            "x world %d = %d per step, ~%d steps/epoch, device %s, %s",
            config.name, self.data.root, self.data.num_items, self.data.num_train_sequences, info.world_size, info.launcher,
            info.backend, self.engine.zero_stage, self.plan.micro_batch, self.plan.accumulation, info.world_size,
            self.plan.global_batch, self.epoch_steps[0], self.device, self.amp or "fp32",
        )
        if self.average is not None:
            log.info("train.ema_decay %g: validation, the kept best model and its export use the weights' moving average", config.train.ema_decay)
        if config.loss.exclude_row_items and not config.eval.exclude_history:
            log.warning("loss.exclude_row_items is on but eval.exclude_history is off: training never scores a user's own "
                        "items against the rest, so evaluation ranks them on untrained scores; set loss.exclude_row_items=false")

    # ---- loop --------------------------------------------------------------------------------

    def run(self, resume: str | None) -> TrainResult:
        started = time.perf_counter()
        self._setup()
        config, info = self.config, self.info
        state = LoopState(world_size=info.world_size, global_batch=self.plan.global_batch, accumulation=self.plan.accumulation)
        resume_from = checkpoint.resolve_resume(resume, self.checkpoints)
        if resume_from is not None:
            state = self._restore(resume_from)
        self.tracker = Tracker(config, self.run_dir, info.is_main, resumed=resume_from is not None)
        self.tracker.reset_history(state.step if resume_from is not None else None)
        valid_set, test_set = self.data.eval_set("valid"), self.data.eval_set("test")
        evaluate = lambda eval_set: evaluate_model(  # noqa: E731
            self.model, eval_set, config.eval.batch_size, config.data.max_len, config.eval.ks, config.eval.exclude_history, self.device, self.amp,
            zero3=self.engine.zero_stage == 3,
        )

        self.engine.train()
        self._last_checkpoint_at = _clock()
        finished = state.step >= self.total_steps
        last_epoch_end = time.perf_counter()
        # An epoch's cycle (its training plus the validation before it) alternates between short
        # and long when validation runs every k-th epoch; the mean over the last k is the
        # period's, so the planned end of the decay does not swing from epoch to epoch.
        recent_cycles: deque[float] = deque(maxlen=config.train.eval_every)
        while not finished and state.epoch < config.train.epochs:
            epoch = state.epoch
            epoch_started = time.perf_counter()
            end = self._train_epoch(state)
            now = time.perf_counter()
            state.train_seconds += now - epoch_started
            # Before validation too, which can take minutes on a large catalogue: the grace a
            # cluster gives after its signal may not cover it.
            if end.stopped or self._stop_agreed():
                self._stop(state)
            ran_dry = end.leftover
            recent_cycles.append(now - last_epoch_end)
            out_of_time = self._check_time_budget(state, now - started, sum(recent_cycles) / len(recent_cycles))
            last_epoch_end = now
            finished = state.step >= self.total_steps or epoch + 1 == config.train.epochs or out_of_time
            stop = False
            if (epoch + 1) % config.train.eval_every == 0 or finished:
                self._check_finite(state)
                with self._evaluated_weights():
                    valid = distributed.broadcast_object(evaluate(valid_set))
                    improved = valid[EARLY_STOP_METRIC] > state.best_score
                    if improved:
                        self._save_best()
                self._append({"step": state.step, "epoch": epoch, "valid": valid})
                log.info("epoch %d valid HR@10 %.4f NDCG@10 %.4f (%d steps, %.0f seq/s)", epoch, valid["HR@10"], valid["NDCG@10"],
                         state.step, state.sequences_seen / max(state.train_seconds, 1e-9))
                if improved:
                    state.best_score, state.best_epoch, state.best_step, state.best_valid, state.stale = valid[EARLY_STOP_METRIC], epoch, state.step, valid, 0
                else:
                    state.stale += 1
                    if state.stale >= config.train.patience and epoch + 1 >= config.train.min_epochs:
                        log.info("early stop: no %s gain for %d evaluations", EARLY_STOP_METRIC, state.stale)
                        stop = True
            state.epoch, state.micro_batches_in_epoch = epoch + 1, 0
            if ran_dry and max(ran_dry) > 0 and info.is_main:
                log.info("epoch %d: %d steps; micro-batches left over per rank beyond the shortest: %s", epoch, self.epoch_steps[epoch], ran_dry)
            if stop:
                break
        if not self._checkpoint_complete(state.step):
            self._checkpoint(state)
        if self._stop_agreed():
            # Training is over and checkpointed; a resumed run goes straight to the test.
            self._stop(state)
        return self._finish(state, started, evaluate, test_set, resume_from)

    def _checkpoint_complete(self, step: int) -> bool:
        return distributed.broadcast_object((self.checkpoints / checkpoint.tag_for(step) / checkpoint.COMPLETE_MARKER).is_file())

    def _stop_agreed(self) -> bool:
        """Whether a stop signal reached any rank (a CPU collective every rank makes)."""
        return not distributed.all_true(not self.stop.requested)

    def _stop(self, state: LoopState) -> None:
        """Checkpoint where every rank stands, close the tracker, and leave with TrainingStopped."""
        if not self._checkpoint_complete(state.step):
            self._checkpoint(state)
        saved = self.checkpoints / checkpoint.tag_for(state.step)
        received = distributed.gather_objects(self.stop.received)
        signalled = ", ".join(f"{name} on rank {rank}" for rank, name in enumerate(received) if name) or "?"
        self.tracker.stopped(state.step)
        raise TrainingStopped(
            f"stopped by {signalled} at step {state.step} (epoch {state.epoch}, {state.micro_batches_in_epoch} micro-batches into it); "
            f"checkpoint {saved}; run the same command with --resume auto to continue"
        )

    def _check_time_budget(self, state: LoopState, elapsed_s: float, cycle_s: float) -> bool:
        """At an epoch end: whether the time budget is spent, and, while it is not, re-plan the
        learning-rate decay to end where the budget will stop training (the step count an epoch
        of `cycle_s` seconds, validation included, allows). Rank 0's clock decides for all ranks."""
        limit = self.config.train.time_limit_minutes
        if limit is None:
            return False
        out_of_time = elapsed_s > 60 * limit
        planned = None
        if self.config.optim.fit_schedule_to_time_limit and not out_of_time:
            planned = planned_total_steps(state.step, elapsed_s, 60 * limit, cycle_s, self.epoch_steps[state.epoch + 1:], self.total_steps)
        out_of_time, planned = distributed.broadcast_object((out_of_time, planned))
        if out_of_time:
            log.info("time limit of %.1f minutes reached after epoch %d", limit, state.epoch)
        elif planned is not None and planned != self.engine.planned_steps:
            log.info("time budget: %.1f of %.1f minutes used, ~%.0f s per epoch; learning-rate decay now ends at step %d (was %d)",
                     elapsed_s / 60, limit, cycle_s, planned, self.engine.planned_steps)
            self.engine.replan(planned)
        return out_of_time

    def _train_epoch(self, state: LoopState) -> EpochEnd:
        """One epoch (or its remainder after a resume), or its part before a stop signal."""
        config, plan = self.config, self.plan
        stream = self.data.sequences(self.stream_options, self.info.rank, self.info.world_size, epoch=state.epoch)
        loader = sequence_loader(stream, self.stream_options, plan.micro_batch, config.data.num_workers,
                                 pin_memory=self.device.type == "cuda", worker_start=config.data.worker_start)
        with held_back(config.train.stop_signals):  # the reader's processes start here
            batches = iter(loader)
        for _ in range(state.micro_batches_in_epoch):
            next(batches)
        steps_left = min(self.epoch_steps[state.epoch] - state.micro_batches_in_epoch // plan.accumulation, self.total_steps - state.step)
        with progress.bar(total=max(steps_left, 0), desc=f"epoch {state.epoch}", unit="step") as bar:
            return self._train_steps(state, batches, bar)

    def _train_steps(self, state: LoopState, batches, bar) -> EpochEnd:
        config, plan = self.config, self.plan
        window_started, window_sequences, window_tokens = time.perf_counter(), 0, 0
        while state.step < self.total_steps:
            micro_batches = [batch for batch in (next(batches, None) for _ in range(plan.accumulation)) if batch is not None]
            # One collective for all three: a signal seen by any rank stops every rank before the
            # same step, and a checkpoint period that ran out on any rank's clock saves on all. The
            # micro-batches read for this step are read again after a resume (the checkpoint's
            # count of consumed micro-batches excludes them).
            full_step, carry_on, period_running = distributed.all_true_each(
                [len(micro_batches) == plan.accumulation, not self.stop.requested, not self._checkpoint_due()]
            )
            if not carry_on:
                return EpochEnd(stopped=True)
            if not full_step:
                leftover = len(micro_batches) + sum(1 for _ in batches)
                return EpochEnd(leftover=[int(row[0]) for row in distributed.gather_floats([leftover])])
            if not period_running and not self._checkpoint_complete(state.step):
                self._checkpoint(state)
            parts = self._step(micro_batches)
            bar.update()
            state.step += 1
            self.divergence.observe(parts.total, state.step)
            if self.average is not None:
                self.average.update(state.step)
            state.micro_batches_in_epoch += plan.accumulation
            sequences = sum(len(batch.keys) for batch in micro_batches)
            tokens = sum(int(batch.lengths.sum()) for batch in micro_batches)
            state.sequences_seen += sequences * self.info.world_size
            window_sequences += sequences
            window_tokens += tokens
            if state.step % config.train.log_every == 0 or state.step == 1:
                elapsed = time.perf_counter() - window_started
                rates = distributed.gather_floats([window_sequences / elapsed, window_tokens / elapsed])
                row = {
                    "step": state.step, "epoch": state.epoch, "loss": parts.total.item(), "loss_tail": parts.tail.item(),
                    "loss_masked": parts.masked.item(), "lr": self.engine.lr, "grad_norm": self.engine.grad_norm,
                    **({} if parts.contrastive is None else {"loss_contrastive": parts.contrastive.item()}),
                    "sequences_per_s": round(sum(rate[0] for rate in rates), 1), "tokens_per_s": round(sum(rate[1] for rate in rates), 1),
                    "sequences_per_s_by_rank": [round(rate[0], 1) for rate in rates],
                    "tokens_per_s_by_rank": [round(rate[1], 1) for rate in rates],
                }
                self._append(row)
                contrast = f" contrastive {row['loss_contrastive']:.4f}" if "loss_contrastive" in row else ""
                log.info("step %d epoch %d loss %.4f (tail %.4f masked %.4f%s) lr %.2e | %.0f seq/s %.0f tok/s over %d rank(s)",
                         state.step, state.epoch, row["loss"], row["loss_tail"], row["loss_masked"], contrast, row["lr"],
                         row["sequences_per_s"], row["tokens_per_s"], len(rates))
                self._check_finite(state)
                window_started, window_sequences, window_tokens = time.perf_counter(), 0, 0
            if config.train.checkpoint_every and state.step % config.train.checkpoint_every == 0 and state.step < self.total_steps:
                self._checkpoint(state)
        return EpochEnd()

    def _step(self, micro_batches) -> LossParts:
        items = [batch.items.to(self.device, non_blocking=True) for batch in micro_batches]
        views = self.objective.views
        draws = [torch.rand((views * batch.shape[0], batch.shape[1]), generator=self.generator, device=self.device) for batch in items]
        return optimizer_step(self.engine, items, draws, self.loss_weights, self.info.world_size)

    # ---- state -------------------------------------------------------------------------------

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"masking": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _checkpoint_due(self) -> bool:
        minutes = self.config.train.checkpoint_every_minutes
        return minutes is not None and _clock() - self._last_checkpoint_at >= 60 * minutes

    def _check_finite(self, state: LoopState) -> None:
        """Raise TrainingDiverged on every rank if any rank's loss went non-finite (a collective)."""
        found = self.divergence.first_bad_step()
        if found is None:
            return
        step, ranks = found
        last = checkpoint.latest_checkpoint(self.checkpoints)
        raise TrainingDiverged(
            f"the training loss was not finite at step {step} (rank(s) {', '.join(map(str, ranks))}; noticed at step {state.step}), "
            f"so the weights are too; stopped before any checkpoint or validation used them. Last complete checkpoint: "
            f"{last if last is not None else 'none'}. Usual causes: a learning rate too high for the model (optim.lr, "
            "optim.pretrained_lr_scale, optim.warmup_steps) or no gradient clipping (optim.grad_clip)"
        )

    def _checkpoint(self, state: LoopState) -> None:
        self._check_finite(state)
        averages = None if self.average is None else self.average.state_dict()
        checkpoint.save(self.engine.engine, self.checkpoints, state.step, asdict(state), self._rng_state(), self.config.train.keep_checkpoints, averages)
        self._last_checkpoint_at = _clock()

    def _restore(self, directory: Path) -> LoopState:
        state = LoopState(**checkpoint.read_trainer_state(directory))
        if state.global_batch != self.plan.global_batch:
            raise ConfigError(
                f"--resume: {directory} was written with global batch {state.global_batch} (train.batch_size); this run has "
                f"{self.plan.global_batch}. Keep the batch size: it sets what a step is, and the schedule counts steps"
            )
        written_by, world = state.world_size, self.info.world_size
        regrouped = written_by != world
        written = universal.written_layout(directory)
        target = universal.layout_of(self.engine.zero_stage, self.engine.deepspeed_bf16)
        if universal.needed(written, written_by, target, world):
            universal.resume(self.engine.engine, directory, written, target, self.engine.parameter_groups,
                             self.checkpoints / f"universal-{directory.name}")
        else:
            checkpoint.load(self.engine.engine, directory)
        # On another number of processes the ranks' own states belong to other ranks: the
        # generators reseed (_regroup) and every rank takes rank 0's average, whole under ZeRO 0-2.
        rank_written = 0 if regrouped else self.info.rank
        rng, averages = checkpoint.rank_state(directory, rank_written)
        # An average fits where the partitions are the same, or where both sides hold whole weights.
        self._restore_average(directory, rank_written, averages, fits=(written == target and not regrouped) or PARAMETERS not in (written, target))
        if regrouped:
            self._regroup(state, directory)
            return state
        if rng is None:
            raise ConfigError(f"--resume: {directory} has no RNG states of rank {self.info.rank}: an incomplete checkpoint")
        self.generator.set_state(rng["masking"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        log.info("resumed from %s: step %d, epoch %d, %d micro-batches into it", directory, state.step, state.epoch, state.micro_batches_in_epoch)
        return state

    def _restore_average(self, directory: Path, rank_written: int, averages: dict | None, fits: bool) -> None:
        if self.average is None:
            return
        if averages is not None and fits:
            try:
                self.average.load_state_dict(averages)
            except ValueError as exc:
                raise ConfigError(f"--resume: {checkpoint.average_file(directory, rank_written)}: {exc}") from exc
        elif averages is not None:
            log.warning("train.ema_decay: %s holds the weight average in another run's ZeRO-3 partitions; "
                        "the average starts again from the resumed weights", directory)
        else:
            log.warning("train.ema_decay: %s holds no weight average (written with train.ema_decay null); "
                        "the average starts again from the resumed weights", directory)

    def _regroup(self, state: LoopState, directory: Path) -> None:
        """Continue a checkpoint on another number of processes. Weights, optimiser and
        schedule continue exactly and a step stays the same global batch, but the ranks now read
        other shards: each rank skips as many of its own micro-batches as the epoch's steps so
        far took, so as many sequences as before are skipped, though not the same ones, and the
        masking and dropout generators start again from the seed, the rank and the step."""
        written_by = state.world_size
        steps_into_epoch = state.micro_batches_in_epoch // state.accumulation
        state.micro_batches_in_epoch = steps_into_epoch * self.plan.accumulation
        state.world_size, state.accumulation = self.info.world_size, self.plan.accumulation
        seed = (self.config.train.seed * 1_000_003 + self.info.rank) * 1_000_033 + state.step
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)
        # The epochs so far took the old layout's steps, the rest take this one's (its ranks read
        # other shards, so an epoch can be a step or two longer or shorter): the schedule, which
        # came back planned for the old layout, now ends where this run will.
        remaining = max(self.epoch_steps[state.epoch] - steps_into_epoch, 0) + sum(self.epoch_steps[state.epoch + 1:])
        total = state.step + remaining
        self.total_steps = min(total, self.config.train.max_steps) if self.config.train.max_steps else total
        self.engine.replan(self.total_steps)
        log.warning(
            "resumed from %s, written by %d process(es), on %d: step %d, epoch %d, %d step(s) into it. Weights, optimiser "
            "and schedule continue; the rest of this epoch reads other sequences than the old layout would have, and the "
            "masking draws start anew", directory, written_by, self.info.world_size, state.step, state.epoch, steps_into_epoch,
        )

    def _encoder_lr(self) -> float:
        optim = self.config.optim
        return optim.lr * optim.pretrained_lr_scale if self.model.pretrained_parameters() else optim.lr

    def _evaluated_weights(self):
        """The weights validation judges and the best model keeps: the average when there is one."""
        return self.average.applied() if self.average is not None else nullcontext()

    def _save_best(self) -> None:
        weights = self.engine.full_state_dict()
        if self.info.is_main:
            with atomic_file(self.run_dir / BEST_WEIGHTS, "wb") as handle:
                handle.write(save({key: value.contiguous() for key, value in weights.items()}))
        distributed.barrier()

    def _finish(self, state: LoopState, started: float, evaluate, test_set, resume_from: Path | None) -> TrainResult:
        config, info = self.config, self.info
        best_file = self.run_dir / BEST_WEIGHTS
        best = None
        if info.is_main and best_file.is_file():
            best = load_file(str(best_file))
        if distributed.broadcast_object(best is not None):
            self.engine.load_full_state_dict(best)
        test = distributed.broadcast_object(evaluate(test_set))
        weights = self.engine.full_state_dict() if self.engine.zero_stage == 3 else None
        metrics = None
        popularity = popularity_baseline(self.data, config.eval.ks, config.eval.exclude_history) if info.is_main else None
        # Gathered after the last evaluation, so the figures are the whole run's high-water marks.
        peaks = distributed.gather_floats([value if value is not None else math.nan for value in peak_memory_mb(self.device)])
        if info.is_main:
            beats_popularity = test[EARLY_STOP_METRIC] > popularity["test"][EARLY_STOP_METRIC]
            if not beats_popularity:
                log.warning(
                    "test %s %.4f does not beat the popularity baseline (%.4f): the model has not learned the sequences. %s",
                    EARLY_STOP_METRIC, test[EARLY_STOP_METRIC], popularity["test"][EARLY_STOP_METRIC],
                    not_learned_hint(self.model.mlm.config.num_hidden_layers, self._encoder_lr(), state),
                )
            self.model.save_pretrained(self.run_dir / RUN_MODEL_DIR, state_dict=weights, max_len=config.data.max_len)
            shutil.copy2(self.data.root / ITEMS_FILE, self.run_dir / RUN_MODEL_DIR / ITEMS_FILE)
            metrics = {
                "name": config.name,
                "valid": state.best_valid,
                "test": test,
                "popularity": popularity,
                "beats_popularity": beats_popularity,
                "best_epoch": state.best_epoch,
                "epochs_run": state.epoch,
                "steps": state.step,
                "schedule_steps": self.engine.planned_steps,
                "train_seconds": round(state.train_seconds, 2),
                "sequences_per_s": round(state.sequences_seen / state.train_seconds, 1) if state.train_seconds else None,
                "total_seconds": round(time.perf_counter() - started, 2),
                "processes": info.world_size,
                "backend": info.backend,
                "zero_stage": self.engine.zero_stage,
                "global_batch": self.plan.global_batch,
                "micro_batch": self.plan.micro_batch,
                "accumulation": self.plan.accumulation,
                "resumed_from": str(resume_from) if resume_from else None,
                "device": str(self.device),
                "precision": str(self.amp or "fp32"),
                "item_init": self.init_report["counts"],
                "peak_host_memory_mb_by_rank": [round(host) for host, _ in peaks],
                **({"peak_device_memory_mb_by_rank": [round(gpu) for _, gpu in peaks]} if self.device.type == "cuda" else {}),
            }
            self._append({"step": state.step, "test": test})
            with atomic_file(self.run_dir / "metrics.json") as handle:
                handle.write(json.dumps(metrics, indent=2) + "\n")
            self.tracker.finish(metrics, {"seqrec": test, "popularity": popularity["test"]})
            log.info("peak memory: host %s MiB by rank%s", metrics["peak_host_memory_mb_by_rank"],
                     f", device {metrics['peak_device_memory_mb_by_rank']} MiB" if "peak_device_memory_mb_by_rank" in metrics else "")
            print(f"\n{config.name}: test metrics (best epoch {state.best_epoch}, {state.epoch} epochs, {state.train_seconds:.0f} s training)")
            print(format_table({"seqrec": test, "popularity": popularity["test"]}, config.eval.ks))
        metrics = distributed.broadcast_object(metrics)
        return TrainResult(self.run_dir, metrics)

    def _append(self, row: dict) -> None:
        self.tracker.log(row)

