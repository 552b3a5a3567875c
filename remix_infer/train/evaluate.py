"""Greedy generation and exact-match accuracy with the reference model."""

from __future__ import annotations

import torch

from remix_infer.train.data import Example


@torch.no_grad()
def greedy_complete(
    model: torch.nn.Module,
    tokenizer,  # noqa: ANN001 - any transformers tokenizer
    prompts: list[str],
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> list[str]:
    """Greedy completions (BOS + prompt, as in training), left-padded batches, EOS stops."""
    model.eval()
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            bos + tokenizer(p, add_special_tokens=False)["input_ids"]
            for p in prompts[start : start + batch_size]
        ]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return outputs


def exact_match(
    model: torch.nn.Module,
    tokenizer,  # noqa: ANN001
    examples: list[Example],
    max_new_tokens: int = 16,
) -> list[bool]:
    """Whether each greedy completion equals the reference completion (surrounding spaces ignored)."""
    got = greedy_complete(model, tokenizer, [e.prompt for e in examples], max_new_tokens)
    return [g.strip() == e.completion.strip() for g, e in zip(got, examples, strict=True)]
