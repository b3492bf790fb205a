"""PPO baseline pieces: a value head on the policy's final hidden states, and the value loss.

The head reads the input of the policy's output embedding (``lm_head``) through a forward hook,
so it works on any transformers causal LM (r1zero MoE, Llama, ...) without
``output_hidden_states``. Per-token rewards are the outcome reward on the last completion token
(and zero elsewhere); advantages come from :func:`r1zero.grpo.advantages.gae` and are whitened
over the batch, as in classic RLHF PPO (Ouyang et al. 2022; verl ``compute_gae_advantage_return``).

Value loss (clipped as in PPO2, Schulman et al. 2017 / OpenAI baselines):
    L_V = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - eps, V_old + eps) - R_t)^2)

Legend: B = completions, T = tokens, D = hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

VALUE_CLIP = 0.2  # PPO2 default cliprange_value


class ValueHead(nn.Module):
    """Scalar value per position from the hidden state feeding ``lm_head``."""

    def __init__(self, model):
        super().__init__()
        out_emb = model.get_output_embeddings()
        d = out_emb.weight.shape[1]
        self.proj = nn.Linear(d, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self._hidden = None
        self._handle = out_emb.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output):
        self._hidden = inputs[0]

    def values(self) -> torch.Tensor:
        """Values_BS of the last policy forward (call right after it)."""
        if self._hidden is None:
            raise RuntimeError("ValueHead: no policy forward captured")
        h, self._hidden = self._hidden, None
        return self.proj(h.float()).squeeze(-1)

    def remove(self) -> None:
        self._handle.remove()


def terminal_rewards(rewards_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Outcome reward on each completion's last real token, 0 elsewhere."""
    out_BT = torch.zeros(mask_BT.shape, dtype=torch.float32)
    lengths_B = mask_BT.sum(-1).long()
    has = lengths_B > 0
    rows = torch.arange(mask_BT.shape[0])[has]
    out_BT[rows, lengths_B[has] - 1] = rewards_B[has].float()
    return out_BT


def value_loss(values_BT: torch.Tensor, old_values_BT: torch.Tensor, returns_BT: torch.Tensor,
               mask_BT: torch.Tensor, clip: float = VALUE_CLIP) -> tuple[torch.Tensor, float]:
    """(sum of clipped squared errors * 0.5, token count) - divide after an all-reduce."""
    m = mask_BT.to(values_BT.dtype)
    clipped = old_values_BT + (values_BT - old_values_BT).clamp(-clip, clip)
    err = torch.maximum((values_BT - returns_BT) ** 2, (clipped - returns_BT) ** 2)
    return 0.5 * (err * m).sum(), float(m.sum())
