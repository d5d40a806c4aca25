"""gated (AutoLoRA's fine-grained gated fusion, Li et al. 2025): the LoRAs stay unmerged and every adapted layer
of the denoiser joins their outputs through learned gates, per token and channel, that also read the timestep
(`composer.gates`). The gates are trained per LoRA set with the denoising loss on pictures of the set's
concepts (`composer.train.gates`, `lora-studio train-gates`) and kept in the catalog with the set; the text
encoders see the whole stack, as with merge.

With no trained gates for the set the gates are untrained, and untrained gates are a merge: the method says so
(a warning in the log and `gates: untrained` in the render's method report). Cost: one denoiser pass per step,
each adapted layer computing every LoRA's output apart plus the gates' element-wise work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from composer.gates import GateBank, gated_denoiser
from composer.methods.base import CompositionParams, MethodRun

log = logging.getLogger(__name__)

__all__ = ["GateBank", "GatedParams"]


@dataclass(frozen=True)
class GatedParams(CompositionParams):
    """Which gates fuse the stack: the set's trained gates from the catalog, or untrained ones (a merge)."""

    needs_gates: ClassVar[bool] = True

    gates: Literal["stored", "untrained"] = field(
        default="stored",
        metadata={
            "help": "stored: the set's trained gates (lora-studio train-gates; untrained, as a merge, when "
            "there are none); untrained: merge-equivalent gates"
        },
    )

    def check(self, stack: list[str]) -> None:
        return None

    @contextmanager
    def apply(self, run: MethodRun) -> Iterator[None]:
        with run.host.activate(run.scales):  # text encoders: the whole stack
            if not run.stack:
                yield
                return
            denoiser = getattr(run.pipe, run.backbone.denoiser)
            bank = GateBank.for_stack(run.host, run.backbone.denoiser, [e.resident for e in run.stack])
            bank.to(denoiser.device)
            names = ", ".join(e.name for e in run.stack)
            if self.gates == "stored" and run.gates is not None:
                bank.load(run.gates.tensors)
                record = run.gates.record
                run.report["gates"] = "trained"
                run.report["gate_training"] = {
                    k: record[k] for k in ("steps", "seconds", "loss_first", "loss_last") if k in record
                }
            elif self.gates == "stored":
                log.warning(
                    "gated: no trained gates for the set %s on this model; rendering with untrained gates, "
                    "which equal a merge (train them: lora-studio train-gates --loras ...)",
                    names,
                )
                run.report["gates"] = "untrained (no trained gates stored for this set: a merge)"
            else:
                run.report["gates"] = "untrained (asked for: a merge)"
            run.report["gate_parameters"] = bank.parameter_count()
            with gated_denoiser(denoiser, run.backbone, run.host, bank):
                yield
