"""Routing statistics accumulated on the device inside the engine's forward.

Each adapted (part of a) projection keeps one float64 buffer `stats` of shape [S, n + 3]:

    stats[s, :n]   selections of each LoRA (a token choosing k LoRAs adds 1 to k of them)
    stats[s, n]    tokens routed
    stats[s, n+1]  summed router entropy, nats: H(softmax(logits)) per token
    stats[s, n+2]  summed effective support size of the routing weights, ESS = (sum w)^2 / sum w^2
                   (exactly k per token for ReMix; lower when softmax_topk weights collapse)

Padding rows (CUDA-graph padding, marked by vLLM's forward context) are excluded. The update is
one custom op that mutates the buffer, so compiled graphs keep it and nothing syncs with the host.
"""

from __future__ import annotations

import torch
from torch import nn

from remix_infer.routing import effective_support_size, entropy

EXTRA_COLUMNS = 3  # tokens, entropy sum, ESS sum


def _real_token_weights(num_tokens: int, device: torch.device) -> torch.Tensor:
    """1.0 for real tokens, 0.0 for padding rows, from vLLM's forward context when there is one."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if is_forward_context_available():
            padding = get_forward_context().is_padding
            if padding is not None and padding.shape[0] == num_tokens:
                return (~padding).to(torch.float64)
    except ImportError:
        pass
    return torch.ones(num_tokens, dtype=torch.float64, device=device)


def record_routing_impl(
    stats: torch.Tensor, logits: torch.Tensor, selected: torch.Tensor, weights: torch.Tensor
) -> None:
    """stats [S, n+3] += this batch's figures. logits [T, S, n], selected/weights [T, S, k]."""
    n = logits.shape[-1]
    w = _real_token_weights(logits.shape[0], logits.device)
    chosen = torch.zeros(logits.shape, dtype=torch.float64, device=logits.device)
    chosen.scatter_(-1, selected, 1.0)
    stats[:, :n] += torch.einsum("t,tsn->sn", w, chosen)
    stats[:, n] += w.sum()
    stats[:, n + 1] += torch.einsum("t,ts->s", w, entropy(torch.softmax(logits, -1)).double())
    stats[:, n + 2] += torch.einsum("t,ts->s", w, effective_support_size(weights).double())


def _record_routing_fake(
    stats: torch.Tensor, logits: torch.Tensor, selected: torch.Tensor, weights: torch.Tensor
) -> None:
    return None


def _register_op() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(
        op_name="remix_record_routing",
        op_func=record_routing_impl,
        mutates_args=["stats"],
        fake_impl=_record_routing_fake,
    )


_register_op()


class RoutingCounters(nn.Module):
    """The stats buffer of one adapter and the call that updates it."""

    def __init__(self, name: str, num_parts: int, num_loras: int) -> None:
        super().__init__()
        self.name = name
        self.register_buffer(
            "stats", torch.zeros(num_parts, num_loras + EXTRA_COLUMNS, dtype=torch.float64)
        )

    def record(self, logits: torch.Tensor, selected: torch.Tensor, weights: torch.Tensor) -> None:
        """logits [..., S, n], selected / weights [..., S, k]; leading dims are tokens."""
        s = logits.shape[-2:]
        torch.ops.vllm.remix_record_routing(
            self.stats,
            logits.reshape(-1, *s),
            selected.reshape(-1, *selected.shape[-2:]),
            weights.reshape(-1, *weights.shape[-2:]),
        )

    def reset(self) -> None:
        self.stats.zero_()
