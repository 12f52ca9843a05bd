"""ParamEMA: the exponential moving average of a policy's weights."""

import pytest
import torch
from trainer_support import tiny_model

from kvpo.ema import ParamEMA


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
