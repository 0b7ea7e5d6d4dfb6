"""An exponential moving average of the model's weights (`train.ema_decay`), validated, kept as
the best model and exported in place of the last step's weights.

Validation, saving the best weights and export run inside `applied()`, which swaps the averages
in and restores the trained weights exactly afterwards, so training continues from its own.

Each rank averages the weights it owns: the whole model under ZeRO 0-2 (every rank's copy is
the same, so are the averages) and its partition (`ds_tensor`) of every weight under ZeRO-3, so
the average costs one fp32 copy of the rank's share and no communication. ZeRO-3 also keeps
whole copies of its small weights on every rank (`ds_persist`, under
stage3_param_persistence_threshold), gathered from the partitions after each step; the swap
releases those copies and gathers them again after, so evaluation reads the averages.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from seqrec.errors import ConfigError


class WeightAverage:
    def __init__(self, parameters: list[torch.nn.Parameter], decay: float, partitioned: bool):
        self.decay = decay
        self._parameters, self._partitioned = parameters, partitioned
        # None until the first update (or a resumed checkpoint's average): it starts from trained weights.
        self.averages: list[torch.Tensor] | None = None
        if partitioned:
            self._check_supported()

    def _live(self) -> list[torch.Tensor]:
        # Looked up each time: ZeRO-3 may re-seat a parameter's partition tensor.
        return [parameter.ds_tensor if self._partitioned else parameter for parameter in self._parameters]

    def _check_supported(self) -> None:
        """Evaluation must gather each weight from the partition the swap writes, not from
        ZeRO++'s secondary partition (hpZ) or one swapped out to NVMe."""
        for parameter in self._parameters:
            if getattr(parameter, "ds_secondary_tensor", None) is not None or str(parameter.ds_tensor.final_location).endswith("nvme"):
                raise ConfigError("train.ema_decay: not supported with ZeRO++ hierarchical partitions (zero_hpz_partition_size) "
                                  "or NVMe parameter offload; turn one of them off")

    def _check_released(self) -> None:
        """A partitioned weight still gathered at the swap would be evaluated from that copy."""
        for parameter in self._parameters:
            if parameter.ds_status.name != "NOT_AVAILABLE" and not parameter.ds_persist:
                raise RuntimeError(f"weight average: a ZeRO-3 weight is still gathered at the swap: {parameter.ds_summary()}")

    def _release_replicated(self) -> list[torch.nn.Parameter]:
        """Drop ZeRO-3's whole copies of its replicated weights (their partitions stay); returns
        those weights."""
        replicated = [parameter for parameter in self._parameters if parameter.ds_persist]
        gathered = [parameter for parameter in replicated if parameter.ds_status.name == "AVAILABLE"]
        if gathered:
            gathered[0].partition(param_list=gathered)
        return replicated

    def _regather_replicated(self) -> None:
        """Rebuild the replicated weights' whole copies from their partitions, as after a step."""
        replicated = self._release_replicated()
        if replicated:
            replicated[0].all_gather(param_list=replicated)

    def decay_at(self, step: int) -> float:
        """The decay folding in step `step`: d (1 - d^(t-1)) / (1 - d^t), so that after t steps the
        average weighs step s by d^(t-s), normalised over the steps so far (as Adam corrects its
        moments), not by a start at the initial weights. It is 0 at step 1 and tends to d. (A
        warm-up like min(d, (1 + t) / (10 + t)) instead caps the decay below 0.997 for the
        first 3,000 steps, whatever d asks for.)"""
        return self.decay * (1.0 - self.decay ** (step - 1)) / (1.0 - self.decay**step)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights after optimiser step `step` (1-based)."""
        live = [tensor.detach().float() for tensor in self._live()]
        if self.averages is None:  # from step 1, or from a later one if the run turned the average on at a resume
            self.averages = [tensor.clone() for tensor in live]
            return
        torch._foreach_lerp_(self.averages, live, 1.0 - self.decay_at(step))

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averages in place of the trained weights for the body; before the first update
        there is nothing averaged yet and the trained weights stay."""
        if self.averages is None:
            yield
            return
        if self._partitioned:
            self._check_released()
            self._release_replicated()
        live = self._live()
        with torch.no_grad():
            trained = [tensor.detach().clone() for tensor in live]
            for tensor, average in zip(live, self.averages):
                tensor.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for tensor, weights in zip(live, trained):
                    tensor.copy_(weights)
            if self._partitioned:
                self._regather_replicated()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.averages is None else {str(index): average for index, average in enumerate(self.averages)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            self.averages = None
            return
        shapes = [tensor.shape for tensor in self._live()]
        if len(state) != len(shapes):
            raise ValueError(f"weight average: {len(state)} tensors saved, the model has {len(shapes)}")
        for index, shape in enumerate(shapes):
            if state[str(index)].shape != shape:
                raise ValueError(f"weight average: tensor {index} saved as {tuple(state[str(index)].shape)}, the model's is {tuple(shape)}")
        self.averages = [state[str(index)].to(torch.float32, copy=True) for index in range(len(shapes))]
