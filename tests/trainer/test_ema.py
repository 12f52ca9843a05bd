"""ParamEMA: the exponential moving average of a policy's weights."""

import pytest
import torch
from trainer_support import tiny_model

from kvpo.generators.ema import ParamEMA


def test_ema_follows_the_recursion_in_float64():
    model = tiny_model()
    decay = 0.9
    ema = ParamEMA(model, decay)
    want = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        ema.update(model)
        for n, p in model.named_parameters():
            want[n] = decay * want[n] + (1 - decay) * p.detach().double()
    for n, e in ema.model.named_parameters():
        torch.testing.assert_close(e.double(), want[n], rtol=1e-5, atol=1e-5)
        assert not e.requires_grad
    assert not torch.equal(next(ema.model.parameters()), next(model.parameters()))


def test_ema_starts_from_init_and_rejects_bad_decay():
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    ema = ParamEMA(a, 0.5, init=b)
    for e, q in zip(ema.model.parameters(), b.parameters(), strict=True):
        assert torch.equal(e, q)
    for d in (1.0, -0.1):
        with pytest.raises(ValueError, match="decay"):
            ParamEMA(a, d)


def test_a_lora_policy_shares_its_frozen_base_with_the_ema(tmp_path):
    """The base of a LoRA policy never changes: the EMA holds the same tensors, averages only
    the adapters, and a checkpoint stores the base once yet loads the whole EMA back."""
    from kvpo.run.checkpoint import load_model, save_training

    model = tiny_model()
    model.add_lora(rank=2)
    decay = 0.5
    ema = ParamEMA(model, decay)
    pairs = list(zip(model.named_parameters(), ema.model.parameters(), strict=True))
    assert all((e is p) == (not p.requires_grad) for (_, p), e in pairs)
    assert any(p.requires_grad for (_, p), _ in pairs) and any(e is p for (_, p), e in pairs)
    want = {n: p.detach().clone() for (n, p), _ in pairs}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    ema.update(model)
    for (n, p), e in pairs:
        expect = want[n] if not p.requires_grad else decay * want[n] + (1 - decay) * p.detach()
        torch.testing.assert_close(e.detach(), expect)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    path = tmp_path / "ck.safetensors"
    save_training(path, model, opt, 1, {}, [], ema=ema.model)
    from safetensors.torch import load_file

    keys = load_file(str(path)).keys()
    assert not any(k.startswith("ema.") and "base" in k for k in keys)
    assert any(k.startswith("ema.") and "lora_b" in k for k in keys)
    back = load_model(path, ema=True)
    for (n, b), e in zip(back.named_parameters(), ema.model.parameters(), strict=True):
        assert torch.equal(b, e), n
