"""Small real vLLM engines (CPU build) over small local checkpoints, for tests."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from helpers.models import make_tiny_base, tiny_remix_config

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault(
    "VLLM_CACHE_ROOT", str(Path(__file__).resolve().parents[2] / ".cache" / "vllm")
)


def make_parity_checkpoint(
    directory: Path,
    seed: int = 0,
    model_type: str = "llama",
    base: Path | None = None,
    **config_overrides,
) -> Path:
    """A tiny checkpoint whose LoRAs and routing visibly matter: adapters at full LoRA scale and
    a sharpened LM head, so greedy margins are far above float32 noise and a wrong LoRA shows.
    base: another parity checkpoint's base model to adapt (default: a new one in directory/base)."""
    from transformers import AutoModelForCausalLM

    from remix_infer.checkpoint import save_checkpoint
    from remix_infer.modeling import adapter_tensors, inject_remix

    if base is None:
        base = directory / "base"
        make_tiny_base(base, model_type=model_type, seed=seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            model.lm_head.weight.mul_(20.0)
        model.save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = tiny_remix_config(
        base_model=os.path.relpath(base, directory),
        omega=1.0,
        architecture=model_type,
        **config_overrides,
    )
    inject_remix(model, config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in adapter_tensors(model).items():
            scale = t.shape[-1] ** -0.5 if name.endswith(("lora_a", "always_a")) else 0.5
            t.copy_(torch.randn(t.shape, generator=gen) * scale)
    return save_checkpoint(directory, config, adapter_tensors(model))


@contextlib.contextmanager
def remix_llm(
    checkpoint: Path | dict[str, Path],
    in_process: bool = True,
    env: dict[str, str] | None = None,
    max_checkpoints: int | None = None,
    **overrides,
) -> Iterator:
    """A vllm.LLM serving `checkpoint` (or name -> checkpoint in slots 0, 1, ...; eager, float32,
    no tokenizer: prompts are token ids).

    in_process: the engine core runs in this process, so the prompts of one generate() call are
    scheduled together as one batch (with a core process, batches depend on arrival timing).
    Only one in-process engine per test process: a second one in the same process after the
    first (seen with compiled mode) decodes wrongly, so other engines run in their own process.
    env: vLLM environment variables for this engine (vLLM caches them after an engine starts).
    """
    import vllm.envs
    from vllm import LLM

    from remix_infer.vllm_plugin.engine import remix_engine_kwargs

    vllm.envs.disable_envs_cache()
    saved = dict(os.environ)
    os.environ.update(env or {})
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    kwargs = dict(
        enforce_eager=True,
        dtype="float32",
        max_model_len=128,
        max_num_seqs=32,
        max_num_batched_tokens=2048,
        gpu_memory_utilization=0.5,
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
        seed=0,
    )
    kwargs.update(overrides)
    try:
        llm = LLM(**remix_engine_kwargs(checkpoint, max_checkpoints), **kwargs)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        llm.collective_rpc("remix_prepare_pipeline_stage")  # as RemixEngine.start does
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def token_prompts(token_lists: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": ids} for ids in token_lists]


def greedy(llm, token_lists: list[list[int]], max_tokens: int = 8, prompt_logprobs: bool = False):  # noqa: ANN001, ANN201
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        ignore_eos=True,
        prompt_logprobs=0 if prompt_logprobs else None,
    )
    return llm.generate(token_prompts(token_lists), params, use_tqdm=False)


def captured_prefill_selections(llm, token_lists: list[list[int]]) -> list[dict[str, torch.Tensor]]:  # noqa: ANN001
    """Run the prompts (prefill only) and split the engine's per-token top-k choices back per
    prompt: one {module: [len, k]} dict per prompt, in submission (= scheduling) order."""
    llm.collective_rpc("remix_capture_selections", args=(True,))
    greedy(llm, token_lists, max_tokens=1)
    captured = {}  # every worker's: pipeline stages capture their own layers
    for worker in llm.collective_rpc("remix_captured_selections"):
        captured.update(worker)
    llm.collective_rpc("remix_capture_selections", args=(False,))
    total = sum(map(len, token_lists))
    out: list[dict[str, torch.Tensor]] = [{} for _ in token_lists]
    for module, rows in captured.items():
        rows = torch.tensor(rows)
        assert rows.shape[0] == total, (
            f"{module}: {rows.shape[0]} tokens captured, {total} in the batch"
        )
        for i, part in enumerate(rows.split([len(t) for t in token_lists])):
            out[i][module] = part
    return out
