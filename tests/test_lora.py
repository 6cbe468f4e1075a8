from __future__ import annotations

import copy
from dataclasses import asdict

import pytest
import torch
from transformers import AutoModelForCausalLM

from dgpo.lora import (
    LoraSettings,
    adapter_state_dict,
    adapters_disabled,
    allow_missing_base_weights,
    apply_lora,
    drop_frozen_base_weights,
    engine_weights,
    export_merged,
    lora_scalings,
    merge_lora_weights,
)

SETTINGS = LoraSettings(r=4, alpha=8.0, target_modules="all-linear")


def _base(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _policy(path: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model with adapters whose B is non-zero (a freshly made adapter is a no-op)."""
    policy = apply_lora(_base(path), SETTINGS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return policy.eval()


def _ids() -> torch.Tensor:
    return torch.arange(3, 3 + 2 * 12).reshape(2, 12)


class _Holder(torch.nn.Module):
    """Stands in for RLVRModule: a ``policy`` child and the checkpoint hooks."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.register_state_dict_post_hook(drop_frozen_base_weights)
        self.register_load_state_dict_post_hook(allow_missing_base_weights)


@pytest.mark.parametrize(("field", "value", "match"), [
    ("r", 0, "lora.r must be an integer >= 1, got 0"),
    ("r", 2.5, "lora.r must be an integer"),
    ("alpha", 0.0, "lora.alpha must be > 0"),
    ("dropout", 1.0, r"lora.dropout must be in \[0, 1\)"),
    ("target_modules", [], "lora.target_modules must be"),
    ("target_modules", "", "lora.target_modules must be"),
])
def test_lora_settings_rejects_out_of_range(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoraSettings(**{field: value})


def test_lora_settings_build_from_saved_hparams() -> None:
    saved = asdict(LoraSettings(r=8, alpha=16.0, target_modules=["q_proj", "v_proj"]))
    assert LoraSettings.build(saved) == LoraSettings(r=8, alpha=16.0,
                                                     target_modules=["q_proj", "v_proj"])
    assert LoraSettings.build(None) is None
    with pytest.raises(ValueError, match=r"unknown lora settings \['rank'\]"):
        LoraSettings.build({"rank": 8})


def test_apply_lora_only_adapters_require_grad(tiny_model_path: str) -> None:
    policy = apply_lora(_base(tiny_model_path), SETTINGS)
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # by hand: hidden 128, 2 KV heads x 32 = 64, intermediate 256; r (in + out) per adapted layer
    per_layer = sum(4 * (i + o) for i, o in [(128, 128), (128, 64), (128, 64), (128, 128),
                                             (128, 256), (128, 256), (256, 128)])
    assert sum(p.numel() for p in trainable.values()) == 2 * per_layer == 16384
    assert set(lora_scalings(policy).values()) == {8.0 / 4}


def test_apply_lora_rejects_unknown_target(tiny_model_path: str) -> None:
    with pytest.raises(ValueError, match=r"lora.target_modules \['nope'\] does not fit"):
        apply_lora(_base(tiny_model_path), LoraSettings(target_modules=["nope"]))


def test_engine_weights_equal_merged_state_dict(tiny_model_path: str) -> None:
    policy = _policy(tiny_model_path)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()  # peft's own merge
    ours = dict(engine_weights(policy))
    # the same names (an adapted weight comes after its bias: it waits for its adapters)
    assert sorted(ours) == sorted(merged) == sorted(_base(tiny_model_path).state_dict())
    for name, tensor in merged.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours["model.embed_tokens.weight"],
                               before["base_model.model.model.embed_tokens.weight"], rtol=0, atol=0)
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(ours[f"{q}.weight"], before[f"base_model.model.{q}.base_layer.weight"])
    for name, tensor in policy.state_dict().items():  # the policy itself is not modified
        assert torch.equal(tensor, before[name])


def test_merge_lora_weights_reports_a_missing_adapter(tiny_model_path: str) -> None:
    policy = _policy(tiny_model_path)
    named = [(k, v) for k, v in policy.state_dict().items()
             if "layers.1.mlp.up_proj.lora_B" not in k]
    with pytest.raises(RuntimeError, match="adapted layers .*layers.1.mlp.up_proj"):
        list(merge_lora_weights(named, lora_scalings(policy)))


def test_adapters_disabled_logits_equal_base_model(tiny_model_path: str) -> None:
    base, policy = _base(tiny_model_path), _policy(tiny_model_path)
    with torch.no_grad():
        expected = base(input_ids=_ids()).logits
        adapted = policy(input_ids=_ids()).logits
        with adapters_disabled(policy):
            reference = policy(input_ids=_ids()).logits
        again = policy(input_ids=_ids()).logits
    torch.testing.assert_close(reference, expected, rtol=0, atol=0)
    assert (adapted - expected).abs().max() > 1e-3  # the adapters do change the model
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)
    assert all(p.requires_grad == (".lora_" in n) for n, p in policy.named_parameters())


def test_adapters_disabled_rejects_a_model_without_adapters(tiny_model_path: str) -> None:
    with pytest.raises(ValueError, match="Qwen2ForCausalLM has no LoRA adapters"):
        with adapters_disabled(_base(tiny_model_path)):
            pass


def test_checkpoint_hooks_keep_only_adapters(tiny_model_path: str) -> None:
    holder = _Holder(_policy(tiny_model_path))
    state = holder.state_dict()
    expected = {f"policy.{k}".replace(".lora_A.", ".lora_A.default.")
                .replace(".lora_B.", ".lora_B.default.")
                for k in adapter_state_dict(holder.policy)}
    assert set(state) == expected and len(expected) == 28  # 2 layers x 7 linears x (A, B)
    fresh = _Holder(apply_lora(_base(tiny_model_path), SETTINGS))
    fresh.load_state_dict(state, strict=True)  # the frozen base may be missing
    for key, tensor in state.items():
        torch.testing.assert_close(fresh.state_dict()[key], tensor, rtol=0, atol=0)


def test_export_merged_round_trips(tiny_model_path: str, tmp_path) -> None:
    policy = _policy(tiny_model_path)
    checkpoint = {"hyper_parameters": {"model_name_or_path": tiny_model_path, "dtype": "float32",
                                       "lora": asdict(SETTINGS)},
                  "state_dict": _Holder(policy).state_dict()}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    out = export_merged(tmp_path / "last.ckpt", tmp_path / "merged")
    exported = _base(str(out))
    assert (out / "tokenizer.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=_ids()).logits,
                                   policy(input_ids=_ids()).logits, rtol=1e-5, atol=1e-5)


def test_export_merged_rejects_a_checkpoint_folder(tmp_path) -> None:
    with pytest.raises(ValueError, match="is a folder"):
        export_merged(tmp_path, tmp_path / "merged")
