"""Pipeline parallelism with ``torch.distributed.pipelining`` (GPipe schedule) for the r1zero model.

    stage = build_stage(model, pp_rank, pp_size, device, pp_group)     # this rank's layers
    pipe = Pipeline(stage, n_microbatches=grad_accum, loss_fn=...)
    loss, lm = pipe.step(x_MS)        # x_MS = the grad_accum micro-batches stacked on dim 0

Stage ``s`` of ``pp`` runs decoder layers ``[s*L/pp, (s+1)*L/pp)``; the first stage also owns the
embedding, the last the final norm and LM head. The pipeline micro-batches are exactly the
``grad_accum`` micro-batches of the data-parallel engines, so the MoE aux loss (which depends on
the micro-batch composition) is identical to the world=1 run.

The MoE aux/z losses of every stage travel down the pipe as a ``[B]`` tensor next to the hidden
states (each stage adds its layers' terms), so the last stage's loss is ``LM + all aux`` and its
backward reaches the routers of every stage. With tied embeddings the first stage's embedding
and the last stage's LM head are two copies of one weight: their gradients are summed over the
pipeline group before the optimizer step (Megatron's "embedding group" all-reduce).

Legend: B micro-batch rows, S sequence, D d_model, V vocab, M = grad_accum * B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe


def stage_layers(n_layers: int, pp_rank: int, pp_size: int) -> list[int]:
    per = n_layers // pp_size
    return list(range(pp_rank * per, (pp_rank + 1) * per))


class StageModule(nn.Module):
    """The slice of an ``R1ZeroForCausalLM`` that one pipeline stage runs (shares its parameters)."""

    def __init__(self, model, pp_rank: int, pp_size: int):
        super().__init__()
        cfg = model.config
        self.first, self.last = pp_rank == 0, pp_rank == pp_size - 1
        self.layer_ids = stage_layers(cfg.num_hidden_layers, pp_rank, pp_size)
        self.embed_tokens = model.model.embed_tokens if self.first else None
        self.layers = nn.ModuleList([model.model.layers[i] for i in self.layer_ids])
        self.norm = model.model.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        self.rotary = model.model.rotary
        self.aux_coef, self.z_coef = cfg.aux_loss_coef, cfg.z_loss_coef

    def _aux(self) -> torch.Tensor | None:
        moes = [layer.mlp for layer in self.layers if hasattr(layer.mlp, "aux_loss")]
        if not moes:
            return None
        aux = self.aux_coef * torch.stack([m.aux_loss for m in moes]).sum()
        return aux + self.z_coef * torch.stack([m.z_loss for m in moes]).sum()

    def forward(self, x, aux_B=None):
        from r1zero.model.layers import attention_mask_4d

        h_BSD = self.embed_tokens(x) if self.first else x
        B, S = h_BSD.shape[:2]
        if aux_B is None:
            aux_B = torch.zeros(B, device=h_BSD.device, dtype=torch.float32)
        pos_BS = torch.arange(S, device=h_BSD.device)[None].expand(B, S)
        cos_sin = self.rotary(pos_BS, h_BSD.dtype)
        mask = attention_mask_4d(None, S, 0, B, h_BSD.device)
        for layer in self.layers:
            h_BSD = layer(h_BSD, cos_sin, mask, None)
        aux = self._aux()
        if aux is not None:
            aux_B = aux_B + aux.float()  # broadcast: every row carries the micro-batch's aux term
        if self.last:
            return self.lm_head(self.norm(h_BSD)), aux_B
        return h_BSD, aux_B


class Pipeline:
    """One ``ScheduleGPipe`` over this rank's stage; ``step`` returns (mean loss, mean LM loss) on the last stage."""

    def __init__(self, stage_module: StageModule, pp_rank: int, pp_size: int, device, group, n_microbatches: int):
        self.module = stage_module
        self.rank, self.size, self.n = pp_rank, pp_size, n_microbatches
        self.stage = PipelineStage(stage_module, pp_rank, pp_size, device, group=group)
        self._lm: list[torch.Tensor] = []
        self.schedule = ScheduleGPipe(self.stage, n_microbatches=n_microbatches, loss_fn=self._loss,
                                      scale_grads=True)

    def _loss(self, output, target_BS):
        logits_BSV, aux_B = output
        V = logits_BSV.shape[-1]
        # same next-token loss as R1ZeroForCausalLM.forward (position t predicts t+1)
        lm = F.cross_entropy(logits_BSV[:, :-1].reshape(-1, V).float(), target_BS[:, 1:].reshape(-1))
        self._lm.append(lm.detach())
        return lm + aux_B.mean()

    def step(self, x_MS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._lm = []
        losses: list[torch.Tensor] = []
        if self.rank == 0 and self.size == 1:
            self.schedule.step(x_MS, target=x_MS, losses=losses)
        elif self.rank == 0:
            self.schedule.step(x_MS)
        elif self.rank == self.size - 1:
            self.schedule.step(target=x_MS, losses=losses)
        else:
            self.schedule.step()
        if losses:
            return torch.stack([v.detach() for v in losses]).mean(), torch.stack(self._lm).mean()
        zero = torch.zeros(())
        return zero, zero
