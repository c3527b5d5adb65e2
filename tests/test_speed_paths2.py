"""token_budget -1 packs several short segments per row (`packing.auto_budget`) instead of one per row
padded to the longest: the layout changes, the numbers must not (forward and backward, vs the padded
reference path), and long segments keep one row each where attention would cost more than padding."""

import pytest
import torch
from test_train import cfg_for, run_files  # noqa: F401 (run_files: a fixture)
from tiny_lms import VOCAB, tiny_lm

from prefalign import objective
from prefalign.data.packing import attention_break_even, auto_budget, budget_for, first_fit, pack_pairs

SHAPES = [(5, 3, 7), (1, 1, 1), (9, 4, 1), (2, 11, 6), (3, 1, 2), (7, 6, 5), (12, 9, 14)]


class Pair:
    def __init__(self, p, c, r):
        self.prompt_ids, self.chosen_ids, self.rejected_ids = p, c, r


def pairs(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [Pair(tok(p), tok(c), tok(r)) for p, c, r in shapes]


def columns(lengths, budget):
    rows = first_fit(lengths, budget)
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)


def test_short_answers_share_one_row():
    # the 4 short-answer pairs of bench/real_shapes.py's first step (SmolLM2: 6 x 576 = 3456)
    lengths = [88, 70, 60, 56]
    budget = auto_budget(lengths, 3456)
    assert budget == sum(lengths)
    assert columns(lengths, budget) == 274 < columns(lengths, max(lengths)) == 352


def test_long_segments_keep_a_row_each():
    # UltraFeedback-like lengths: merging rows would add more attention than it saves padding
    lengths = [905, 700, 560, 455]
    assert auto_budget(lengths, 3456) == 905
    # where attention is free (huge break-even), the least padding wins: columns never grow
    for lengths in ([905, 700, 560, 455], [3, 19, 35, 14, 6, 18, 15], [7] * 9):
        budget = auto_budget(lengths, 10**9)
        assert budget >= max(lengths)
        assert columns(lengths, budget) <= columns(lengths, max(lengths))


def test_break_even_from_width_else_one_segment_per_row():
    model = tiny_lm("llama")
    assert attention_break_even(model) == 6 * 32
    assert budget_for(-1, torch.nn.Linear(2, 2), [5, 9, 4]) == 9  # no config: the old rule
    assert budget_for(0, tiny_lm("llama"), [5, 9, 4]) == 9  # the default: the longest segment, as before
    assert budget_for(12, tiny_lm("llama"), [5, 9, 4]) == 12


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _run(model, items, **kw):
    model.zero_grad(set_to_none=True)
    out = objective.pair_logps(model, items, pad_id=0, chunk_size=0, **kw)
    (out.chosen * torch.arange(1.0, len(items) + 1) - 0.5 * out.rejected).sum().backward()
    return out, _grads(model)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_auto_layout_equals_padded_reference_forward_and_backward(name):
    model = tiny_lm(name)
    items = pairs(SHAPES)
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in items]
    packed = pack_pairs(items, budget_for(-1, model, lengths))
    assert packed.input_ids.shape[0] < len(items)  # several segments share rows: the new layout is exercised
    got, g_got = _run(model, items, packing=True, token_budget=-1)
    ref, g_ref = _run(model, items, packing=False, token_budget=0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(g_got) == len(g_ref) > 0
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)



def test_token_budget_minus_one_trains_as_the_default_layout(run_files, tmp_path):  # noqa: F811
    """`--token-budget -1` (the auto layout) gives the same run as the default layout, to float rounding."""
    from prefalign import trainer

    runs = [trainer.train(cfg_for(run_files, tmp_path / f"b{b}", token_budget=b, packing=True, max_steps=3,
                                  batch_size=8, save_model=False)).history for b in (0, -1)]
    for a, b in zip(*runs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["logps/chosen"] == pytest.approx(b["logps/chosen"], rel=1e-5, abs=1e-5)
