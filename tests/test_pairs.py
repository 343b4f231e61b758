"""models/pairs.py: a preference pair's two responses in one forward, the prompt and the responses' common start
computed once under a tree mask; the numbers and gradients are each response's whole row's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layouts import LAYOUTS, build_layout
from rlhf_cli import data, task
from rlhf_cli.models import load_causal_lm, load_tokenizer, stop_token_ids
from rlhf_cli.models.pairs import CHOSEN, REJECTED, SHARED, pair_layout, pair_sums, shared_tokens, tree_unsupported


def whole_row_logprob(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log pi(response | prompt) from one unpadded forward of the whole row, with gradients."""
    ids = torch.tensor([prompt + response])
    logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(prompt) - 1:].sum()


def triples(tok, stop_ids) -> list[tuple[list[int], list[int], list[int]]]:
    """Pairs that share a long start (the embedded task's), none of it, and prompts of other lengths."""
    rows = task.preference_rows(5, seed=1) + [
        {"prompt": "Q?\n", "chosen": "yes indeed", "rejected": "no"},
        {"prompt": "A much longer prompt than the others, to pad.\n", "chosen": "same start, then one",
         "rejected": "same start, then another ending"}]
    pairs, _ = data.tokenize_preference(tok, rows, 400, "d", stop_ids)
    return [(p.chosen.prompt_ids, p.chosen.completion_ids, p.rejected.completion_ids) for p in pairs]


def perturbed(path: str):
    model = load_causal_lm(path, "model.path").eval()
    torch.manual_seed(0)
    with torch.no_grad():  # away from the fixture's init: every log-prob and gradient differs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("pair_layouts")
    return {"embedded": str(tiny_model_dir), **{name: str(build_layout(name, root / name)) for name in LAYOUTS}}


@pytest.mark.parametrize("name", ["embedded", *LAYOUTS])
def test_each_response_scores_as_its_whole_row_values_and_gradients(models, name):
    path = models[name]
    tok, model = load_tokenizer(path, "model.path"), perturbed(path)
    pairs = triples(tok, stop_token_ids(tok, path))
    assert tree_unsupported(model) is None  # plain causal attention, sdpa: the tree path runs
    assert any(shared_tokens(c, r) > 3 for _, c, r in pairs) and any(shared_tokens(c, r) == 0 for _, c, r in pairs)

    chosen, rejected, tokens = pair_sums(model, pairs, tok.pad_token_id, "cpu")
    margin = (chosen - rejected).sum()
    tree_grads = torch.autograd.grad(margin, list(model.parameters()))
    want_c = [whole_row_logprob(model, p, c) for p, c, _ in pairs]
    want_r = [whole_row_logprob(model, p, r) for p, _, r in pairs]
    assert chosen.tolist() == pytest.approx([float(x) for x in want_c], abs=1e-4)
    assert rejected.tolist() == pytest.approx([float(x) for x in want_r], abs=1e-4)
    assert tokens.tolist() == [[len(c) for _, c, _ in pairs], [len(r) for _, _, r in pairs]]
    whole_grads = torch.autograd.grad(sum(want_c) - sum(want_r), list(model.parameters()))
    for ours, want in zip(tree_grads, whole_grads):
        assert torch.allclose(ours, want, atol=1e-5 + 1e-4 * want.abs().max().item()), (ours - want).abs().max()


def test_a_pair_is_one_block_its_shared_part_once_each_rest_blind_to_the_other():
    prompt, chosen, rejected = [5, 6, 7], [10, 11, 12, 13, 2], [10, 11, 20, 2]
    layout = pair_layout([(prompt, chosen, rejected), ([8], [30, 2], [31, 2])], pad_id=0)
    ids = layout.inputs["input_ids"]
    assert ids.shape[0] == 1  # both blocks packed into one row: 3 + 2 + 3 + 2 and 1 + 2 + 2 tokens
    row = ids[0].tolist()
    start = next(i for i in range(len(row)) if row[i:i + 3] == prompt)
    block = row[start:start + 10]
    assert block == [5, 6, 7, 10, 11, 12, 13, 2, 20, 2]  # prompt, shared "10 11", chosen's rest, rejected's rest
    pos = layout.inputs["position_ids"][0, start:start + 10].tolist()
    assert pos == [0, 1, 2, 3, 4, 5, 6, 7, 5, 6]  # each rest continues the shared part's positions
    mask = layout.inputs["attention_mask"][0, 0]
    rejected_rest, chosen_rest = start + 8, start + 5
    assert not mask[rejected_rest, chosen_rest] and mask[rejected_rest, start + 4] and mask[rejected_rest, start]
    assert not mask[start + 4, start + 5]  # causal
    # the shared tokens are read once; each response's first own token is read from the shared part's last state
    mine = layout.pair == 0
    sides, at = layout.side[mine].tolist(), layout.at[mine].tolist()
    assert sides.count(SHARED) == 2 and sides.count(CHOSEN) == 3 and sides.count(REJECTED) == 2
    first_chosen = at[sides.index(CHOSEN)]
    assert first_chosen == at[sides.index(REJECTED)] == start + 4  # the state at "11" predicts 12 and 20
    assert layout.tokens.tolist() == [[5, 2], [4, 2]]


@pytest.mark.parametrize("window, tree", [(4, False), (8, True)])
def test_a_sliding_window_shorter_than_a_row_gets_whole_rows_a_longer_one_the_tree(window, tree):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=window)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    pairs = [([1, 2, 3], [10, 11, 12, 13, 2], [10, 11, 20, 2]), ([4], [30, 31, 32, 2], [33, 2])]  # rows of <= 8
    reason = tree_unsupported(model, 8)
    assert (reason is None) == tree and (tree or "sliding window of 4 tokens is shorter than a row" in reason)
    with torch.no_grad():
        chosen, rejected, _ = pair_sums(model, pairs, 0, "cpu")
        want = [[float(whole_row_logprob(model, p, x)) for p, *both in pairs for x in [both[side]]] for side in (0, 1)]
    # a window of 4 is shorter than these rows: a tree mask would have let tokens see past it; 8 cuts nothing
    assert chosen.tolist() == pytest.approx(want[0], abs=1e-5) and rejected.tolist() == pytest.approx(want[1], abs=1e-5)
    assert pair_layout(pairs, 0, tree=False).inputs["attention_mask"].dim() == 2
