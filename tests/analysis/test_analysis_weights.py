import numpy as np
import pytest
import torch

from dgpo.analysis import comparison_losses, convert_weight, method_name, weight_curve
from dgpo.analysis.figure2 import BASELINES, weight_functions
from dgpo.analysis.weights import TOKEN_LEVEL_METHODS
from dgpo.losses import LOSSES, CISPOLoss, DGPOLoss, GRPOLoss, GSPOLoss, SAPOLoss


def test_comparison_losses_share_the_trained_widths_and_reuse_the_trained_loss():
    active = DGPOLoss(clip_low=0.1, clip_high=0.3, n=2, m=3)
    losses = comparison_losses(active)
    assert list(losses) == list(TOKEN_LEVEL_METHODS)
    assert set(LOSSES) - set(TOKEN_LEVEL_METHODS) == {"gspo", "gmpo"}
    assert losses["dgpo"] is active
    assert all(loss.clip_low == 0.1 and loss.clip_high == 0.3 for loss in losses.values())
    assert list(comparison_losses(CISPOLoss(clip_low=None), ["grpo"])) == ["grpo"]
    assert comparison_losses(CISPOLoss(clip_low=None), ["grpo"])["grpo"].clip_low == 0.2
    with pytest.raises(ValueError, match="unknown methods"):
        comparison_losses(active, ["nope"])


def test_method_name_of_builtin_and_user_losses():
    from tests.plugins import SignedLogProbLoss

    assert method_name(GRPOLoss()) == "grpo"
    assert method_name(SignedLogProbLoss()) == "signedlogprobloss"


def test_convert_weight_kinds():
    weight, prob, old = np.array([2.0, 4.0]), np.array([0.5, 0.2]), np.array([0.5, 0.25])
    np.testing.assert_allclose(convert_weight(weight, prob, old, "prob"), weight)
    np.testing.assert_allclose(convert_weight(weight, prob, old, "relative"), [1.0, 1.0])
    np.testing.assert_allclose(convert_weight(weight, prob, old, "logprob"), [1.0, 0.8])
    with pytest.raises(ValueError, match="weight kind must be one of"):
        convert_weight(weight, prob, old, "log")


def test_weight_curve_is_prob_weight_on_a_grid():
    loss = DGPOLoss(n=2)
    grid = np.linspace(0.01, 1.0, 50)
    expected = loss.prob_weight(torch.tensor(grid / 0.4), torch.full((50,), 0.4),
                                torch.full((50,), -1.0)).numpy()
    np.testing.assert_allclose(weight_curve(loss, grid, 0.4, -1.0), expected)


def test_figure2_curves_have_the_papers_shape():
    old = 0.5
    grid, curves = weight_functions(old)
    low, high = 0.8 * old, 1.2 * old
    ln, hp = grid < low, grid > high
    pg = 1 / old
    for label in ("GRPO", "DGPO (n=1, m=2)", "DGPO (n=2, m=3)", "GPPO"):
        inside = (grid >= low) & (grid <= high)
        np.testing.assert_allclose(curves[label]["negative"][inside], pg)
        np.testing.assert_allclose(curves[label]["positive"][inside], pg)
    assert (curves["GRPO"]["negative"][ln] == 0).all()
    assert (curves["GRPO"]["positive"][hp] == 0).all()
    np.testing.assert_allclose(curves["GPPO"]["negative"][ln], 0.8 / grid[ln])  # ~1/π diverges
    dgpo = curves["DGPO (n=1, m=2)"]
    np.testing.assert_allclose(dgpo["negative"][ln], grid[ln] / (0.8 * old**2))  # C_left·π
    np.testing.assert_allclose(dgpo["positive"][hp], 1.2**0.5 * old**-0.5 * grid[hp] ** -0.5)
    # continuous at both boundaries, decaying past them; n=2 decays faster on LN, m=3 gentler on HP
    assert dgpo["negative"][grid == low][0] == pytest.approx(pg)
    assert np.all(np.diff(dgpo["negative"][ln]) > 0)  # grows with π, i.e. → 0 as π → 0
    other = curves["DGPO (n=2, m=3)"]
    assert (other["negative"][ln] < dgpo["negative"][ln]).all()
    assert (other["positive"][hp] > dgpo["positive"][hp]).all()


def test_sequence_level_methods_have_no_token_curve_and_no_comparison_column():
    with pytest.raises(ValueError, match=r"methods \['gspo'\] are sequence-level"):
        comparison_losses(None, ["grpo", "gspo"])
    with pytest.raises(ValueError, match=r"methods \['gmpo'\] are sequence-level"):
        weight_functions(0.5, methods=["gmpo"])
    with pytest.raises(ValueError, match="GSPOLoss is sequence-level"):
        weight_curve(GSPOLoss(), np.linspace(0.1, 1.0, 5), 0.5, 1.0)
    # a sequence-level trained loss does not impose its (sequence-ratio) widths on the others
    assert comparison_losses(GSPOLoss(), ["grpo"])["grpo"].clip_high == 0.2


def test_figure2_sapo_curve_is_its_smooth_bump():
    old = 0.5
    assert "sapo" in BASELINES
    grid, curves = weight_functions(old)
    ratio = grid / old
    for sign, tau in (("negative", 1.05), ("positive", 1.0)):
        sigma = 1 / (1 + np.exp(-tau * (ratio - 1)))
        np.testing.assert_allclose(curves["SAPO"][sign], 4 * sigma * (1 - sigma) / old, rtol=1e-9)
    assert curves["SAPO"]["positive"][np.argmin(np.abs(grid - old))] == pytest.approx(1 / old)
    expected = SAPOLoss().prob_weight(torch.tensor(ratio), torch.full((len(grid),), old),
                                      torch.full((len(grid),), 1.0)).numpy()
    np.testing.assert_allclose(curves["SAPO"]["positive"], expected)
