"""Direct preference losses (algorithms/preference.py) against TRL 1.12's formulas, transcribed.

The references below copy TRL's arithmetic (trl/trainer/dpo_trainer.py, `_compute_loss`, lines 1427-1481 and
1572-1579: `delta_score = chosen_logratios - rejected_logratios`, then per loss type; and
trl/experimental/cpo/cpo_trainer.py, `cpo_loss`, lines 677-726) on random tensors, as the RL math is checked
against verl's (test_reasoning_options.py).
"""

import pytest
import torch
import torch.nn.functional as F

from rlhf_cli.algorithms import PREFERENCE_LOSSES, bind, chosen_nll

B = 16


@pytest.fixture
def pairs():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 30, (2, B), generator=g).double()
    logps = -torch.rand(4, B, generator=g, dtype=torch.float64) * tokens.repeat(2, 1) * 3  # sums of per-token log-probs
    chosen, rejected, ref_chosen, ref_rejected = logps
    return chosen, rejected, ref_chosen, ref_rejected, tokens[0], tokens[1]


def trl_dpo(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens, loss_type, beta):
    """TRL DPOTrainer: reverse-KL scores (the default f-divergence), then `loss_type`."""
    chosen_scores, rejected_scores = chosen - ref_chosen, rejected - ref_rejected
    delta_score = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta_score)
    # ipo: each score averaged over its completion's tokens
    ipo_delta = chosen_scores / chosen_tokens.clamp(min=1.0) - rejected_scores / rejected_tokens.clamp(min=1.0)
    return (ipo_delta - 1 / (2 * beta)) ** 2


def trl_cpo(chosen_avg, rejected_avg, loss_type, beta, label_smoothing, simpo_gamma=0.0):
    """TRL CPOTrainer (alpha = 0): logits = chosen - rejected; simpo subtracts simpo_gamma / beta."""
    logits = chosen_avg - rejected_avg
    if loss_type == "simpo":
        logits = logits - simpo_gamma / beta
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_and_ipo_equal_trls(pairs, beta):
    keys = {"beta": beta, "label_smoothing": 0.0, "gamma": 0.0}
    for name in ("sigmoid", "ipo"):
        ours = bind(PREFERENCE_LOSSES.get(name), keys, 6, "dpo.loss")(*pairs)
        assert torch.allclose(ours, trl_dpo(*pairs, name, beta), rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_conservative_dpo_is_the_cpo_sigmoid_form_on_the_implicit_rewards(pairs, label_smoothing):
    chosen, rejected, ref_chosen, ref_rejected, *_ = pairs
    ours = bind(PREFERENCE_LOSSES.get("sigmoid"), {"beta": 0.2, "label_smoothing": label_smoothing}, 6,
                "dpo.loss")(*pairs)
    want = trl_cpo(chosen - ref_chosen, rejected - ref_rejected, "sigmoid", 0.2, label_smoothing)
    assert torch.allclose(ours, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (2.5, 1.4)])
def test_simpo_equals_trls_without_any_reference(pairs, beta, gamma):
    chosen, rejected, _, _, chosen_tokens, rejected_tokens = pairs
    assert PREFERENCE_LOSSES.trait("simpo", "reference_free") and not PREFERENCE_LOSSES.trait("sigmoid", "reference_free")
    ours = bind(PREFERENCE_LOSSES.get("simpo"), {"beta": beta, "gamma": gamma, "label_smoothing": 0.0}, 6,
                "dpo.loss")(chosen, rejected, None, None, chosen_tokens, rejected_tokens)
    want = trl_cpo(chosen / chosen_tokens, rejected / rejected_tokens, "simpo", beta, 0.0, simpo_gamma=gamma)
    assert torch.allclose(ours, want, rtol=1e-12, atol=1e-12)


def test_losses_at_equal_policy_and_reference():
    # d = 0: DPO is log 2, IPO is (1 / (2 beta))^2, whatever the lengths
    z, n = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 5.0, 9.0], dtype=torch.float64)
    assert torch.allclose(bind(PREFERENCE_LOSSES.get("sigmoid"), {"beta": 0.1, "label_smoothing": 0.0}, 6, "l")(
        z - 4, z - 7, z - 4, z - 7, n, n), torch.full((3,), 0.6931471805599453, dtype=torch.float64))
    assert torch.allclose(bind(PREFERENCE_LOSSES.get("ipo"), {"beta": 0.1}, 6, "l")(z, z, z, z, n, n),
                          torch.full((3,), 25.0, dtype=torch.float64))


def test_the_sft_term_is_trls_cross_entropy_over_every_chosen_token():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (4, 7), generator=g)
    mask = torch.rand(4, 7, generator=g) < 0.7
    mask[:, 0] = True
    per_token = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)  # log pi of each label
    chosen, tokens = (per_token * mask).sum(-1), mask.sum(-1).double()
    trl = F.cross_entropy(logits[mask], labels[mask])  # dpo_trainer.py 1572-1579
    assert torch.allclose(chosen_nll(chosen, tokens), trl, rtol=1e-12)
