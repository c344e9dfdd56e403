"""The training tool's optimizer takes its parameter groups from the model (one source of the
official rules); the stand-in model reuses SED's grouping function itself."""
import pytest
import torch

from train_synthetic import TinySED
from sed_fast.training.optim import SolverConfig, build_optimizer, param_groups


def test_the_optimizer_uses_the_models_groups_with_the_solver_values(monkeypatch):
    model = TinySED(3).train()
    calls = []
    real = TinySED.trainable_parameter_groups

    def recording(self, **solver):
        calls.append(solver)
        return real(self, **solver)

    monkeypatch.setattr(TinySED, "trainable_parameter_groups", recording)
    config = SolverConfig(base_lr=1e-3, weight_decay=0.05, weight_decay_norm=0.01, clip_multiplier=0.1)
    optimizer = build_optimizer(model, config)
    assert calls == [dict(base_lr=1e-3, weight_decay=0.05, weight_decay_norm=0.01, clip_multiplier=0.1)]
    where = {name: (g["lr"], g["weight_decay"], g["initial_lr"]) for g in optimizer.param_groups for name in g["names"]}
    prefix = "sem_seg_head.predictor."
    # The decoder's ConvNeXt-block norm keeps the full weight decay (official: not a norm type).
    assert where[prefix + "transformer.cnext.norm.weight"] == (1e-3, 0.05, 1e-3)
    assert where[prefix + "transformer.cnext.gamma"] == (1e-3, 0.05, 1e-3)
    assert where[prefix + "clip_model.visual.norm.weight"] == pytest.approx((1e-4, 0.01, 1e-4))
    assert where[prefix + "clip_model.visual.stem.weight"] == pytest.approx((1e-4, 0.05, 1e-4))
    assert not any("clip_model.transformer" in n or "logit_scale" in n for n in where)  # frozen
    assert {n for n in where} == {n for n, p in model.named_parameters() if p.requires_grad}


def test_a_model_without_groups_or_trainable_parameters_is_refused():
    with pytest.raises(TypeError, match="trainable_parameter_groups"):
        param_groups(torch.nn.Linear(2, 2), SolverConfig())
    model = TinySED(3).train()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(model, SolverConfig())
