"""TensorBoard scalars of a training run (`remix-train train --log-dir DIR`; rank 0 writes).

Per step: the step record's figures (train/loss, train/ess, train/reward_spread: the mean over
sequences of the standard deviation of the M selections' losses, RLOO's signal; eval/... when
evaluated), each parameter group's learning rate (lr/lora, lr/router), throughput/tokens_per_s;
per layer, the mean over its modules of the ESS and of the effective LoRAs in use, from the
step's training routing (routing/) and from evaluation (eval_routing/).
"""

from __future__ import annotations

import os


def per_layer(routing: dict, num_layers: int) -> dict[str, list[float]]:
    """Mean over each layer's modules of the routing figures, plus summed usage counts."""
    out: dict[str, list] = {
        "mean_ess": [],
        "effective_loras": [],
        "mean_router_entropy": [],
        "counts": [],
    }
    for layer in range(num_layers):
        mods = [v for k, v in routing.items() if k.startswith(f"model.layers.{layer}.")]
        for key in ("mean_ess", "effective_loras", "mean_router_entropy"):
            out[key].append(sum(m[key] for m in mods) / len(mods))
        out["counts"].append([sum(c) for c in zip(*(m["counts"] for m in mods), strict=True)])
    return out


class TensorBoardLog:
    def __init__(self, log_dir: str | os.PathLike) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def step(self, record: dict, lrs: dict[str, float], routing: dict, num_layers: int) -> None:
        """One step's scalars: `record` (a history entry), the groups' learning rates, and the
        per-module routing summary (RoutingStats.summary()) of its training forwards."""
        step = record["step"]
        for key, value in record.items():
            if key in ("step", "lr", "elapsed_s", "tokens_per_s") or not isinstance(value, float):
                continue
            group, name = ("eval", key[5:]) if key.startswith("eval_") else ("train", key)
            self.writer.add_scalar(f"{group}/{name}", value, step)
        for group, lr in lrs.items():
            self.writer.add_scalar(f"lr/{group}", lr, step)
        if "tokens_per_s" in record:
            self.writer.add_scalar("throughput/tokens_per_s", record["tokens_per_s"], step)
        self.routing("routing", routing, num_layers, step)

    def routing(self, prefix: str, routing: dict, num_layers: int, step: int) -> None:
        if not routing:  # no routing decided (domain routing forces it)
            return
        layers = per_layer(routing, num_layers)
        for layer in range(num_layers):
            self.writer.add_scalar(f"{prefix}/ess/layer{layer}", layers["mean_ess"][layer], step)
            self.writer.add_scalar(
                f"{prefix}/effective_loras/layer{layer}", layers["effective_loras"][layer], step
            )

    def close(self) -> None:
        self.writer.close()
