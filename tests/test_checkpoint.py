"""Checkpoint format: save/load round trip, relocation, and every load-time refusal.

Each refusal asserts a CheckpointError whose message names the file, the field or tensor,
and what was expected, as docs/checkpoint-format.md promises.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.models import TINY_REMIX, make_checkpoint, make_remix_model, make_tiny_base
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from remix_infer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from remix_infer.config import ADAPTERS_FILE, CONFIG_FILE, RemixConfig
from remix_infer.modeling import adapter_tensors, load_remix_model, remix_modules

Q_A = "model.layers.0.self_attn.q_proj.remix_lora_a"
DOWN_B = "model.layers.1.mlp.down_proj.remix_lora_b"


# ---------------------------------------------------------------- helpers


def edit_config(ckpt: Path, **changes) -> None:
    """Rewrite remix_config.json with `changes` (value None deletes the field)."""
    file = ckpt / CONFIG_FILE
    raw = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    file.write_text(json.dumps(raw, indent=2))


def edit_tensors(ckpt: Path, fn) -> None:
    """Rewrite remix_adapters.safetensors with fn(tensors) applied (fn edits the dict in place)."""
    file = ckpt / ADAPTERS_FILE
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file))


def refused(ckpt: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt)
    return str(info.value)


def tokens() -> torch.Tensor:
    return torch.arange(24).reshape(2, 12) % 64


# ---------------------------------------------------------------- round trip


def test_save_load_round_trip_tensors_equal(tmp_path):
    base = make_tiny_base(tmp_path / "ckpt" / "base")
    config = RemixConfig(base_model="base", **TINY_REMIX)
    model = make_remix_model(base, config, seed=3)
    saved = {k: v.clone() for k, v in adapter_tensors(model).items()}
    ckpt = save_checkpoint(tmp_path / "ckpt", config, saved)

    loaded = load_checkpoint(ckpt)
    assert loaded.config == config
    assert loaded.base_model_path == str(base.resolve())
    assert set(loaded.tensors) == set(saved)
    # 2 layers x 7 projections x (A, B, router weight)
    assert len(loaded.tensors) == 2 * 7 * 3
    for name, t in saved.items():
        assert loaded.tensors[name].dtype == torch.float32
        assert torch.equal(loaded.tensors[name], t), name
    # The file itself carries exactly these names and the format metadata.
    with safe_open(str(ckpt / ADAPTERS_FILE), framework="pt") as f:
        assert set(f.keys()) == set(saved)
        assert f.metadata()["remix_format_version"] == "1"


def test_tensor_shapes_follow_the_base_model(checkpoint_dir):
    """The worked example of docs/checkpoint-format.md: n=4, r=4, hidden 128, 2 heads x 64,
    1 kv head, intermediate 256."""
    t = load_checkpoint(checkpoint_dir).tensors
    layer = "model.layers.0"
    assert t[f"{layer}.self_attn.q_proj.remix_lora_a"].shape == (4, 4, 128)
    assert t[f"{layer}.self_attn.q_proj.remix_lora_b"].shape == (4, 128, 4)
    assert t[f"{layer}.self_attn.q_proj.remix_router_weight"].shape == (4, 128)
    assert t[f"{layer}.self_attn.k_proj.remix_lora_b"].shape == (4, 64, 4)
    assert t[f"{layer}.self_attn.v_proj.remix_lora_b"].shape == (4, 64, 4)
    assert t[f"{layer}.self_attn.o_proj.remix_lora_a"].shape == (4, 4, 128)
    assert t[f"{layer}.mlp.gate_proj.remix_lora_b"].shape == (4, 256, 4)
    assert t[f"{layer}.mlp.up_proj.remix_lora_b"].shape == (4, 256, 4)
    assert t[f"{layer}.mlp.down_proj.remix_lora_a"].shape == (4, 4, 256)
    assert t[f"{layer}.mlp.down_proj.remix_router_weight"].shape == (4, 256)
    assert t[DOWN_B].shape == (4, 128, 4)


def test_target_module_subset_stores_only_those_modules(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", target_modules=["v_proj", "q_proj"])
    names = sorted(load_checkpoint(ckpt).tensors)
    assert len(names) == 2 * 2 * 3
    assert {n.split(".")[4] for n in names} == {"q_proj", "v_proj"}


def test_loaded_model_gives_same_logits_as_in_memory_model(tmp_path):
    base = make_tiny_base(tmp_path / "ckpt" / "base")
    config = RemixConfig(base_model="base", **TINY_REMIX)
    model = make_remix_model(base, config, seed=1)
    ckpt = save_checkpoint(tmp_path / "ckpt", config, adapter_tensors(model))

    loaded, info = load_remix_model(ckpt)
    assert not loaded.training
    assert len(remix_modules(loaded)) == 2 * 7
    with torch.no_grad():
        expected = model(tokens()).logits
        got = loaded(tokens()).logits
        plain = load_remix_model(ckpt)[0]
        for m in remix_modules(plain).values():
            m.lora_b.data.zero_()
        base_logits = plain(tokens()).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The adapters really take part: without them the logits differ.
    assert not torch.allclose(got, base_logits, atol=1e-4)
    assert info.config == config


def test_moved_checkpoint_folder_still_loads(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=2)
    with torch.no_grad():
        before = load_remix_model(ckpt)[0](tokens()).logits
    saved = load_checkpoint(ckpt).tensors

    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(str(ckpt), str(moved))
    assert not ckpt.exists()

    loaded = load_checkpoint(moved)
    assert loaded.base_model_path == str((moved / "base").resolve())
    for name, t in saved.items():
        assert torch.equal(loaded.tensors[name], t)
    with torch.no_grad():
        after = load_remix_model(moved)[0](tokens()).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_absolute_base_path_and_sibling_relative_path(tmp_path):
    base = make_tiny_base(tmp_path / "shared_base")
    ckpt = make_checkpoint(tmp_path / "a", base_rel=str(base))
    assert load_checkpoint(ckpt).base_model_path == str(base.resolve())
    ckpt = make_checkpoint(tmp_path / "b", base_rel="../shared_base")
    assert load_checkpoint(ckpt).base_model_path == str(base.resolve())


def test_router_bias_round_trip(tmp_path):
    base = make_tiny_base(tmp_path / "ckpt" / "base")
    config = RemixConfig(base_model="base", **{**TINY_REMIX, "router_bias": True})
    model = make_remix_model(base, config, seed=4)
    saved = {k: v.clone() for k, v in adapter_tensors(model).items()}
    ckpt = save_checkpoint(tmp_path / "ckpt", config, saved)

    bias_names = [n for n in saved if n.endswith(".remix_router_bias")]
    assert len(bias_names) == 2 * 7
    loaded = load_checkpoint(ckpt)
    assert loaded.config.router_bias is True
    for name in bias_names:
        assert loaded.tensors[name].shape == (4,)
        assert torch.equal(loaded.tensors[name], saved[name])
        assert loaded.tensors[name].abs().sum() > 0

    rebuilt, _ = load_remix_model(ckpt)
    q = remix_modules(rebuilt)["model.layers.0.self_attn.q_proj"]
    assert torch.equal(q.router.bias, saved["model.layers.0.self_attn.q_proj.remix_router_bias"])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens()).logits, model(tokens()).logits, rtol=0, atol=0)


def test_always_on_lora_round_trip(tmp_path):
    """always_on_rank: one more A [r0, d_in] and B [d_out, r0] per module, added with weight 1."""
    base = make_tiny_base(tmp_path / "ckpt" / "base")
    config = RemixConfig(base_model="base", **{**TINY_REMIX, "always_on_rank": 3})
    model = make_remix_model(base, config, seed=5)
    ckpt = save_checkpoint(tmp_path / "ckpt", config, adapter_tensors(model))
    loaded = load_checkpoint(ckpt)
    assert loaded.tensors["model.layers.0.self_attn.k_proj.remix_always_a"].shape == (3, 128)
    assert loaded.tensors["model.layers.0.self_attn.k_proj.remix_always_b"].shape == (64, 3)
    edit_config(ckpt, always_on_modules=None)  # as written before the field: on every module
    assert len([n for n in load_checkpoint(ckpt).tensors if n.endswith("remix_always_a")]) == 14
    rebuilt, _ = load_remix_model(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens()).logits, model(tokens()).logits, rtol=0, atol=0)
        with_always = rebuilt(tokens()).logits
        for module in remix_modules(rebuilt).values():
            module.always_b.zero_()
        assert (rebuilt(tokens()).logits - with_always).abs().max() > 1e-3  # the term is applied


def test_always_on_lora_on_the_listed_modules_only(tmp_path):
    """always_on_modules (MoR-LoRA's attention LoRA): only the listed projections carry one."""
    base = make_tiny_base(tmp_path / "ckpt" / "base")
    listed = {"always_on_rank": 3, "always_on_modules": ["q_proj", "o_proj"]}
    config = RemixConfig(base_model="base", **{**TINY_REMIX, **listed})
    model = make_remix_model(base, config, seed=7)
    ckpt = save_checkpoint(tmp_path / "ckpt", config, adapter_tensors(model))
    carriers = {n.split(".")[-2] for n in load_checkpoint(ckpt).tensors if "remix_always" in n}
    assert carriers == {"q_proj", "o_proj"}
    rebuilt, _ = load_remix_model(ckpt)
    modules = remix_modules(rebuilt).items()
    assert {n.split(".")[-1] for n, m in modules if m.always_a is not None} == carriers
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens()).logits, model(tokens()).logits, rtol=0, atol=0)
    edit_config(ckpt, always_on_modules=["q_proj"])  # o_proj's tensors are left over
    assert "unexpected tensor 'model.layers.0.self_attn.o_proj.remix_always_a'" in refused(ckpt)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"always_on_modules": ["q_proj"]}, "is set but always_on_rank is 0"),
        ({"always_on_rank": 2, "always_on_modules": ["lm_head"]}, "['lm_head'] are not in"),
        ({"always_on_rank": 2, "always_on_modules": []}, "must be a non-empty list"),
        ({"always_on_rank": 2, "always_on_modules": ["q_proj", "q_proj"]}, "no duplicates"),
    ],
)
def test_refuses_bad_always_on_modules(checkpoint_dir, changes, message):
    edit_config(checkpoint_dir, **changes)
    msg = refused(checkpoint_dir)
    assert msg.startswith(str(checkpoint_dir / CONFIG_FILE)) and "field 'always_on_modules'" in msg
    assert message in msg, msg


def test_shared_routing_scope_round_trip(tmp_path):
    """routing_scope 'shared': one router for the model (its tensors named model.remix_shared_*)
    and none per module; every module takes the same decision, from the first layer's input."""
    base = make_tiny_base(tmp_path / "ckpt" / "base")
    overrides = {"routing_scope": "shared", "router_bias": True}
    config = RemixConfig(base_model="base", **{**TINY_REMIX, **overrides})
    model = make_remix_model(base, config, seed=6)
    ckpt = save_checkpoint(tmp_path / "ckpt", config, adapter_tensors(model))
    loaded = load_checkpoint(ckpt)
    assert loaded.tensors["model.remix_shared_router_weight"].shape == (4, 128)
    assert loaded.tensors["model.remix_shared_router_bias"].shape == (4,)
    assert not [
        n for n in loaded.tensors if n.endswith(("remix_router_weight", "remix_router_bias"))
    ]
    rebuilt, _ = load_remix_model(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens()).logits, model(tokens()).logits, rtol=0, atol=0)
    choices = [m.last_routing.selected for m in remix_modules(rebuilt).values()]
    assert all(torch.equal(c, choices[0]) for c in choices)


def test_refuses_shared_scope_without_an_attention_input_projection(checkpoint_dir):
    edit_config(checkpoint_dir, routing_scope="shared", target_modules=["o_proj", "down_proj"])
    msg = refused(checkpoint_dir)
    assert "routing_scope 'shared'" in msg and "q_proj" in msg


def test_refuses_shared_scope_without_its_router(checkpoint_dir):
    edit_config(checkpoint_dir, routing_scope="shared")
    msg = refused(checkpoint_dir)
    assert "missing tensor 'model.remix_shared_router_weight'" in msg


def test_refuses_always_on_config_without_its_tensors(checkpoint_dir):
    edit_config(checkpoint_dir, always_on_rank=2)
    msg = refused(checkpoint_dir)
    assert "missing tensor 'model.layers.0.mlp.down_proj.remix_always_a' and 27 more" in msg


def test_refuses_negative_always_on_rank(checkpoint_dir):
    edit_config(checkpoint_dir, always_on_rank=-1)
    assert "field 'always_on_rank'" in refused(checkpoint_dir)


def test_bfloat16_checkpoint_round_trip(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", dtype="bfloat16")
    loaded = load_checkpoint(ckpt)
    assert all(t.dtype == torch.bfloat16 for t in loaded.tensors.values())
    model, _ = load_remix_model(ckpt)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    # Adapters run in float32 whatever the base dtype; values are the stored bf16 ones.
    q = remix_modules(model)["model.layers.0.self_attn.q_proj"]
    assert q.lora_a.dtype == torch.float32
    assert torch.equal(q.lora_a, loaded.tensors[Q_A].float())


# ---------------------------------------------------------------- refusals: config


def test_refuses_missing_checkpoint_dir(tmp_path):
    msg = refused(tmp_path / "nope")
    assert str(tmp_path / "nope") in msg and "checkpoint directory not found" in msg


def test_refuses_missing_config_file(checkpoint_dir):
    (checkpoint_dir / CONFIG_FILE).unlink()
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / CONFIG_FILE) in msg
    assert "missing" in msg and f"holds {CONFIG_FILE}" in msg


@pytest.mark.parametrize("text", ["{not json", "", '{"base_model": "base",}'])
def test_refuses_invalid_json(checkpoint_dir, text):
    (checkpoint_dir / CONFIG_FILE).write_text(text)
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / CONFIG_FILE) in msg and "not valid JSON" in msg


def test_refuses_config_that_is_not_utf8(checkpoint_dir):
    (checkpoint_dir / CONFIG_FILE).write_bytes(b"\xff\xfe{garbage")
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / CONFIG_FILE) in msg and "not valid JSON" in msg


def test_refuses_config_that_is_not_an_object(checkpoint_dir):
    (checkpoint_dir / CONFIG_FILE).write_text("[1, 2]")
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / CONFIG_FILE) in msg and "valid dictionary" in msg


def test_refuses_unknown_format_version(checkpoint_dir):
    edit_config(checkpoint_dir, format_version=2)
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / CONFIG_FILE) in msg
    assert "field 'format_version'" in msg
    assert "format_version 2 is not supported (expected 1)" in msg


def test_future_format_version_is_named_even_with_new_fields(checkpoint_dir):
    """A newer checkpoint with fields this version does not know still says why first."""
    edit_config(checkpoint_dir, format_version=2, lora_dropout=0.1)
    msg = refused(checkpoint_dir)
    assert "format_version 2 is not supported (expected 1)" in msg
    assert "field 'lora_dropout': Extra inputs are not permitted" in msg


def test_refuses_unknown_config_field(checkpoint_dir):
    edit_config(checkpoint_dir, lora_alpha=16)
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / CONFIG_FILE) in msg
    assert "field 'lora_alpha': Extra inputs are not permitted" in msg


def test_refuses_missing_required_field(checkpoint_dir):
    edit_config(checkpoint_dir, rank=None)
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / CONFIG_FILE) in msg and "field 'rank': Field required" in msg


@pytest.mark.parametrize("top_k", [5, 0, -1])
def test_refuses_top_k_out_of_range(checkpoint_dir, top_k):
    edit_config(checkpoint_dir, top_k=top_k)
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / CONFIG_FILE) in msg
    assert f"top_k must be between 1 and num_loras=4, got {top_k}" in msg


@pytest.mark.parametrize("omega", [0.0, -0.5, "NaN", "Infinity"])
def test_refuses_bad_omega(checkpoint_dir, omega):
    file = checkpoint_dir / CONFIG_FILE
    # json.dumps writes NaN / Infinity literals, which Python's json.loads reads back.
    edit_config(checkpoint_dir, omega=float(omega))
    msg = refused(checkpoint_dir)
    assert str(file) in msg and "omega must be a finite positive number" in msg


def test_refuses_unknown_target_module(checkpoint_dir):
    edit_config(checkpoint_dir, target_modules=["q_proj", "lm_head"])
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / CONFIG_FILE) in msg
    assert "unknown target_modules ['lm_head']" in msg and "allowed: ['q_proj'" in msg


def test_refuses_unknown_dtype(checkpoint_dir):
    edit_config(checkpoint_dir, dtype="int8")
    msg = refused(checkpoint_dir)
    assert "field 'dtype'" in msg and "'float32', 'bfloat16' or 'float16'" in msg


# ---------------------------------------------------------------- refusals: base model


def test_refuses_base_model_not_found(checkpoint_dir):
    shutil.rmtree(checkpoint_dir / "base")
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / CONFIG_FILE) in msg and "field 'base_model'" in msg
    assert "base model directory" in msg and str(checkpoint_dir / "base") in msg


def test_refuses_base_dir_without_config_json(checkpoint_dir):
    (checkpoint_dir / "base" / "config.json").unlink()
    msg = refused(checkpoint_dir)
    assert "field 'base_model'" in msg and "has no config.json" in msg


def test_refuses_unreadable_base_config(checkpoint_dir):
    (checkpoint_dir / "base" / "config.json").write_text("{oops")
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / CONFIG_FILE) in msg and "field 'base_model'" in msg
    assert "config.json" in msg and "not valid JSON" in msg


def test_refuses_base_config_lacking_a_dimension(checkpoint_dir):
    file = checkpoint_dir / "base" / "config.json"
    raw = json.loads(file.read_text())
    del raw["intermediate_size"]
    file.write_text(json.dumps(raw))
    msg = refused(checkpoint_dir)
    assert "field 'base_model'" in msg and "'intermediate_size'" in msg


def test_refuses_wrong_architecture(checkpoint_dir):
    edit_config(checkpoint_dir, architecture="mistral")
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / CONFIG_FILE) in msg
    assert "field 'architecture' is 'mistral'" in msg
    assert "model_type is 'llama' (expected 'mistral')" in msg


def test_refuses_llama_checkpoint_on_a_qwen2_base(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    shutil.rmtree(ckpt / "base")
    make_tiny_base(ckpt / "base", model_type="qwen2")
    msg = refused(ckpt)
    assert "model_type is 'qwen2' (expected 'llama')" in msg


@pytest.mark.parametrize("num_layers", [1, 3])
def test_refuses_num_layers_mismatch(checkpoint_dir, num_layers):
    edit_config(checkpoint_dir, num_layers=num_layers)
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / CONFIG_FILE) in msg
    assert f"field 'num_layers' is {num_layers} but the base model has 2 layers" in msg


def test_refuses_adapters_for_a_differently_sized_base(checkpoint_dir):
    """Same architecture and depth, other hidden size: every tensor's shape is checked."""
    shutil.rmtree(checkpoint_dir / "base")
    make_tiny_base(checkpoint_dir / "base", hidden_size=256, num_attention_heads=4)
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / ADAPTERS_FILE) in msg
    name = "model.layers.0.mlp.down_proj.remix_lora_b"  # the first of the sorted names
    assert f"tensor '{name}' has shape [4, 128, 4], expected [4, 256, 4]" in msg


# ---------------------------------------------------------------- refusals: tensors


def test_refuses_missing_adapters_file(checkpoint_dir):
    (checkpoint_dir / ADAPTERS_FILE).unlink()
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / ADAPTERS_FILE) in msg
    assert "missing (the adapter tensors of the checkpoint)" in msg


@pytest.mark.parametrize("keep", [0, 4, 8, 100, "half", "all-but-one"])
def test_refuses_truncated_adapters_file(checkpoint_dir, keep):
    file = checkpoint_dir / ADAPTERS_FILE
    data = file.read_bytes()
    keep = {"half": len(data) // 2, "all-but-one": len(data) - 1}.get(keep, keep)
    file.write_bytes(data[:keep])
    msg = refused(checkpoint_dir)
    assert str(file) in msg and "not a readable safetensors file" in msg


def test_refuses_garbage_adapters_file(checkpoint_dir):
    (checkpoint_dir / ADAPTERS_FILE).write_bytes(b"\x00" * 7 + b"not safetensors at all" * 10)
    msg = refused(checkpoint_dir)
    assert "not a readable safetensors file" in msg


def test_refuses_missing_tensor(checkpoint_dir):
    edit_tensors(checkpoint_dir, lambda t: t.pop(DOWN_B))
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / ADAPTERS_FILE) in msg
    assert f"missing tensor '{DOWN_B}'" in msg and "more" not in msg


def test_missing_tensors_are_counted(checkpoint_dir):
    def drop_layer_1(t):
        for name in [n for n in t if n.startswith("model.layers.1.")]:
            del t[name]

    edit_tensors(checkpoint_dir, drop_layer_1)
    msg = refused(checkpoint_dir)
    assert "missing tensor 'model.layers.1.mlp.down_proj.remix_lora_a' and 20 more" in msg


def test_refuses_extra_tensor(checkpoint_dir):
    extra = "model.layers.2.self_attn.q_proj.remix_lora_a"
    edit_tensors(checkpoint_dir, lambda t: t.update({extra: torch.zeros(4, 4, 128)}))
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / ADAPTERS_FILE) in msg
    assert f"unexpected tensor '{extra}'" in msg
    assert "not in the config's target modules and layers" in msg


def test_refuses_bias_tensor_when_config_has_no_router_bias(checkpoint_dir):
    name = "model.layers.0.self_attn.q_proj.remix_router_bias"
    edit_tensors(checkpoint_dir, lambda t: t.update({name: torch.zeros(4)}))
    assert f"unexpected tensor '{name}'" in refused(checkpoint_dir)


def test_refuses_router_bias_config_without_bias_tensors(checkpoint_dir):
    edit_config(checkpoint_dir, router_bias=True)
    msg = refused(checkpoint_dir)
    assert "missing tensor 'model.layers.0.mlp.down_proj.remix_router_bias' and 13 more" in msg


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        (Q_A, (4, 5, 128), "[4, 4, 128]"),  # wrong rank
        (DOWN_B, (4, 256, 4), "[4, 128, 4]"),  # d_in/d_out swapped
        ("model.layers.0.self_attn.k_proj.remix_router_weight", (3, 128), "[4, 128]"),  # wrong n
        ("model.layers.1.self_attn.v_proj.remix_lora_b", (4, 4, 64), "[4, 64, 4]"),  # transposed
    ],
)
def test_refuses_wrong_shape(checkpoint_dir, name, shape, expected):
    edit_tensors(checkpoint_dir, lambda t: t.update({name: torch.zeros(shape)}))
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / ADAPTERS_FILE) in msg
    assert f"tensor '{name}' has shape {list(shape)}, expected {expected}" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_refuses_non_finite_values(checkpoint_dir, bad):
    def poison(t):
        t[DOWN_B][3, 17, 2] = bad

    edit_tensors(checkpoint_dir, poison)
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / ADAPTERS_FILE) in msg
    assert f"tensor '{DOWN_B}' has non-finite values (nan or inf)" in msg


def test_refuses_non_finite_bf16_values(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", dtype="bfloat16")

    def poison(t):
        t[Q_A][0, 0, 0] = float("nan")

    edit_tensors(ckpt, poison)
    assert f"tensor '{Q_A}' has non-finite values" in refused(ckpt)


def test_refuses_dtype_mismatch(checkpoint_dir):
    edit_tensors(checkpoint_dir, lambda t: t.update({k: v.bfloat16() for k, v in t.items()}))
    msg = refused(checkpoint_dir)
    assert str(checkpoint_dir / ADAPTERS_FILE) in msg
    assert "has dtype torch.bfloat16, the config's dtype is torch.float32" in msg


def test_refuses_single_tensor_in_other_dtype(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", dtype="float16")
    edit_tensors(ckpt, lambda t: t.update({DOWN_B: t[DOWN_B].float()}))
    msg = refused(ckpt)
    assert f"tensor '{DOWN_B}' has dtype torch.float32, the config's dtype is torch.float16" in msg


def test_save_casts_to_config_dtype(tmp_path):
    """save_checkpoint writes config.dtype whatever the tensors' dtype in memory."""
    ckpt = make_checkpoint(tmp_path / "ckpt", dtype="float16")
    with safe_open(str(ckpt / ADAPTERS_FILE), framework="pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"F16"}
    assert load_checkpoint(ckpt).config.dtype == "float16"
