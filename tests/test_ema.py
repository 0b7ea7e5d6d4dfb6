"""The weight average (`train.ema_decay`): its arithmetic, the exact swap around evaluation, and
that a run with it trains the same steps while validating, keeping and exporting the average."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from seqrec.config import load_config
from seqrec.ema import WeightAverage
from seqrec.errors import ConfigError
from seqrec.export_eval import evaluate_export
from seqrec.tracking import read_history
from seqrec.train import run
from tests.conftest import REPO


def _parameters(*shapes):
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape, generator=generator)) for shape in shapes]


def test_average_weighs_each_step_by_its_decay_normalised_over_the_steps_so_far():
    parameters = _parameters((3, 4), (5,))
    average = WeightAverage(parameters, decay=0.9, partitioned=False)
    history = []
    for step in range(1, 30):
        with torch.no_grad():
            for parameter in parameters:
                parameter.add_(torch.full_like(parameter, 0.1 * step))
        average.update(step)
        history.append([parameter.detach().clone() for parameter in parameters])
    weights = torch.tensor([0.9 ** (len(history) - 1 - index) for index in range(len(history))], dtype=torch.float64)
    weights /= weights.sum()
    expected = [sum(float(weight) * step_weights[index] for weight, step_weights in zip(weights, history)) for index in range(len(parameters))]
    assert average.decay_at(1) == 0.0 and average.decay_at(2) == pytest.approx(0.9 * 0.1 / (1 - 0.81))
    assert average.decay_at(10_000) == pytest.approx(0.9)
    for got, want in zip(average.averages, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # The weights kept moving away, so the average trails them: the test can fail.
    assert all((got - parameter).abs().min() > 0.1 for got, parameter in zip(average.averages, parameters))


def test_applied_swaps_the_average_in_and_restores_the_trained_weights_bit_for_bit():
    parameters = _parameters((4, 4))
    average = WeightAverage(parameters, decay=0.5, partitioned=False)
    with average.applied():  # nothing averaged yet: the trained weights stay
        assert torch.equal(parameters[0], _parameters((4, 4))[0])
    average.update(1)
    with torch.no_grad():
        parameters[0].mul_(3.0).add_(0.1)
    average.update(1000)
    trained = parameters[0].detach().clone()
    with average.applied():
        assert torch.equal(parameters[0], average.averages[0])
        assert not torch.equal(parameters[0], trained)
    assert torch.equal(parameters[0], trained)
    with pytest.raises(RuntimeError, match="inside"):
        with average.applied():
            raise RuntimeError("inside")
    assert torch.equal(parameters[0], trained)


def test_saved_average_must_fit_the_model():
    average = WeightAverage(_parameters((2, 3)), decay=0.9, partitioned=False)
    average.load_state_dict({"0": torch.ones(2, 3)})
    assert torch.equal(average.averages[0], torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"tensor 0 saved as \(3, 2\)"):
        average.load_state_dict({"0": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="2 tensors saved"):
        average.load_state_dict({"0": torch.zeros(2, 3), "1": torch.zeros(1)})


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_ema_decay_outside_the_open_unit_interval_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"train.ema_decay: must be in \(0, 1\) or null"):
        load_config(None, [f"train.ema_decay={value}"])


def _config(dataset, run_dir, *overrides):
    return load_config(REPO / "configs" / "tiny.yaml", [f"data.dataset={dataset}", f"run_dir={run_dir}", *overrides])


def test_a_run_with_the_average_trains_the_same_steps_and_keeps_the_average(tiny_dataset, tmp_path):
    overrides = ("train.epochs=4", "train.precision=fp32", "train.log_every=1", "train.patience=100")
    plain = run(_config(tiny_dataset, tmp_path / "plain", *overrides)).metrics
    averaged = run(_config(tiny_dataset, tmp_path / "averaged", *overrides, "train.ema_decay=0.9")).metrics

    def losses(name):
        return {row["step"]: row["loss"] for row in read_history(tmp_path / name) if "loss" in row}

    # Swapping the average in for validation and back leaves training untouched, step for step.
    assert losses("averaged") == losses("plain")
    assert averaged["valid"] != plain["valid"]
    # The exported model is the average validation judged best: it scores what was logged.
    for split in ("valid", "test"):
        exported = evaluate_export(tmp_path / "averaged" / "model", tiny_dataset, split, batch_size=64, ks=(1, 5, 10, 20))
        assert exported.model["NDCG@10"] == pytest.approx(averaged[split]["NDCG@10"], abs=1e-6), split


def test_resuming_restores_the_weight_average_from_the_checkpoint(tiny_dataset, tmp_path):
    overrides = ("train.max_steps=12", "train.checkpoint_every=10", "train.keep_checkpoints=5", "train.precision=fp32", "train.ema_decay=0.9")
    reference = run(_config(tiny_dataset, tmp_path / "reference", *overrides)).metrics
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "reference", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_00000012")
    resumed = run(_config(tiny_dataset, resumed_dir, *overrides), resume=str(resumed_dir / "checkpoints" / "step_00000010")).metrics
    assert resumed["resumed_from"].endswith("step_00000010")
    # Two steps after the resume the average still carries most of its history (a fresh one,
    # started from the resumed weights, differs): it must be the uninterrupted run's, bit for bit.
    final = "checkpoints/step_00000012/average_rank0.pt"
    saved, again = (torch.load(directory / final, weights_only=True) for directory in (tmp_path / "reference", resumed_dir))
    assert saved.keys() == again.keys() and all(torch.equal(saved[key], again[key]) for key in saved)
    assert resumed["test"] == pytest.approx(reference["test"], abs=1e-9)
    # A checkpoint's average that does not fit the model stops the resume, naming the file.
    bad = resumed_dir / "checkpoints" / "step_00000010" / "average_rank0.pt"
    torch.save({"0": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match=r"average_rank0\.pt: weight average: 1 tensors saved"):
        run(_config(tiny_dataset, resumed_dir, *overrides), resume=str(bad.parent))


def test_zero3_validates_and_keeps_the_same_average_as_zero0(tiny_dataset, tmp_path):
    """Two ranks each: ZeRO-3 averages partitions (and its replicated small weights, here with
    the item table partitioned too) where ZeRO-0 averages whole weights; the validated, kept
    and exported model must be the same."""
    from safetensors.torch import load_file

    from tests.test_distributed import WEIGHT_TOLERANCE, torchrun, train_args

    overrides = ("train.max_steps=10", "train.eval_every=1", "train.precision=fp32", "train.ema_decay=0.8")
    partition_everything = tmp_path / "zero3.json"
    partition_everything.write_text('{"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1000}}')
    runs = {
        "zero0": overrides,
        "zero3": (*overrides, f"distributed.deepspeed_config={partition_everything}"),
    }
    for name, settings in runs.items():
        result = torchrun(2, *train_args(tiny_dataset, tmp_path / name, *settings))
        assert result.returncode == 0, result.stderr[-3000:]
    zero0, zero3 = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in runs)
    assert zero3["zero_stage"] == 3 and zero0["zero_stage"] == 0
    assert zero3["valid"] == pytest.approx(zero0["valid"], abs=1e-6) and zero3["test"] == pytest.approx(zero0["test"], abs=1e-6)
    kept = [load_file(str(tmp_path / name / "model" / "model.safetensors")) for name in runs]
    assert max((kept[0][key] - kept[1][key]).abs().max().item() for key in kept[0]) < WEIGHT_TOLERANCE
    # And what was kept is the average, not the last step's weights (the final checkpoint's).
    last = torch.load(tmp_path / "zero0" / "checkpoints" / "step_00000010" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    table = "model.mlm.bert.embeddings.word_embeddings.weight"
    assert (last[table] - kept[0][table.removeprefix("model.mlm.")]).abs().max().item() > 10 * WEIGHT_TOLERANCE


def test_a_resume_under_another_zero_stage_carries_a_whole_average_and_restarts_a_partitioned_one(tiny_dataset, tmp_path, caplog):
    overrides = ("train.max_steps=12", "train.checkpoint_every=10", "train.keep_checkpoints=5", "train.precision=fp32", "train.ema_decay=0.9")
    run(_config(tiny_dataset, tmp_path / "zero2", *overrides, "distributed.zero_stage=2"))
    saved = tmp_path / "zero2" / "checkpoints" / "step_00000010"
    final = "checkpoints/step_00000012/average_rank0.pt"
    # ZeRO-2 and ZeRO-0 both average whole weights: the average carries over, and two steps on it
    # is the uninterrupted run's (to float rounding: the two stages sum gradients in other orders).
    run(_config(tiny_dataset, tmp_path / "zero0", *overrides, "distributed.zero_stage=0"), resume=str(saved))
    uninterrupted, carried = (torch.load(tmp_path / name / final, weights_only=True) for name in ("zero2", "zero0"))
    assert uninterrupted.keys() == carried.keys()
    assert max((uninterrupted[key] - carried[key]).abs().max().item() for key in uninterrupted) < 1e-5
    # ZeRO-3 averages its own partitions: it starts again from the resumed weights, and says so.
    with caplog.at_level(logging.WARNING, logger="seqrec.train"):
        run(_config(tiny_dataset, tmp_path / "zero3", *overrides, "distributed.zero_stage=3"), resume=str(saved))
    assert f"{saved} holds the weight average in another run's ZeRO-3 partitions" in caplog.text
    restarted = torch.load(tmp_path / "zero3" / final, weights_only=True)
    assert max((uninterrupted[key].flatten()[:8] - restarted[key].flatten()[:8]).abs().max().item() for key in restarted) > 1e-4
