"""The learning-rate schedule, gradient clipping and the module's argument checks."""

import math

import pytest
import torch

from dgpo.module import RLVRModule
from dgpo.optim import adamw_with_schedule, check_schedule, clip_grad_norm, lr_factor


def test_warmup_is_linear_then_constant():
    assert [lr_factor(s, 4, "constant", 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_decays_from_the_peak_to_the_floor_and_stays_there():
    # 2 warm-up steps, then cos over 8 steps: halfway (step 6) is the mean of peak and floor
    factors = [lr_factor(s, 2, "cosine", 10, min_lr_ratio=0.1) for s in range(12)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[6] == pytest.approx(0.55)
    assert factors[4] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert factors[10] == factors[11] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False))


def test_the_scheduler_sets_lr_times_factor_each_step():
    param = torch.nn.Parameter(torch.zeros(1))
    config = adamw_with_schedule([param], lr=0.2, betas=(0.9, 0.999), weight_decay=0.0,
                                 warmup_steps=2, schedule="cosine", total_steps=6)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    seen = []
    for _ in range(7):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.2 * lr_factor(s, 2, "cosine", 6) for s in range(7)]
    assert seen == pytest.approx(expected)


def test_clipping_scales_to_the_global_norm_and_reports_it():
    model = torch.nn.Linear(2, 1, bias=True)
    model.weight.grad = torch.tensor([[3.0, 0.0]])
    model.bias.grad = torch.tensor([4.0])
    norm = clip_grad_norm(model, 1.0)
    assert float(norm) == pytest.approx(5.0)
    torch.testing.assert_close(model.weight.grad, torch.tensor([[0.6, 0.0]]))
    assert float(clip_grad_norm(model, None)) == pytest.approx(1.0)  # measured, not clipped


@pytest.mark.parametrize(("changes", "message"), [
    ({"lr": 0.0}, "lr must be > 0, got 0.0"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0, got -1"),
    ({"schedule": "linear"}, "lr_schedule must be 'constant' or 'cosine', got 'linear'"),
    ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\], got 1.5"),
])
def test_schedule_settings_out_of_range_are_refused(changes, message):
    settings = {"lr": 1e-6, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant",
                "min_lr_ratio": 0.0, **changes}
    with pytest.raises(ValueError, match=message):
        check_schedule(**settings)


@pytest.mark.parametrize(("changes", "message"), [
    ({"lr": -1.0}, "lr must be > 0"),
    ({"lr_schedule": "step"}, "lr_schedule must be"),
    ({"micro_batch_size": 0}, "micro_batch_size must be > 0, got 0"),
    ({"logprob_chunk_size": 0}, "logprob_chunk_size must be > 0"),
    ({"kl_coef": -0.1}, "kl_coef must be >= 0, got -0.1"),
    ({"entropy_coef": -1.0}, "entropy_coef must be >= 0"),
    ({"logprob_keep_gib": float("nan")}, "logprob_keep_gib must be >= 0, got nan"),
    ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
    ({"dtype": "float8"}, "dtype must be one of"),
    ({"loss": "ppo"}, "ppo"),
])
def test_module_refuses_bad_settings_with_a_clear_error(tiny_model_path, changes, message):
    with pytest.raises(ValueError, match=message):
        RLVRModule(tiny_model_path, **changes)
