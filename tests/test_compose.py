"""PEFT LoRAs (written and run by the real `peft` package) as ReMix checkpoints: import-peft,
compose's frozen pool, router-only training, the vLLM engine, and what is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.engines import greedy, remix_llm
from helpers.models import make_tiny_base, save_word_tokenizer
from reference import reference_run
from safetensors.torch import load_file, save_file

from remix_infer.checkpoint import load_checkpoint, save_checkpoint
from remix_infer.config import ALWAYS_B, LORA_A, ROUTER_BIAS, ROUTER_WEIGHT
from remix_infer.modeling import load_remix_model
from remix_infer.peft_adapter import PeftAdapterError
from remix_infer.train.cli import main as remix_train
from remix_infer.train.compose import (
    build_pool,
    compose,
    import_peft,
    read_base_model,
    read_experts,
)

LOGIT_TOL = 2e-5  # float32 PEFT forward vs float32 reference forward

# Three experts that exercise what PEFT's format can say about a LoRA.
EXPERTS = {
    "qv_patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"layers.1.self_attn.v_proj": 2},
        alpha_pattern={"v_proj": 3},
    ),
    "all_rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear"),
    "late_layer": dict(
        r=2, lora_alpha=16, target_modules=["o_proj", "down_proj"], layers_to_transform=[1]
    ),
}


def train_peft_lora(base: Path, out: Path, seed: int = 0, steps: int = 3, **lora_kwargs) -> Path:
    """A real PEFT LoRA: random non-zero A and B (init_lora_weights=False), a few Adam steps on
    random tokens, saved by PEFT's own save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 64, (4, 16))
    for _ in range(steps):
        optimizer.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    peft_model.save_pretrained(out)
    return out


def peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, adapter).eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama with a sharpened LM head (greedy margins far above float32 noise) and a
    word-level tokenizer (for compose's training data)."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_base(tmp_path_factory.mktemp("peft") / "base")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    save_word_tokenizer(path, 64)
    return path


@pytest.fixture(scope="module")
def experts(base) -> dict[str, Path]:
    return {
        name: train_peft_lora(base, base.parent / name, seed=i, **kwargs)
        for i, (name, kwargs) in enumerate(EXPERTS.items())
    }


@pytest.fixture(scope="module")
def token_ids() -> torch.Tensor:
    return torch.randint(3, 64, (3, 12), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", list(EXPERTS))
def test_imported_lora_gives_peft_logits(name, base, experts, token_ids, tmp_path):
    ckpt = import_peft(experts[name], tmp_path / "ckpt", str(base))
    config = load_checkpoint(ckpt).config
    assert (config.num_loras, config.top_k, config.omega) == (1, 1, 1.0)
    model, _ = load_remix_model(ckpt)
    with torch.no_grad():
        ours = model(input_ids=token_ids).logits
    theirs = peft_logits(base, experts[name], token_ids)
    torch.testing.assert_close(ours, theirs, atol=LOGIT_TOL, rtol=0)
    base_logits = _base_logits(base, token_ids)
    assert (theirs - base_logits).abs().max() > 100 * LOGIT_TOL  # the LoRA matters


def _base_logits(base: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(input_ids=ids).logits


def forced_onto(ckpt: Path, expert: int, out: Path) -> Path:
    """A copy of checkpoint `ckpt` whose every router picks `expert` (zero weights, a bias)."""
    loaded = load_checkpoint(ckpt)
    tensors = dict(loaded.tensors)
    n = loaded.config.num_loras
    for name in [t for t in tensors if t.endswith(ROUTER_WEIGHT)]:
        tensors[name] = torch.zeros_like(tensors[name])
        tensors[name.replace(ROUTER_WEIGHT, ROUTER_BIAS)] = torch.eye(n)[expert] * 5.0
    shutil.copytree(loaded.base_model_path, out / "base")
    config = loaded.config.model_copy(update={"router_bias": True, "base_model": "base"})
    return save_checkpoint(out, config, tensors)


def write_router_data(path: Path, count: int = 32) -> Path:
    rng = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for _ in range(count):
            words = [f"w{int(i)}" for i in torch.randint(3, 64, (6,), generator=rng)]
            f.write(
                json.dumps({"prompt": " ".join(words[:3]), "completion": " " + " ".join(words[3:])})
                + "\n"
            )
    return path


@pytest.fixture(scope="module")
def composed(base, experts) -> Path:
    """`remix-train compose --method remix` over the three experts, a few RLOO steps."""
    out = base.parent / "composed"
    argv = ["compose", "--base-model", str(base), "--experts", *map(str, experts.values()),
            "--data", str(write_router_data(base.parent / "router.jsonl")), "--out", str(out),
            "--max-steps", "3", "--batch-size", "4", "--num-samples", "2", "--warmup-steps", "1",
            "--learning-rate", "0.05"]  # fmt: skip
    assert remix_train(argv) == 0
    return out


def test_compose_freezes_the_pool_and_trains_the_routers(composed, experts, base):
    ckpt = load_checkpoint(composed)
    config = ckpt.config
    assert (config.num_loras, config.top_k, config.omega, config.rank) == (3, 1, 1.0, 8)
    assert config.method == "compose-remix"
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"}  # fmt: skip
    # expert 2 adapts layer 1's o_proj only: a zero LoRA in layer 0, its own padded in layer 1
    a0 = ckpt.tensors[f"model.layers.0.self_attn.o_proj.{LORA_A}"]
    a1 = ckpt.tensors[f"model.layers.1.self_attn.o_proj.{LORA_A}"]
    assert not a0[2].any() and a1[2, :2].any() and not a1[2, 2:].any()
    peft_tensors = load_file(experts["late_layer"] / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"
    torch.testing.assert_close(a1[2, :2], peft_tensors[key], atol=0, rtol=0)  # frozen: unchanged
    state = torch.load(composed / "trainer_state.pt", weights_only=False)
    assert len(state["history"]) == 3
    routers = [t for n, t in ckpt.tensors.items() if n.endswith(ROUTER_WEIGHT)]
    assert all(r.abs().sum() > 0 for r in routers)  # trained from their random init


@pytest.mark.parametrize("expert", [0, 1, 2])
def test_composed_pool_forced_onto_an_expert_gives_its_logits(
    expert, composed, experts, base, token_ids, tmp_path
):
    model, _ = load_remix_model(forced_onto(composed, expert, tmp_path / "forced"))
    with torch.no_grad():
        ours = model(input_ids=token_ids).logits
    theirs = peft_logits(base, list(experts.values())[expert], token_ids)
    torch.testing.assert_close(ours, theirs, atol=LOGIT_TOL, rtol=0)


def test_imported_lora_served_by_vllm_gives_reference_tokens(base, experts, tmp_path):
    ckpt = import_peft(experts["all_rslora"], tmp_path / "ckpt", str(base))
    model, _ = load_remix_model(ckpt)
    prompts = [[5, 9, 13], [40, 41, 42, 43, 44, 45, 46], [7] * 20, [11]]
    runs = [reference_run(model, p, 8) for p in prompts]
    with torch.no_grad():
        base_tokens = [reference_run(_base_model(base), p, 8).tokens for p in prompts]
    assert [r.tokens for r in runs] != base_tokens  # the LoRA changes the greedy answers
    with remix_llm(ckpt, in_process=False) as engine:
        outputs = greedy(engine, prompts, 8)
    assert [list(o.outputs[0].token_ids) for o in outputs] == [r.tokens for r in runs]


def _base_model(base: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


# --- refusals: adapters that real PEFT writes but a ReMix pool cannot reproduce ---------------


@pytest.mark.parametrize(
    ("lora_kwargs", "field"),
    [
        (dict(r=4, target_modules=["q_proj"], use_dora=True), "'use_dora'"),
        (dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "'modules_to_save'"),
        (dict(r=4, target_modules=["q_proj"], bias="lora_only"), "'bias'"),
        (dict(r=4, target_modules=["q_proj", "lm_head"]), "'target_modules'"),
        (dict(r=4, target_modules=["q_proj", "embed_tokens"]), "'target_modules'"),
    ],
)
def test_refuses_what_a_pool_cannot_express(lora_kwargs, field, base, tmp_path, capsys):
    adapter = train_peft_lora(base, tmp_path / "adapter", steps=0, **lora_kwargs)
    assert remix_train(["import-peft", str(adapter), "--out", str(tmp_path / "ckpt"),
                        "--base-model", str(base)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert str(adapter) in err and f"field {field}" in err and "Traceback" not in err
    assert not (tmp_path / "ckpt").exists()


def _edited(src: Path, dst: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps(cfg | config))
    if tensors is not None:
        weights = load_file(dst / "adapter_model.safetensors")
        save_file(weights | tensors, dst / "adapter_model.safetensors")
    return dst


def test_refuses_unknown_tensors_and_fields(base, experts, tmp_path):
    src = experts["qv_patterns"]
    embed = {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 64)}
    cases = [
        (_edited(src, tmp_path / "a", tensors=embed), "lora_embedding_A"),
        (_edited(src, tmp_path / "b", tensors={"base_model.model.model.norm.lora_A.weight": torch.zeros(4, 128)}),
         "'base_model.model.model.norm.lora_A.weight' is not a LoRA factor"),
        (_edited(src, tmp_path / "c", config={"use_fancy_adapters": True}), "field 'use_fancy_adapters'"),
        (_edited(src, tmp_path / "d", config={"rank_pattern": {}}), "field 'r' is 4 but"),
        (_edited(src, tmp_path / "e", config={"peft_type": "IA3"}), "field 'peft_type'"),
    ]  # fmt: skip
    for folder, message in cases:
        with pytest.raises(PeftAdapterError, match="^" + str(folder)) as raised:
            import_peft(folder, tmp_path / "out", str(base))
        assert message in str(raised.value), (folder, str(raised.value))


def test_refuses_another_base_model(base, experts, tmp_path):
    other = make_tiny_base(tmp_path / "other", intermediate_size=384)
    with pytest.raises(PeftAdapterError, match="another base model|other dimensions"):
        import_peft(experts["all_rslora"], tmp_path / "out", str(other))
    # also when the recorded base is gone: the tensor shapes give it away
    moved = _edited(
        experts["all_rslora"], tmp_path / "moved", config={"base_model_name_or_path": "gone"}
    )
    with pytest.raises(PeftAdapterError, match="trained on another base model"):
        import_peft(moved, tmp_path / "out", str(other))


def test_compose_trains_an_always_on_lora_beside_the_frozen_pool(base, experts, tmp_path):
    from transformers import AutoTokenizer

    from remix_infer.train.data import read_jsonl, tokenize
    from remix_infer.train.trainer import TrainConfig

    data = tokenize(
        AutoTokenizer.from_pretrained(base), read_jsonl(write_router_data(tmp_path / "d.jsonl")), 32
    )
    config = TrainConfig(method="remix", top_k=1, num_samples=2, max_steps=2, batch_size=4,
                         warmup_steps=1, learning_rate=0.05, always_on_rank=2,
                         always_on_modules=["v_proj", "down_proj"])  # fmt: skip
    out = compose(str(base), list(experts.values()), tmp_path / "ckpt", config, data)
    ckpt = load_checkpoint(out)
    assert ckpt.config.always_on_rank == 2
    assert ckpt.config.always_on_modules == ["v_proj", "down_proj"]
    shape, architecture = read_base_model(base)
    pool = build_pool("base", read_experts(list(experts.values()), shape), shape, architecture)
    for name, tensor in pool.tensors.items():
        if not name.endswith(ROUTER_WEIGHT):
            assert torch.equal(ckpt.tensors[name], tensor), name  # the pool stayed frozen
    always_b = [t for n, t in ckpt.tensors.items() if n.endswith(ALWAYS_B)]
    assert len(always_b) == 4 and all(t.abs().sum() > 0 for t in always_b)  # trained from 0


def test_compose_refuses_always_on_modules_it_does_not_adapt(base, experts, tmp_path, capsys):
    out = tmp_path / "ckpt"
    argv = ["compose", "--base-model", str(base), "--experts", str(experts["qv_patterns"]),
            "--data", str(write_router_data(tmp_path / "d.jsonl")), "--out", str(out),
            "--method", "mor", "--always-on-rank", "2", "--always-on-modules", "q_proj", "o_proj"]  # fmt: skip
    assert remix_train(argv) == 2
    err = capsys.readouterr().err
    assert "field 'always_on_modules': ['o_proj'] are not in target_modules" in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(
    ("method", "scope", "routing"),
    [
        ("mor", "auto", (1, 1.0, "constant", "shared")),
        ("mixer", "auto", (2, 1.0, "softmax_topk", "module")),
        ("remix", "shared", (2, 1.0, "constant", "shared")),
    ],
)
def test_compose_methods_train_their_routers(method, scope, routing, base, experts, tmp_path):
    """mor: hard top-1 at unit scale whatever --top-k says, one shared router (MoR-LoRA's default
    scope) moved by the straight-through gradient; mixer: softmax top-k gates, routers moved by
    the task loss plus RSL; remix in the shared scope: one router, RLOO over its one decision."""
    out = tmp_path / method
    argv = ["compose", "--base-model", str(base), "--experts", *map(str, experts.values()),
            "--data", str(write_router_data(tmp_path / "router.jsonl")), "--out", str(out),
            "--method", method, "--routing-scope", scope, "--top-k", "2", "--max-steps", "2", "--batch-size", "4",
            "--warmup-steps", "1", "--learning-rate", "0.05"]  # fmt: skip
    assert remix_train(argv) == 0
    ckpt = load_checkpoint(out)
    config = ckpt.config
    assert (config.top_k, config.omega, config.weighting, config.routing_scope) == routing
    assert ckpt.config.method == f"compose-{method}"
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    initial = initial_routers(base, experts, state["train_config"])
    moved = [
        (ckpt.tensors[name] - start).abs().max() for name, start in initial.items()
    ]  # every router trained away from its seeded init
    assert min(moved) > 1e-4
    if method == "mixer":
        assert "rsl" in state["history"][0]


def initial_routers(base, experts, train_config) -> dict[str, torch.Tensor]:
    """The routers a compose run starts from (same seed), by checkpoint tensor name."""
    from remix_infer.modeling import adapter_tensors
    from remix_infer.train.trainer import TrainConfig, Trainer

    config = TrainConfig(**train_config)
    shape, architecture = read_base_model(base)
    experts = read_experts(list(experts.values()), shape)
    scope = config.resolved_routing_scope()
    pool = build_pool("base", experts, shape, architecture, routing_scope=scope)
    trainer = Trainer(config, str(base), None, remix_config=pool.config, frozen=pool.lora_tensors())
    routers = adapter_tensors(trainer.model).items()
    return {n: t.clone() for n, t in routers if n.endswith("router_weight")}


def test_remix_serve_serves_a_composed_mor_checkpoint(demo_checkpoint, tmp_path):
    """PEFT LoRAs on the demo base -> compose --method mor (shared routing scope, an always-on
    LoRA) -> remix-serve: its greedy completion is the reference model's."""
    import openai
    from helpers.servers import SMALL_ENGINE, running_server
    from transformers import AutoTokenizer

    base = demo_checkpoint / "base"
    experts = [
        train_peft_lora(base, tmp_path / f"e{i}", seed=i, r=4, lora_alpha=8, target_modules=names)
        for i, names in enumerate((["q_proj", "v_proj"], ["q_proj", "o_proj", "down_proj"]))
    ]
    out = tmp_path / "composed"
    argv = ["compose", "--base-model", str(base), "--experts", *map(str, experts),
            "--data", str(write_router_data(tmp_path / "router.jsonl")), "--out", str(out),
            "--method", "mor", "--always-on-rank", "2", "--max-steps", "2", "--batch-size", "4",
            "--warmup-steps", "1", "--learning-rate", "0.05"]  # fmt: skip
    assert remix_train(argv) == 0
    config = load_checkpoint(out).config
    assert (config.routing_scope, config.always_on_rank) == ("shared", 2)
    assert config.always_on_modules == ["q_proj", "v_proj", "o_proj"]  # the experts' attention
    model, _ = load_remix_model(out)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer("add 1 2 =", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    args = [*SMALL_ENGINE, "--max-model-len", "128", "--served-model-name", "composed"]
    with running_server(out, tmp_path / "server.log", args) as server:
        client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="none", max_retries=0)
        got = client.completions.create(
            model="composed", prompt="add 1 2 =", max_tokens=6, temperature=0
        )
    assert got.choices[0].text == tokenizer.decode(want, skip_special_tokens=True)


def test_distill_writes_each_experts_greedy_answers(base, experts, tmp_path):
    """remix-train distill: each prompt answered by its domain's expert, greedy, as PEFT's own
    model answers it (BOS + prompt, until EOS or --max-new-tokens)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folders = list(experts.values())
    prompts = [("w5 w9 w11", 0), ("w40 w3", "all_rslora"), ("w7", 2), ("w20 w21 w22", 1)]
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": p, "domain": d}) + "\n" for p, d in prompts))
    out = tmp_path / "traces.jsonl"
    argv = ["distill", "--base-model", str(base), "--experts", *map(str, folders),
            "--prompts", str(file), "--out", str(out), "--max-new-tokens", "5"]  # fmt: skip
    assert remix_train(argv) == 0
    traces = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(t["prompt"], t["domain"]) for t in traces] == [("w5 w9 w11", 0), ("w40 w3", 1),
                                                             ("w7", 2), ("w20 w21 w22", 1)]  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(base)
    answers = set()
    for trace in traces:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(model, folders[trace["domain"]]).eval()
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(trace["prompt"])["input_ids"]]])
        with torch.no_grad():
            want = peft_model.generate(input_ids=ids, max_new_tokens=5, do_sample=False,
                                       pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        assert trace["completion"] == tokenizer.decode(
            want[0, ids.shape[1] :], skip_special_tokens=True
        )
        answers.add(trace["completion"])
    assert len(answers) > 1  # the experts (and prompts) give different answers


def test_distill_refuses_an_unknown_domain(base, experts, tmp_path, capsys):
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"prompt": "w5", "domain": 0}\n{"prompt": "w6", "domain": "nobody"}\n')
    argv = ["distill", "--base-model", str(base), "--experts", *map(str, experts.values()),
            "--prompts", str(file), "--out", str(tmp_path / "out.jsonl")]  # fmt: skip
    assert remix_train(argv) == 2
    err = capsys.readouterr().err
    assert f"{file}:2: field 'domain' is 'nobody'" in err and "Traceback" not in err


def test_joint_expert_training_by_domain_then_router_training_over_that_pool(base, tmp_path):
    """LoRA-Mixer's two stages: `train --domain-routing` sends each record to LoRA `domain`
    (LoRA 2, which no record names, stays untrained), then `compose --pool` freezes that pool
    and trains only the routers."""
    records = [
        json.loads(line)
        for line in write_router_data(tmp_path / "r.jsonl").read_text().splitlines()
    ]
    data = tmp_path / "domains.jsonl"
    data.write_text(
        "".join(json.dumps(r | {"domain": i % 2}) + "\n" for i, r in enumerate(records))
    )
    stage1 = tmp_path / "stage1"
    common = ["--base-model", str(base), "--data", str(data), "--max-steps", "3",
              "--batch-size", "4", "--warmup-steps", "1", "--learning-rate", "0.05"]  # fmt: skip
    argv = ["train", *common, "--out", str(stage1), "--method", "mixer", "--domain-routing",
            "--num-loras", "3", "--top-k", "1", "--rank", "4"]  # fmt: skip
    assert remix_train(argv) == 0
    pool = load_checkpoint(stage1).tensors
    b = {n: t for n, t in pool.items() if n.endswith("remix_lora_b")}
    assert all(t[0].abs().sum() > 0 and t[1].abs().sum() > 0 for t in b.values())
    assert all(not t[2].any() for t in b.values())  # no record was routed to LoRA 2
    stage2 = tmp_path / "stage2"
    argv = ["compose", *common, "--pool", str(stage1), "--out", str(stage2), "--method", "mixer",
            "--top-k", "2"]  # fmt: skip
    assert remix_train(argv) == 0
    composed = load_checkpoint(stage2)
    assert (composed.config.num_loras, composed.config.weighting) == (3, "softmax_topk")
    for name, tensor in pool.items():
        if name.endswith(("remix_lora_a", "remix_lora_b")):
            assert torch.equal(composed.tensors[name], tensor), name  # frozen


def test_domain_routing_needs_a_domain_on_every_record(base, tmp_path, capsys):
    argv = ["train", "--base-model", str(base), "--data", str(write_router_data(tmp_path / "r.jsonl")),
            "--out", str(tmp_path / "out"), "--method", "mixer", "--domain-routing",
            "--max-steps", "1", "--batch-size", "4"]  # fmt: skip
    assert remix_train(argv) == 2
    assert "every training record needs a 'domain' field" in capsys.readouterr().err
