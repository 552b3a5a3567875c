"""The shared routing scope's router: one routing decision per token for the whole model.

MoR-LoRA routes once per token, from the first layer's input (the normed hidden state that
layer 0's q/k/v projections read), and applies the chosen LoRA in every adapted module. The
pool of layer 0's attention input projection calls `route` with its input; every pool then
reads `logits(T)` instead of running its own router, so the router product runs once per token.
Each pool still takes the top-k of these logits itself (the same choice everywhere), which keeps
the routing kernels, their statistics and their custom ops as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SharedRouter(nn.Module):
    """weight [n, d_model] and bias [n] in float32; the step's logits in a buffer [T_max, n]."""

    def __init__(
        self,
        num_loras: int,
        d_model: int,
        max_step_tokens: int,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()

        def frozen(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=torch.float32, device=device), False)

        self.weight = frozen(num_loras, d_model)
        self.bias = frozen(num_loras) if bias else None
        self.register_buffer(
            "step_logits",
            torch.zeros(max_step_tokens, num_loras, dtype=torch.float32, device=device),
            persistent=False,
        )

    def route(self, x: torch.Tensor) -> None:
        """Compute this step's logits from the first layer's input x [T, d_model]."""
        self.step_logits[: x.shape[0]].copy_(F.linear(x.float(), self.weight, self.bias))

    def logits(self, tokens: int) -> torch.Tensor:
        """This step's logits [T, n] (float32), as `route` left them."""
        return self.step_logits[:tokens]
