"""End-to-end training on synthetic data: runs, writes its artifacts, and learns the sequential signal."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from seqrec.cli import main
from seqrec.config import load_config
from seqrec.errors import ConfigError
from seqrec.optim import lr_factor
from seqrec.tracking import read_history
from seqrec.train import run
from tests.conftest import REPO


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    args = ["synth", "--preset", "demo", "--users", "1500", "--items", "300", "--groups", "12", "--out", str(root / "log.csv"), "--quiet"]
    assert main(args) == 0
    assert main(["prepare", str(root / "log.csv"), "--out", str(root / "prepared"), "--shard-size", "400", "--quiet"]) == 0
    return root / "prepared"


def _config(dataset, run_dir, *overrides):
    return load_config(REPO / "configs" / "tiny.yaml", [f"data.dataset={dataset}", f"run_dir={run_dir}", *overrides])


@pytest.mark.slow
def test_masked_recipe_learns_far_beyond_popularity(small_dataset, tmp_path):
    result = run(_config(small_dataset, tmp_path / "run", "train.epochs=12", "data.max_len=30"))
    metrics = result.metrics
    # 2.75x here with the default query (the mask token's state plus the last item's); 1.77x
    # with the mask token's state alone.
    assert metrics["test"]["NDCG@10"] > 2.0 * metrics["popularity"]["test"]["NDCG@10"]
    assert metrics["beats_popularity"] is True
    assert metrics["valid"]["NDCG@10"] > 0
    for name in ("metrics.json", "metrics.jsonl", "config.yaml", "item_init.json", "model/model.safetensors", "model/seqrec_items.json"):
        assert (tmp_path / "run" / name).is_file(), name
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"] == metrics["test"]


@pytest.mark.slow
def test_causal_baseline_trains_through_the_same_loop(small_dataset, tmp_path):
    overrides = ("train.epochs=8", "model.attention=causal", "model.dropout=0.0", "data.max_len=30")
    result = run(_config(small_dataset, tmp_path / "run", *overrides))
    assert result.metrics["test"]["NDCG@10"] > 1.5 * result.metrics["popularity"]["test"]["NDCG@10"]


def test_causal_training_takes_batches_with_nothing_to_predict(tmp_path):
    """Users with 3 interactions train on one item, which has no next item; length bucketing
    gathers such rows into batches of their own. Such a batch is a step with loss 0, not 0 / 0
    (which stopped the run as diverged)."""
    generator = torch.Generator().manual_seed(0)
    lengths = [3] * 200 + [12] * 80
    rows = [f"{user},{int(item)},{time}" for user, n in enumerate(lengths)
            for time, item in enumerate(torch.randint(1, 40, (n,), generator=generator).tolist())]
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    assert main(["prepare", str(tmp_path / "log.csv"), "--out", str(tmp_path / "prepared"), "--quiet"]) == 0
    overrides = ("train.epochs=2", "model.attention=causal", "train.log_every=1", "train.precision=fp32")
    metrics = run(_config(tmp_path / "prepared", tmp_path / "run", *overrides)).metrics
    logged = [row for row in read_history(tmp_path / "run") if "loss" in row]
    assert any(row["loss_masked"] == 0.0 for row in logged), "no batch without a target: the test lost its point"
    assert all(math.isfinite(row["loss"]) for row in logged)
    assert math.isfinite(metrics["test"]["NDCG@10"])


def test_a_dataset_without_evaluated_users_is_refused_before_training(tmp_path, monkeypatch):
    rows = [f"{user},{item},{time}" for user in range(50) for time, item in enumerate((user % 7 + 1, user % 5 + 1))]
    (tmp_path / "log.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    assert main(["prepare", str(tmp_path / "log.csv"), "--out", str(tmp_path / "prepared"), "--quiet"]) == 0
    from seqrec import train as train_module

    monkeypatch.setattr(train_module, "build_model", lambda *args, **kwargs: pytest.fail("the model was built"))
    with pytest.raises(ConfigError, match="has no user with at least 3 interactions"):
        run(_config(tmp_path / "prepared", tmp_path / "run"))


@pytest.mark.slow
def test_causal_masked_training_learns_and_its_export_is_queried_alike(small_dataset, tmp_path):
    from seqrec.export_eval import evaluate_export
    from seqrec.recommend import Recommender

    overrides = ("train.epochs=8", "model.attention=causal", "model.causal_objective=masked", "model.dropout=0.0", "data.max_len=30",
                 "train.precision=fp32")
    config = _config(small_dataset, tmp_path / "run", *overrides)
    metrics = run(config).metrics
    assert metrics["test"]["NDCG@10"] > 1.5 * metrics["popularity"]["test"]["NDCG@10"]
    assert all(row["loss_tail"] > 0 for row in read_history(tmp_path / "run") if "loss" in row)
    # The deployed directory is queried through an appended mask token, as the training evaluator was.
    assert not Recommender(tmp_path / "run" / "model").next_item
    exported = evaluate_export(tmp_path / "run" / "model", small_dataset, "test", batch_size=64, ks=tuple(config.eval.ks))
    assert exported.model["NDCG@10"] == pytest.approx(metrics["test"]["NDCG@10"], abs=1e-6)


def test_prefix_cutting_reaches_the_trained_batches(small_dataset, tmp_path, monkeypatch):
    import seqrec.train as train_module

    seen = []
    real_step = train_module.optimizer_step
    monkeypatch.setattr(train_module, "optimizer_step", lambda engine, items, *rest: (seen.extend(items), real_step(engine, items, *rest))[1])
    # max_len above every history: uncut rows are whole histories, cut rows prefixes of them.
    run(_config(small_dataset, tmp_path / "uncut", "train.max_steps=4", "data.max_len=512", "loss.prefix_prob=0.0"))
    uncut_lengths, seen[:] = torch.cat([(batch != 0).sum(dim=1) for batch in seen]), []
    run(_config(small_dataset, tmp_path / "cut", "train.max_steps=4", "data.max_len=512", "loss.prefix_prob=1.0", "train.log_every=1"))
    cut_lengths = torch.cat([(batch != 0).sum(dim=1) for batch in seen])
    assert cut_lengths.float().mean() < 0.75 * uncut_lengths.float().mean()
    assert int(cut_lengths.min()) >= min(2, int(uncut_lengths.min())), "a cut keeps at least 2 items"
    losses = [row["loss"] for row in read_history(tmp_path / "cut") if "loss" in row]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


def test_max_steps_and_early_stopping_bound_the_run(small_dataset, tmp_path, caplog):
    # Three steps at a rate too small to move the weights (at the tiny config's own rate, three
    # steps already beat popularity on this data): the run says it stayed at the popularity level.
    overrides = ("train.epochs=50", "train.max_steps=3", "train.log_every=1", "optim.lr=1e-7")
    result = run(_config(small_dataset, tmp_path / "run", *overrides))
    assert result.metrics["steps"] == 3 and result.metrics["epochs_run"] == 1
    assert result.metrics["beats_popularity"] is False
    assert "does not beat the popularity baseline" in caplog.text
    assert [row["step"] for row in read_history(tmp_path / "run") if "loss" in row] == [1, 2, 3]


def test_early_stopping_fires_after_patience_but_not_before_min_epochs(small_dataset, tmp_path, caplog):
    # A rate too small to move a float32 weight: every validation equals the first, so each one
    # after it is stale.
    frozen = ("train.epochs=6", "train.patience=2", "optim.lr=1e-12", "optim.warmup_steps=0", "train.precision=fp32")
    caplog.set_level("INFO", logger="seqrec.train")
    stopped = run(_config(small_dataset, tmp_path / "stopped", *frozen)).metrics
    assert stopped["epochs_run"] == 3 and "early stop" in caplog.text
    waited = run(_config(small_dataset, tmp_path / "waited", *frozen, "train.min_epochs=5")).metrics
    assert waited["epochs_run"] == 5
    assert [row["epoch"] for row in read_history(tmp_path / "waited") if "valid" in row] == [0, 1, 2, 3, 4]


def test_not_learned_hint_names_the_likely_cause():
    from seqrec.train import LoopState, not_learned_hint

    rising, peaked = LoopState(epoch=2, best_epoch=1, stale=0), LoopState(epoch=9, best_epoch=3, stale=5)
    assert "deep encoder wants a lower rate" in not_learned_hint(6, 1e-3, rising)
    assert "train longer" in not_learned_hint(6, 2e-4, rising)
    assert "train longer" in not_learned_hint(2, 1e-3, rising)  # 2 layers train at 1e-3 (configs/demo.yaml)
    assert "peaked at epoch 3 of 9" in not_learned_hint(2, 1e-3, peaked)


def test_gradient_accumulation_takes_one_optimiser_step_per_global_batch(small_dataset, tmp_path):
    overrides = ("train.batch_size=32", "train.micro_batch_size=8", "train.max_steps=3", "train.log_every=1")
    result = run(_config(small_dataset, tmp_path / "run", *overrides))
    assert (result.metrics["micro_batch"], result.metrics["accumulation"], result.metrics["steps"]) == (8, 4, 3)
    rows = read_history(tmp_path / "run")
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]
    # Linear warm-up over 5 steps advances once per optimiser step, not per micro-batch.
    lrs = [row["lr"] for row in rows if "loss" in row]
    assert lrs[1] / lrs[0] == pytest.approx(1.5) and lrs[2] / lrs[0] == pytest.approx(2.0)


def test_lr_schedule_warms_up_then_decays():
    assert lr_factor(0, 10, 100, "linear") == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "linear") == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "linear") == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, "cosine") == pytest.approx(0.0)
    assert lr_factor(50, 10, 100, "constant") == 1.0


def test_pretrained_lr_scale_groups_only_the_checkpoint_tensors():
    from seqrec.model import build_model
    from seqrec.optim import build_optimizer, build_scheduler

    # BERT's MLM head, which MiniLM does not ship: a fresh tensor trained at the items' rate
    # (with the default direct head it is frozen and left out: tests/test_item_head.py).
    overrides = ["model.pretrained=minilm", "model.keep_layers=1", "optim.lr=1e-3", "optim.pretrained_lr_scale=0.1", "model.item_head=transform"]
    config = load_config(None, overrides)
    model, _ = build_model(config.model, 20, max_len=16)
    optimizer = build_optimizer(model, config.optim, model.pretrained_parameters())
    lr_of = {id(parameter): group["lr"] for group in optimizer.param_groups for parameter in group["params"]}
    decay_of = {id(parameter): group["weight_decay"] for group in optimizer.param_groups for parameter in group["params"]}
    mlm = model.mlm
    assert lr_of[id(mlm.bert.encoder.layer[0].attention.self.query.weight)] == pytest.approx(1e-4)
    assert lr_of[id(mlm.bert.embeddings.position_embeddings.weight)] == pytest.approx(1e-4)
    # The table holds the new item rows; MiniLM ships no MLM head, so the head is fresh too.
    assert lr_of[id(mlm.get_input_embeddings().weight)] == pytest.approx(1e-3)
    assert lr_of[id(mlm.cls.predictions.bias)] == pytest.approx(1e-3)
    assert lr_of[id(mlm.cls.predictions.transform.dense.weight)] == pytest.approx(1e-3)
    assert decay_of[id(mlm.bert.encoder.layer[0].attention.output.LayerNorm.weight)] == 0.0
    assert decay_of[id(mlm.bert.encoder.layer[0].attention.self.query.weight)] == config.optim.weight_decay
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3), "the logged learning rate is the items'"
    # The schedule scales every group alike.
    scheduler = build_scheduler(optimizer, config.optim, total_steps=1000)
    for _ in range(30):
        optimizer.step()
        scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([group["initial_lr"] * 31 / 100 for group in optimizer.param_groups])
    # Random weights have nothing loaded; scale 1 keeps the two weight-decay groups.
    random_model, _ = build_model(load_config(None, ["model.keep_layers=1", "model.weights=random"]).model, 20, max_len=16)
    assert random_model.pretrained_parameters() == []
    unscaled = build_optimizer(model, load_config(None, ["optim.lr=1e-3", "optim.pretrained_lr_scale=1.0"]).optim, model.pretrained_parameters())
    assert [group["lr"] for group in unscaled.param_groups] == [1e-3, 1e-3]
    with pytest.raises(Exception, match="optim.pretrained_lr_scale: must be > 0"):
        load_config(None, ["optim.pretrained_lr_scale=0"])


def test_pretrained_weight_decay_shrinks_only_the_checkpoint_matrices():
    """With zero gradients an AdamW step only decays: each matrix shrinks by exactly lr x its
    group's decay, so the step shows which decay every tensor got."""
    from seqrec.model import build_model
    from seqrec.optim import build_optimizer

    overrides = ["model.pretrained=minilm", "model.keep_layers=1", "optim.lr=1e-2", "optim.pretrained_lr_scale=0.5",
                 "optim.weight_decay=2.0", "optim.pretrained_weight_decay=0.1", "model.item_head=transform"]
    config = load_config(None, overrides)
    model, _ = build_model(config.model, 20, max_len=16)
    mlm = model.mlm
    watched = {
        "encoder matrix": (mlm.bert.encoder.layer[0].attention.self.query.weight, 1 - 0.5e-2 * 0.1),
        "position embeddings": (mlm.bert.embeddings.position_embeddings.weight, 1 - 0.5e-2 * 0.1),
        "item table": (mlm.get_input_embeddings().weight, 1 - 1e-2 * 2.0),
        "fresh head matrix": (mlm.cls.predictions.transform.dense.weight, 1 - 1e-2 * 2.0),
        "encoder LayerNorm": (mlm.bert.encoder.layer[0].attention.output.LayerNorm.weight, 1.0),
        "encoder bias": (mlm.bert.encoder.layer[0].attention.self.query.bias, 1.0),
    }
    before = {name: parameter.detach().clone() for name, (parameter, _) in watched.items()}
    optimizer = build_optimizer(model, config.optim, model.pretrained_parameters())
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    for name, (parameter, factor) in watched.items():
        torch.testing.assert_close(parameter.detach(), before[name] * factor, msg=lambda m, name=name: f"{name}: {m}")
    # Null: the encoder takes optim.weight_decay like every other matrix.
    same = build_optimizer(model, load_config(None, [*overrides, "optim.pretrained_weight_decay=null"]).optim, model.pretrained_parameters())
    decay_of = {id(parameter): group["weight_decay"] for group in same.param_groups for parameter in group["params"]}
    assert decay_of[id(mlm.bert.encoder.layer[0].attention.self.query.weight)] == 2.0
    with pytest.raises(Exception, match="optim.pretrained_weight_decay: must be >= 0 or null"):
        load_config(None, ["optim.pretrained_weight_decay=-1"])


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_pretrained_lr_scale_reaches_the_trained_weights(small_dataset, tmp_path, zero_stage):
    """Adam moves each weight by about its learning rate per step, so with the scale at 0.01 the
    encoder moves ~100x less than at 1, while the item rows move alike."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from seqrec.model import build_model, pretrained_directory

    query = "bert.encoder.layer.0.attention.self.query.weight"
    first_item = len(AutoTokenizer.from_pretrained(pretrained_directory("minilm")))
    moved = {}
    for scale in (1.0, 0.01):
        run_dir = tmp_path / f"scale-{scale}"
        overrides = ("model.pretrained=minilm", "model.keep_layers=1", "model.weights=pretrained", "train.max_steps=4",
                     "optim.warmup_steps=1", "optim.lr=1e-3", f"optim.pretrained_lr_scale={scale}", f"distributed.zero_stage={zero_stage}")
        config = _config(small_dataset, run_dir, *overrides)
        run(config)
        trained = AutoModelForMaskedLM.from_pretrained(run_dir / "model")
        start, _ = build_model(config.model, trained.config.vocab_size - first_item, max_len=config.data.max_len)
        moved[scale] = (
            (trained.state_dict()[query] - start.mlm.state_dict()[query]).abs().mean().item(),
            (trained.get_input_embeddings().weight[first_item:] - start.item_embeddings()).abs().mean().item(),
        )
    assert moved[0.01][0] < 0.05 * moved[1.0][0]
    assert moved[0.01][1] > 0.5 * moved[1.0][1]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; runs where a GPU is present")
def test_training_on_cuda_runs_bf16_over_nccl_and_learns(small_dataset, tmp_path):
    # Its own process: this one may already hold a gloo process group from the CPU tests.
    overrides = [f"data.dataset={small_dataset}", f"run_dir={tmp_path / 'run'}", "train.device=cuda", "train.precision=bf16",
                 "train.epochs=12", "data.max_len=30", "tracking.wandb=disabled"]
    command = [sys.executable, "launcher/train.py", "--config", "configs/tiny.yaml", *(arg for item in overrides for arg in ("--set", item))]
    subprocess.run(command, cwd=REPO, check=True, timeout=600)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["device"], metrics["precision"], metrics["backend"]) == ("cuda:0", "torch.bfloat16", "nccl")
    assert metrics["test"]["NDCG@10"] > 2 * metrics["popularity"]["test"]["NDCG@10"]
    assert len(metrics["peak_device_memory_mb_by_rank"]) == 1 and metrics["peak_device_memory_mb_by_rank"][0] > 0


def _step_losses(run_dir):
    return [row["loss"] for row in read_history(run_dir) if "loss" in row]


@pytest.mark.slow
@pytest.mark.parametrize("activation_checkpointing", [0, 1])
def test_compiled_encoder_trains_like_the_eager_one(small_dataset, tmp_path, activation_checkpointing):
    """Also with each compiled layer recomputed in the backward pass (checkpointing inside the graph)."""
    overrides = ("train.max_steps=3", "train.log_every=1", "model.dropout=0.0", "train.precision=fp32")
    eager = run(_config(small_dataset, tmp_path / "eager", *overrides))
    compiled = run(_config(small_dataset, tmp_path / "compiled", *overrides, "model.compile=true",
                           f"model.activation_checkpointing={activation_checkpointing}"))
    assert compiled.metrics["steps"] == eager.metrics["steps"] == 3
    assert _step_losses(tmp_path / "compiled") == pytest.approx(_step_losses(tmp_path / "eager"), rel=1e-3)
    assert compiled.metrics["test"]["NDCG@10"] == pytest.approx(eager.metrics["test"]["NDCG@10"], abs=0.02)


def test_compile_without_a_cpp_compiler_is_a_config_error_before_any_setup(small_dataset, tmp_path, monkeypatch):
    from torch._inductor import config as inductor_config

    from seqrec import train as train_module

    monkeypatch.setattr(train_module, "build_model", lambda *args, **kwargs: pytest.fail("the model was built"))
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-c++"))}):
        with pytest.raises(ConfigError, match=r"model.compile: .*no working compiler.*model.compile=false"):
            run(_config(small_dataset, tmp_path / "run", "model.compile=true", "train.max_steps=1"))


def test_compile_with_zero3_is_a_config_error(small_dataset, tmp_path):
    from seqrec.errors import ConfigError

    with pytest.raises(ConfigError, match="model.compile"):
        run(_config(small_dataset, tmp_path / "run", "model.compile=true", "distributed.zero_stage=3", "train.max_steps=1"))


def test_time_budget_plan_counts_the_epochs_that_start_before_the_limit():
    from seqrec.optim import planned_total_steps

    # 100 s used of 300, epochs of 60 s: ends at 160, 220, 280 (under), 340 (past): 4 more epochs.
    assert planned_total_steps(50, 100.0, 300.0, 60.0, [10] * 20, 10**6) == 50 + 40
    assert planned_total_steps(50, 100.0, 300.0, 60.0, [10] * 2, 10**6) == 50 + 20, "no more epochs than train.epochs leaves"
    assert planned_total_steps(50, 100.0, 300.0, 60.0, [10] * 20, 75) == 75, "the step budget still caps it"
    assert planned_total_steps(50, 310.0, 300.0, 60.0, [10] * 20, 10**6) == 60, "past the limit: the current epoch's end is the next stop"


def test_replanned_schedule_survives_a_scheduler_checkpoint():
    from seqrec.config import OptimConfig
    from seqrec.optim import build_scheduler

    def scheduler():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, build_scheduler(optimizer, OptimConfig(warmup_steps=2), total_steps=1000)

    _, original = scheduler()
    original.lr_lambdas[0].total_steps = 12
    optimizer, restored = scheduler()
    restored.load_state_dict(original.state_dict())
    assert restored.lr_lambdas[0].total_steps == 12
    assert restored.lr_lambdas[0](7) == pytest.approx(lr_factor(7, 2, 12, "linear"))


class _TickingClock:
    """time.perf_counter for the training loop that advances one second per reading: the loop's
    clock readings per epoch are fixed by its code path, so epochs take equal 'time' and the
    time-budget logic is exercised deterministically."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


@pytest.mark.parametrize("fit", [True, False])
def test_time_budget_ends_the_learning_rate_decay_where_training_stops(small_dataset, tmp_path, monkeypatch, fit):
    import types

    import seqrec.train as train_module

    clock = _TickingClock()
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    overrides = ("train.epochs=40", "train.time_limit_minutes=8.0", "train.log_every=1", "train.patience=100", "data.max_len=20",
                 "optim.warmup_steps=2", f"optim.fit_schedule_to_time_limit={str(fit).lower()}")
    metrics = run(_config(small_dataset, tmp_path / "run", *overrides)).metrics
    assert 2 < metrics["epochs_run"] < 40, "the clock's budget, not train.epochs, ends the run"
    lrs = [row["lr"] for row in read_history(tmp_path / "run") if "loss" in row]
    if fit:
        assert metrics["schedule_steps"] == metrics["steps"], "the decay was re-planned to end at the last step"
        assert lrs[-1] < 0.05 * max(lrs)
    else:
        assert metrics["schedule_steps"] > 5 * metrics["steps"]
        assert lrs[-1] > 0.5 * max(lrs)


def test_each_phase_of_a_step_is_a_named_profiler_range(small_dataset, tmp_path):
    from torch.profiler import ProfilerActivity, profile

    from seqrec.engine import PHASES

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        run(_config(small_dataset, tmp_path / "run", "train.max_steps=2", "train.epochs=1", "data.max_len=20"))
    counts = {event.key: event.count for event in profiler.key_averages() if event.key in PHASES}
    # tiny.yaml runs ZeRO-0 in fp32 with clipping, so the job clips: every phase, once per step.
    assert counts == {phase: 2 for phase in PHASES}, counts


def test_time_budget_plans_with_the_validation_period_when_validating_every_kth_epoch(small_dataset, tmp_path, monkeypatch):
    import types

    import seqrec.train as train_module

    clock = _TickingClock()
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    real_evaluate = train_module.evaluate_model

    def slow_evaluate(*args, **kwargs):
        clock.now += 40.0  # validation costs about as much as an epoch's training here
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_model", slow_evaluate)
    overrides = ("train.epochs=60", "train.time_limit_minutes=10.0", "train.log_every=1", "train.patience=100", "data.max_len=20",
                 "optim.warmup_steps=2", "train.eval_every=2")
    metrics = run(_config(small_dataset, tmp_path / "run", *overrides)).metrics
    assert 4 < metrics["epochs_run"] < 60
    lrs = [row["lr"] for row in read_history(tmp_path / "run") if "loss" in row]
    decay = lrs[2:]
    # Planned from one epoch's cycle, the end of the decay swung with every other epoch's
    # validation and the learning rate went up and down; planned from the period, it only falls.
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(decay, decay[1:])), decay
    assert lrs[-1] < 0.2 * max(lrs)


def test_contrast_between_views_trains_through_the_loop_and_is_logged(small_dataset, tmp_path):
    overrides = ("train.max_steps=3", "train.log_every=1", "loss.contrastive_weight=0.5", "loss.contrastive_views=2", "data.max_len=20")
    result = run(_config(small_dataset, tmp_path / "run", *overrides))
    assert result.metrics["steps"] == 3
    logged = [row for row in read_history(tmp_path / "run") if "loss" in row]
    assert len(logged) == 3
    for row in logged:
        assert row["loss_contrastive"] > 0
        assert row["loss"] == pytest.approx(row["loss_masked"] + 0.5 * row["loss_contrastive"], rel=1e-4)


def test_row_item_exclusion_reaches_the_training_loss_and_warns_without_history_exclusion(small_dataset, tmp_path, monkeypatch, caplog):
    import seqrec.model as model_module

    left_out = []
    real_loss = model_module.catalog_cross_entropy
    monkeypatch.setattr(model_module, "catalog_cross_entropy",
                        lambda *args: (left_out.append(args[5] if len(args) > 5 else None), real_loss(*args))[1])
    run(_config(small_dataset, tmp_path / "default", "train.max_steps=1"))
    assert left_out and all(excluded is not None and excluded.shape[1] > 0 for excluded in left_out)
    assert "eval.exclude_history is off" not in caplog.text
    left_out.clear()
    run(_config(small_dataset, tmp_path / "off", "train.max_steps=1", "loss.exclude_row_items=false"))
    assert left_out and all(excluded is None for excluded in left_out)
    run(_config(small_dataset, tmp_path / "mismatch", "train.max_steps=1", "eval.exclude_history=false"))
    assert "eval.exclude_history is off" in caplog.text


def test_label_smoothing_reaches_the_training_loss(small_dataset, tmp_path, monkeypatch):
    import seqrec.model as model_module

    smoothing = []
    real_loss = model_module.catalog_cross_entropy
    monkeypatch.setattr(model_module, "catalog_cross_entropy", lambda *args: (smoothing.append(args[6]), real_loss(*args))[1])
    run(_config(small_dataset, tmp_path / "default", "train.max_steps=1"))
    assert smoothing and set(smoothing) == {0.0}
    smoothing.clear()
    run(_config(small_dataset, tmp_path / "smoothed", "train.max_steps=1", "loss.label_smoothing=0.25"))
    assert smoothing and set(smoothing) == {0.25}


def test_checkpoints_follow_the_clock_when_a_period_in_minutes_is_set(tiny_dataset, tmp_path, monkeypatch):
    from seqrec import train as train_module

    now = [0.0]
    monkeypatch.setattr(train_module, "_clock", lambda: now[0])
    original = train_module._Trainer._step

    def step_of_20_seconds(self, micro_batches):
        now[0] += 20.0
        return original(self, micro_batches)

    monkeypatch.setattr(train_module._Trainer, "_step", step_of_20_seconds)
    run_dir = tmp_path / "run"
    result = run(_config(tiny_dataset, run_dir, "train.epochs=3", "train.checkpoint_every_minutes=1", "train.keep_checkpoints=100"))
    total = result.metrics["steps"]
    saved = sorted(int(path.name.removeprefix("step_")) for path in (run_dir / "checkpoints").iterdir())
    # A minute is 3 steps here: saved before the 4th, 7th, ... step (across epoch ends), and at the end.
    assert total > 9 and saved == [*range(3, total, 3), total]
