"""Pipeline parallelism with ``torch.distributed.pipelining``: 1F1B (default) or GPipe over one
stage per rank, or interleaved 1F1B over ``v`` stages per rank.

    stage = build_stage(pm, device)                   # r1zero.train.parallelize (StageModule inside)
    pipe = Pipeline(stage, pp_rank, pp_size, n_microbatches=grad_accum, schedule="1f1b")
    both = pipe.step(x_MS)       # tensor([mean loss, mean LM loss]) on the last stage, zeros elsewhere

The pipeline micro-batches are exactly the ``grad_accum`` micro-batches of the other layouts, so
the MoE aux loss (which depends on the micro-batch composition) is identical to the world=1 run.
The MoE aux/z losses of every stage travel down the pipe as a ``[B]`` tensor beside the hidden
states (:class:`r1zero.train.parallelize.StageModule`), so the last stage's loss is ``LM + all
aux`` and its backward reaches the routers of every stage. ``Schedule1F1B`` needs at least
``pp`` micro-batches (validated by :class:`r1zero.train.parallel_dims.ParallelDims`); it keeps at
most ``pp - rank`` micro-batches' activations alive on a stage where GPipe keeps all of them.
The schedule scales the summed gradients by ``1 / n_microbatches`` (``scale_grads``), and with
FSDP2 it reduce-scatters once, after the last backward.

Interleaved 1F1B (``parallel.pp_schedule: interleaved_1f1b``, ``ScheduleInterleaved1F1B``):
``stage`` is the list of this rank's ``PipelineStage`` (one per :class:`StageChunk`, stages
``r, r + pp, ...`` of ``pp * v``); the bubble shrinks to ``(pp - 1) / v`` micro-batch times
(Narayanan et al. 2021 sec. 2.2.2) for ``v`` times the point-to-point messages. Stage 0 is on
rank 0 and the last stage on rank ``pp - 1``, so inputs and targets go where they do for 1F1B.

Legend: B micro-batch rows, S sequence, V vocab, M = grad_accum * B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe")


class Pipeline:
    """One schedule over this rank's stage; ``step`` returns the stage's (loss, LM loss) means."""

    def __init__(self, stage, pp_rank: int, pp_size: int, n_microbatches: int, schedule: str = "1f1b",
                 scale=None):
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        self.stage, self.rank, self.size, self.n = stage, pp_rank, pp_size, n_microbatches
        self._scale = scale or (lambda t: t)
        self._lm: list[torch.Tensor] = []
        if isinstance(stage, list) != (schedule == "interleaved_1f1b"):
            want = "a list of stages" if schedule == "interleaved_1f1b" else "one stage"
            raise ValueError(f"pipeline schedule {schedule} runs {want} per rank")
        cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved_1f1b": ScheduleInterleaved1F1B}[schedule]
        self.schedule = cls(stage, n_microbatches=n_microbatches, loss_fn=self._loss, scale_grads=True)

    def _loss(self, output, target_BS):
        logits_BSV, aux_B = output
        V = logits_BSV.shape[-1]
        # same next-token loss as R1ZeroForCausalLM.forward (position t predicts t+1)
        lm = F.cross_entropy(logits_BSV[:, :-1].reshape(-1, V).float(), target_BS[:, 1:].reshape(-1))
        self._lm.append(lm.detach())
        return self._scale(lm + aux_B.mean())

    def step(self, x_MS: torch.Tensor) -> torch.Tensor:
        self._lm = []
        losses: list[torch.Tensor] = []
        if self.rank == 0:
            self.schedule.step(x_MS)
        elif self.rank == self.size - 1:
            self.schedule.step(target=x_MS, losses=losses)
        else:
            self.schedule.step()
        if losses:
            lm = torch.stack(self._lm).mean()
            # the schedule returns the (possibly fp16-scaled) losses; unscale via the LM part's ratio
            total = torch.stack([v.detach().float() for v in losses]).mean()
            scale = float(self._scale(torch.ones((), device=total.device)))
            return torch.stack([total / scale, lm.float()])
        return torch.zeros(2, device=x_MS.device)
