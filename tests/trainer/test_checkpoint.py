"""safetensors checkpoints: round trips and clear errors."""

import pytest
import torch
from trainer_support import tiny_model

from kvpo.run.checkpoint import (
    CheckpointError,
    load_model,
    load_training,
    save_model,
    save_training,
    saved_progress,
    trainer_config,
)
from kvpo.run.config import BASE_CHECKPOINT


def test_model_round_trip(tmp_path):
    m = tiny_model()
    save_model(m, tmp_path / "m.safetensors", extra={"note": 1})
    m2 = load_model(tmp_path / "m.safetensors")
    assert m2.cfg == m.cfg
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_training_round_trip(tmp_path):
    m = tiny_model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    m(
        torch.randn(1, 2 * m.frame_tokens, m.token_dim),
        torch.rand(1),
        m.encode_prompts(["a"]),
        torch.tensor([[0, 1]]),
        torch.tensor([[0, 1]], dtype=torch.int32),
    ).square().sum().backward()
    opt.step()
    save_training(tmp_path / "t.safetensors", m, opt, 3, {"lr": 1e-3}, [{"iter": 0}])
    m2, opt2, it, cfg, hist = load_training(
        tmp_path / "t.safetensors", lambda mm: torch.optim.AdamW(mm.parameters(), lr=1e-3)
    )
    assert it == 3 and cfg == {"lr": 1e-3} and hist == [{"iter": 0}]
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        for k in s1[i]:
            torch.testing.assert_close(
                torch.as_tensor(s2[i][k]).float(), torch.as_tensor(s1[i][k]).float(), rtol=0, atol=0
            )
    assert load_model(tmp_path / "t.safetensors").cfg == m.cfg
    # a run's out_dir stands for its latest checkpoint
    (tmp_path / "t.safetensors").rename(tmp_path / "checkpoint.safetensors")
    assert trainer_config(tmp_path) == {"lr": 1e-3}
    for (k, a), b in zip(
        m.state_dict().items(), load_model(tmp_path).state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k


def test_shipped_base_checkpoint_loads():
    m = load_model(BASE_CHECKPOINT)
    assert sum(p.numel() for p in m.parameters()) > 1_000_000


def test_unreadable_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="a directory without a checkpoint.safetensors"):
        load_model(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(bad)
    save_model(tiny_model(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="not a training one"):
        load_training(tmp_path / "m.safetensors", lambda m: None)
    with pytest.raises(CheckpointError, match=r"no EMA weights \(train with --ema 0.999"):
        load_model(tmp_path / "m.safetensors", ema=True)


def test_checkpoints_that_do_not_describe_their_model(tmp_path):
    """A tensor of another shape and a model_config that is not one: CheckpointErrors naming the
    file (the CLIs print them as error lines), not load_state_dict's RuntimeError."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    save_model(tiny_model(), tmp_path / "m.safetensors")
    tensors = load_file(tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        meta = f.metadata()
    name = next(k for k in tensors if k.endswith("k_norm.weight"))
    save_file({**tensors, name: tensors[name][:1].clone()}, tmp_path / "shape.safetensors", meta)
    with pytest.raises(CheckpointError, match=f"(?s)shape.safetensors' does not match .*{name}"):
        load_model(tmp_path / "shape.safetensors")
    missing = {k: v for k, v in tensors.items() if k != name}
    save_file(missing, tmp_path / "missing.safetensors", meta)
    with pytest.raises(CheckpointError, match=f"does not match the model: missing \\['{name}'\\]"):
        load_model(tmp_path / "missing.safetensors")
    save_file(
        {**tensors, "extra.weight": tensors[name].clone()}, tmp_path / "extra.safetensors", meta
    )
    with pytest.raises(CheckpointError, match=r"missing \[\], unexpected \['extra.weight'\]"):
        load_model(tmp_path / "extra.safetensors")
    save_file(tensors, tmp_path / "bare.safetensors", {"format": "pt"})
    with pytest.raises(CheckpointError, match="bare.safetensors' has no model_config metadata"):
        load_model(tmp_path / "bare.safetensors")
    for config, match in (("{not json", "Expecting"), ('{"dim": -1}', "dim must be positive")):
        save_file(tensors, tmp_path / "config.safetensors", {**meta, "model_config": config})
        with pytest.raises(CheckpointError, match=f"model_config metadata .*{match}"):
            load_model(tmp_path / "config.safetensors")
    # a training checkpoint's own entries
    m = tiny_model()
    save_training(tmp_path / "t.safetensors", m, torch.optim.AdamW(m.parameters()), 3, {}, [])
    tensors = load_file(tmp_path / "t.safetensors")
    with safe_open(tmp_path / "t.safetensors", "pt") as f:
        meta = f.metadata()
    adamw = lambda model: torch.optim.AdamW(model.parameters())
    for key in ("trainer", "history", "optim_groups", "optim_scalars", "iteration"):
        save_file(tensors, tmp_path / "broken.safetensors", {**meta, key: "{broken"})
        with pytest.raises(CheckpointError, match=f"broken.safetensors': its {key} metadata"):
            load_training(tmp_path / "broken.safetensors", adamw)
    save_file(tensors, tmp_path / "broken.safetensors", {**meta, "iteration": "-2"})
    with pytest.raises(CheckpointError, match="iteration -2 is not a count"):
        load_training(tmp_path / "broken.safetensors", adamw)
    with pytest.raises(CheckpointError, match="iteration -2 is not a count"):
        saved_progress(tmp_path / "broken.safetensors")  # read from the header alone
    for value, shown in (('"two"', "'two'"), ("true", "True"), ("1.5", "1.5")):
        save_file(tensors, tmp_path / "broken.safetensors", {**meta, "iteration": value})
        for read in (saved_progress, lambda path: load_training(path, adamw)):
            with pytest.raises(CheckpointError, match=f"iteration {shown} is not a count"):
                read(tmp_path / "broken.safetensors")
    one_param = lambda model: torch.optim.AdamW([next(model.parameters())])
    with pytest.raises(CheckpointError, match="optimizer state in .*t.safetensors' does not fit"):
        load_training(tmp_path / "t.safetensors", one_param)  # AdamW over another parameter list


def test_run_config_reads_what_an_older_run_saved(tmp_path):
    """The config a checkpoint's run saved, as kvpo.evaluate and kvpo.sample read it: what the
    run wrote as it trained (settings an older version let through, now refused) is left out,
    overrides apply."""
    from kvpo.run.checkpoint import run_config

    m = tiny_model()
    saved = {
        "lr": 3e-4,
        "iterations": 2,
        "samples": False,
        "samples_at_eval": True,
        "profile_iteration": 5,
        "resume": "elsewhere.safetensors",
    }
    path = tmp_path / "t.safetensors"
    save_training(path, m, torch.optim.AdamW(m.parameters()), 2, saved, [])
    cfg = run_config(path, {"eval_seeds": 2})
    assert (cfg.lr, cfg.eval_seeds, cfg.resume, cfg.profile_iteration) == (3e-4, 2, "", -1)
