"""LoRA adapters: the layer's formula, the model wrapped and merged, checkpoints, training."""

import pytest
import torch
from torch import nn
from trainer_support import tiny_model

from kvpo.generators.lora import LoRALinear
from kvpo.generators.model import TinyARVideo
from kvpo.run.checkpoint import load_model, save_model


def _randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=gen) * 0.2)


def _velocity(model: TinyARVideo, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    L = model.chunk_frames * model.frame_tokens
    x = torch.randn(2, L, model.token_dim, generator=gen)
    cond = model.encode_prompts(["a large red circle moving left slowly"] * 2)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)  # each row its own pages
    frames = torch.tensor([[0, 1], [0, 1]])
    return model(x, torch.tensor([0.9, 0.5]), cond, frames, table)


def test_lora_linear_matches_float64_formula_and_merges():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), base(x))  # B starts at zero
    _randomize_adapters(layer)
    a, b = layer.lora_a.double(), layer.lora_b.double()
    want = x.double() @ (base.weight.double() + 2.0 * b @ a).t() + base.bias.double()
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.merged()(x), layer(x), rtol=1e-5, atol=1e-6)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_a", "lora_b"]
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(base, rank=0)


def test_a_16_bit_base_keeps_float32_adapters():
    """A bfloat16 base (half the memory of a large frozen model) with float32 adapters: the
    output is bfloat16, the adapter's contribution is computed in float32 and rounded once."""
    torch.manual_seed(1)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear(base, rank=4)
    assert layer.lora_a.dtype == layer.lora_b.dtype == torch.float32
    _randomize_adapters(layer)
    x = torch.randn(3, 16).to(torch.bfloat16)
    y = layer(x)
    a, b = layer.lora_a.double(), layer.lora_b.double()
    want = base(x).double() + (x.double() @ a.t() @ b.t()).to(torch.bfloat16).double()
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert layer.lora_a.grad.dtype == torch.float32 and base.weight.grad is None
    merged = layer.merged()
    assert merged.weight.dtype == torch.bfloat16
    torch.testing.assert_close(merged(x).float(), y.float(), rtol=2e-2, atol=2e-2)


def test_model_adapters_train_alone_save_load_and_merge(tmp_path):
    model = tiny_model()
    before = _velocity(model)
    model.add_lora(4)
    torch.testing.assert_close(_velocity(model), before)  # starts as the base model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    assert sum(".mlp." in n for n in names) == 2 * 2 * len(model.blocks)  # both MLP layers
    _randomize_adapters(model)
    adapted = _velocity(model)
    assert (adapted - before).abs().max() > 1e-3
    save_model(model, tmp_path / "lora.safetensors")
    loaded = load_model(tmp_path / "lora.safetensors")
    assert loaded.cfg.lora_rank == 4
    torch.testing.assert_close(_velocity(loaded), adapted)
    assert all(
        n.endswith(("lora_a", "lora_b")) for n, p in loaded.named_parameters() if p.requires_grad
    )
    loaded.merge_lora()
    assert loaded.cfg.lora_rank == 0 and not any(
        isinstance(m, LoRALinear) for m in loaded.modules()
    )
    torch.testing.assert_close(_velocity(loaded), adapted, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="already has LoRA"):
        model.add_lora(2)
