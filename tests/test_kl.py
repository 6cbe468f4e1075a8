"""The KL penalty to the frozen reference model: the k3 estimator, its gradient, and a run."""

import math
import re

import pytest
import torch
import yaml

from dgpo.cli import main
from dgpo.losses import DGPOLoss, k3_kl
from dgpo.module import RLVRModule
from tests.plugins import recompute_step
from tests.test_cli import epoch_metrics, initial_weights, run_dir, tiny_config

KL_COEF = 0.5


def test_k3_by_hand():
    # π = 0.5, π_ref = 0.25: r = π_ref/π = 0.5, k3 = r − log r − 1 = 0.5 + log 2 − 1
    logp, ref = torch.tensor([math.log(0.5), 0.0]), torch.tensor([math.log(0.25), 0.0])
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([math.log(2) - 0.5, 0.0]))


def test_k3_expectation_under_the_policy_is_the_exact_kl():
    """E_{x∼π}[k3(x)] = KL(π‖π_ref), computed exactly over a small vocabulary."""
    generator = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, 11, generator=generator, dtype=torch.float64), -1)
    ref = torch.log_softmax(torch.randn(5, 11, generator=generator, dtype=torch.float64), -1)
    expected = (logp.exp() * (logp - ref)).sum(-1)
    torch.testing.assert_close((logp.exp() * k3_kl(logp, ref)).sum(-1), expected)


def test_k3_gradient_is_one_minus_the_ratio():
    logp = torch.tensor([-0.3, -1.2, -2.0], requires_grad=True)
    ref = torch.tensor([-0.5, -0.4, -2.0])
    k3_kl(logp, ref).sum().backward()
    torch.testing.assert_close(logp.grad, 1 - torch.exp(ref - logp.detach()))


def test_state_dict_leaves_the_reference_model_out(tiny_model_path):
    module = RLVRModule(tiny_model_path, kl_coef=0.1)
    module.configure_model()
    state = module.state_dict()
    assert state and not any(key.startswith("reference.") for key in state)
    assert any(key.startswith("policy.") for key in state)
    module.load_state_dict(state)  # strict, without the reference model's entries
    removed = "policy.lm_head.weight" if "policy.lm_head.weight" in state else next(iter(state))
    del state[removed]
    # only the policy's key is reported missing, none of the reference model's
    with pytest.raises(RuntimeError,
                       match=re.escape(f'Missing key(s) in state_dict: "{removed}". ')):
        module.load_state_dict(state)


def test_a_run_with_the_kl_penalty_matches_one_process_recomputation(tmp_path, tiny_model_path):
    """The second step's gradient (policy moved, KL > 0) equals the written-out loss + KL."""
    dump = tmp_path / "steps.pt"
    callbacks = {"class_path": "tests.plugins.GradientDump",
                 "init_args": {"path": str(dump), "steps": [1]}}
    path = tiny_config(tmp_path / "run", tiny_model_path, **{
        "trainer.max_epochs": 2, "model.kl_coef": KL_COEF, "model.max_grad_norm": None})
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"].append(callbacks)
    path.write_text(yaml.safe_dump(config))
    run = main(["fit", "--config", str(path)])
    record = torch.load(dump, weights_only=False)[1]
    loss, kl, expected = recompute_step(record, tiny_model_path, DGPOLoss(), KL_COEF)
    assert kl > 1e-4
    # the step's total: the policy loss plus the KL penalty's term
    assert math.isclose(record["loss"], loss + KL_COEF * kl, rel_tol=1e-4, abs_tol=1e-6)
    _, _, without_kl = recompute_step(record, tiny_model_path, DGPOLoss(), 0.0)
    assert max(float((expected[n] - without_kl[n]).abs().max()) for n in expected) > 1e-5
    for name, grad in expected.items():
        torch.testing.assert_close(record["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # the reference model stays the initial policy; checkpoints leave it out and resume strictly
    start = initial_weights(tiny_model_path)
    for name, tensor in run.model.reference.state_dict().items():
        torch.testing.assert_close(tensor, start[name], rtol=0, atol=0, msg=name)
    last = run_dir(tmp_path / "run") / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)["state_dict"]
    assert not any(key.startswith("reference.") for key in saved)
    assert (epoch_metrics(tmp_path / "run")["train/kl"] > 0).all()
    resumed = main(["fit", "--config", str(path), "--trainer.max_epochs", "3",
                    "--ckpt_path", str(last)])
    assert resumed.trainer.current_epoch == 3
