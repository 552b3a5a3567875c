"""The serving layer: the ReMix term of one vLLM parallel linear, fused and tensor-parallel.

A vLLM projection may be merged (qkv_proj = [q | k | v], gate_up_proj = [gate | up]); each of
its S targeted parts has its own pool of n LoRAs and router. Per forward of T tokens:

    h       = x @ [A_all ; P_all]^T          one GEMM: all S*n LoRA A's and S routers
    (row-parallel: x holds this rank's input slice, so h is partial: one all-reduce of T x S*(n*r+n))
    logits  = h[:, S*n*r:] (+ bias)            -> deterministic top-k per part, gates [T, S, n]
    delta_s = (h_s * gates_s) @ B_s^T           masked pool, one GEMM per part
    y       = base(x) + [delta_q | delta_k | delta_v]

Static shapes, no host sync, no Python loop over tokens. Sharding follows the base layer:
column-parallel layers replicate A and the router (their input is whole) and split B's rows
like the base weight; row-parallel layers split A and the router along d_in and replicate B.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from remix_infer.config import RemixConfig
from remix_infer.routing import routing_gates, topk_select
from remix_infer.vllm_plugin.stats import RoutingCounters


def linear_kernel(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x @ weight.T with the kernel vLLM would use for a linear layer of this weight."""
    if weight.device.type == "cpu":
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        holder = SimpleNamespace(weight=weight, bias=None)
        dispatch_cpu_unquantized_gemm(holder, remove_weight=False)
        return lambda x: holder.cpu_linear(x, weight, None)
    return lambda x: F.linear(x, weight)


class RemixAdapter(nn.Module):
    """Adapter tensors and routing of one (possibly merged) parallel linear, sharded for this rank."""

    def __init__(
        self,
        config: RemixConfig,
        part_names: list[str | None],
        in_size: int,
        out_sizes: list[int],
        reduce_input: bool,
        dtype: torch.dtype,
        name: str,
        max_step_tokens: int,
    ) -> None:
        """part_names: the HF module of each output part (None = part not adapted);
        in_size / out_sizes: this rank's input width and per-part output widths;
        reduce_input: the input is a row-parallel slice, so partial products need an all-reduce;
        max_step_tokens: the most tokens one forward carries (vLLM's max_num_batched_tokens)."""
        super().__init__()
        self.name = name
        self.part_names = part_names
        self.targets = [i for i, p in enumerate(part_names) if p is not None]
        self.out_sizes = out_sizes
        self.reduce_input = reduce_input
        n, r, s = config.num_loras, config.rank, len(self.targets)
        self.num_loras, self.rank, self.top_k, self.num_parts = n, r, config.top_k, s
        self.omega, self.weighting = config.omega, config.weighting
        # Rows: [A of part 0 (n*r) | ... | A of part S-1 | router of part 0 (n) | ...].
        self.a_router = nn.Parameter(
            torch.zeros(s * n * r + s * n, in_size, dtype=dtype), requires_grad=False
        )
        self.router_bias = (
            nn.Parameter(torch.zeros(s, n, dtype=dtype), requires_grad=False)
            if config.router_bias
            else None
        )
        # B of each adapted part as [d_out_local, n*r]: column j*r + c is rank c of LoRA j.
        self.lora_b = nn.ParameterList(
            nn.Parameter(torch.zeros(out_sizes[i], n * r, dtype=dtype), requires_grad=False)
            for i in self.targets
        )
        offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
        self._part_columns = [slice(offsets[i], offsets[i] + out_sizes[i]) for i in self.targets]
        self.prepare_kernels()
        self.counters = RoutingCounters(
            name, s, n, config.top_k if config.weighting == "constant" else None, max_step_tokens
        )
        # Debug/test hook (eager mode): keep every forward's selections [T, S, k] while on.
        self.capture_selections = False
        self.captured: list[torch.Tensor] = []

    def prepare_kernels(self) -> None:
        """Pick the matrix-product kernels for the current weights (call again after loading):
        on CPU, vLLM's own GEMM dispatch (oneDNN with prepacked weights, the kernel the base
        layer uses, about 1.4x torch's on the LoRA-B shapes here); elsewhere F.linear."""
        self._product_a_router = linear_kernel(self.a_router)
        self._product_b = [linear_kernel(b) for b in self.lora_b]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """base_out + the ReMix term, added in place into each adapted part's output columns."""
        lora_h, logits = self.project(x)
        selected = topk_select(logits, self.top_k)  # [T, S, k]
        gates = routing_gates(logits, selected, self.omega, self.weighting)  # [T, S, n]
        self.counters.record(logits, gates)
        if self.capture_selections:
            self.captured.append(selected.detach().clone())
        return self.add_pool_outputs(lora_h, gates, base_out)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One GEMM for every LoRA A and router: hidden states [T, S*n*r], logits [T, S, n]."""
        n, s = self.num_loras, self.num_parts
        h = self._product_a_router(x)
        if self.reduce_input:
            from vllm.distributed import tensor_model_parallel_all_reduce

            h = tensor_model_parallel_all_reduce(h)
        lora_h, logits = h.split([s * n * self.rank, s * n], dim=-1)
        logits = logits.unflatten(-1, (s, n)).float()
        if self.router_bias is not None:
            logits = logits + self.router_bias.float()
        return lora_h, logits

    def add_pool_outputs(
        self, lora_h: torch.Tensor, gates: torch.Tensor, base_out: torch.Tensor
    ) -> torch.Tensor:
        """base_out += each part's gated pool output (its B GEMM over the gated hidden states)."""
        n, r, s = self.num_loras, self.rank, self.num_parts
        # Gate the pool's hidden states, written part-major ([S, T, n*r]) so that each part's
        # B product reads a contiguous matrix.
        tokens = lora_h.shape[0]
        hidden = lora_h.new_empty(s, tokens, n * r)
        torch.mul(
            lora_h.view(tokens, s, n, r).transpose(0, 1),
            gates.to(lora_h.dtype).transpose(0, 1).unsqueeze(-1),
            out=hidden.view(s, tokens, n, r),
        )
        for j, (columns, product) in enumerate(
            zip(self._part_columns, self._product_b, strict=True)
        ):
            base_out[:, columns].add_(product(hidden[j]))
        return base_out

    @torch.no_grad()
    def load_part(
        self,
        part: int,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        router_weight: torch.Tensor,
        router_bias: torch.Tensor | None,
        in_slice: slice,
        out_rows: torch.Tensor,
    ) -> None:
        """Copy one part's full checkpoint tensors, keeping this rank's shard.

        in_slice: the input columns this rank sees; out_rows: the output rows it computes.
        """
        n, r = self.num_loras, self.rank
        j = self.targets.index(part)
        self.a_router[j * n * r : (j + 1) * n * r].copy_(lora_a.reshape(n * r, -1)[:, in_slice])
        base = self.num_parts * n * r
        self.a_router[base + j * n : base + (j + 1) * n].copy_(router_weight[:, in_slice])
        if self.router_bias is not None:
            self.router_bias[j].copy_(router_bias)
        b = lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], n * r)  # [d_out, n*r]
        self.lora_b[j].copy_(b[out_rows])
