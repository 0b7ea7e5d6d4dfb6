"""Which resumes take DeepSpeed's universal format, and conversions that fail leave nothing behind.
Resumes across layouts and numbers of processes themselves: tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from seqrec import universal
from seqrec.errors import ConfigError
from seqrec.optim import ParameterGroup
from seqrec.universal import FLAT, PARAMETERS, REPLICATED


def test_the_layout_is_read_from_the_files_deepspeed_wrote(tmp_path):
    for name, files in {
        "zero0": ["mp_rank_00_model_states.pt"],
        "zero2": ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
        "bf16": ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"],
        "zero3": ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
    }.items():
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).touch()
    assert [universal.written_layout(tmp_path / name) for name in ("zero0", "zero2", "bf16", "zero3")] == [REPLICATED, FLAT, FLAT, PARAMETERS]
    assert [universal.layout_of(stage, False) for stage in range(4)] == [REPLICATED, FLAT, FLAT, PARAMETERS]
    assert universal.layout_of(0, True) == FLAT


def test_only_zero0_loads_natively_on_another_number_of_processes():
    assert not universal.needed(REPLICATED, 2, REPLICATED, 1)
    assert not universal.needed(FLAT, 2, FLAT, 2) and not universal.needed(PARAMETERS, 4, PARAMETERS, 4)
    assert universal.needed(FLAT, 2, FLAT, 1) and universal.needed(PARAMETERS, 1, PARAMETERS, 2)
    assert universal.needed(REPLICATED, 2, FLAT, 2) and universal.needed(FLAT, 2, PARAMETERS, 2) and universal.needed(PARAMETERS, 2, REPLICATED, 2)


def test_a_corrupt_partition_fails_by_name_and_leaves_no_conversion(tmp_path):
    written = tmp_path / "step_00000004"
    written.mkdir()
    (written / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    (written / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "universal-step_00000004"
    with pytest.raises(ConfigError, match=f"could not convert {written} to its universal format"):
        universal.convert(written, FLAT, [], out)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step_00000004"]


def test_a_zero0_checkpoint_of_another_model_is_refused(tmp_path):
    written = tmp_path / "step_00000004"
    written.mkdir()
    weight = torch.nn.Parameter(torch.ones(3, 2))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    torch.save({"module": {"weight": weight.detach()}, "optimizer": optimizer.state_dict()}, written / "mp_rank_00_model_states.pt")
    two = [ParameterGroup(1e-3, 0.0, ("weight", "bias"), (weight, torch.nn.Parameter(torch.ones(2))))]
    with pytest.raises(ConfigError, match="does not match this model's 2 trained parameters"):
        universal.convert(written, REPLICATED, two, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()

    one = [ParameterGroup(1e-3, 0.0, ("weight",), (weight,))]
    universal.convert(written, REPLICATED, one, tmp_path / "out")
    saved = torch.load(tmp_path / "out" / "zero" / "weight" / "exp_avg.pt", weights_only=False)["param"]
    assert torch.equal(saved, optimizer.state[weight]["exp_avg"])
    assert float(torch.load(tmp_path / "out" / "zero" / "weight" / "step.pt", weights_only=False)) == 1.0
    assert (tmp_path / "out" / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file()


def test_after_a_partitioned_load_each_step_lives_where_its_kernel_reads_it():
    """DeepSpeed's universal loader leaves steps on the CPU and shares one among parameters; fused
    AdamW on a GPU refuses a CPU step, and a shared one is advanced once per parameter. The meta
    device stands in for the GPU. ZeRO-3 keeps only the sub-group being stepped in param_groups,
    so the other partitions' states count too."""
    from types import SimpleNamespace

    stepped, other_sub_group = torch.empty(4, device="meta"), torch.empty(4, device="meta")
    shared = torch.tensor(7.0)
    inner = SimpleNamespace(param_groups=[{"params": [stepped], "fused": True, "weight_decay": 1.0}],
                            state={stepped: {"step": shared}, other_sub_group: {"step": shared}})
    engine = SimpleNamespace(optimizer=SimpleNamespace(param_groups=inner.param_groups, optimizer=inner))
    universal._restore_group_settings(engine, [{"weight_decay": 0.5}])
    steps = [inner.state[parameter]["step"] for parameter in (stepped, other_sub_group)]
    assert [step.device.type for step in steps] == ["meta", "meta"]
    assert steps[0] is not steps[1] and shared.device.type == "cpu"
    assert inner.param_groups[0]["weight_decay"] == 0.5

    on_cpu = torch.zeros(4)
    unfused = SimpleNamespace(param_groups=[{"params": [on_cpu], "fused": None}], state={on_cpu: {"step": shared}})
    universal._restore_group_settings(SimpleNamespace(optimizer=SimpleNamespace(param_groups=unfused.param_groups, optimizer=unfused)), [{}])
    step = unfused.state[on_cpu]["step"]
    assert step.device.type == "cpu" and step is not shared and step.dtype == torch.float32 and float(step) == 7.0
