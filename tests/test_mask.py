"""GLMMask: the compact mask equals the original's boolean masks, and is recognised in them."""
import torch

from glm_kernels import reference
from glm_kernels.ops.mask import GLMMask
from test_model import left_padded_batch

BOS, GMASK = 994, 991


def test_materialize_equals_get_masks_with_prefix_columns():
    ids = torch.tensor([[5, 6, GMASK, BOS, 7, 8], [5, GMASK, BOS, 7, 8, 9]])
    mask = GLMMask(3, torch.zeros(2, dtype=torch.long), torch.tensor([3, 2]))
    dense = mask.materialize(6, 3 + 6)
    assert not dense[..., :3].any()  # the prefix is visible from every row
    assert torch.equal(dense[..., 3:], reference.get_masks(ids, BOS))


def test_recognises_the_original_and_tokenizer_masks():
    ids = torch.tensor([[5, 6, GMASK, BOS, 7, 8]])
    found = GLMMask.from_bool(reference.get_masks(ids, BOS), 0, 1)
    assert found is not None and found.context.tolist() == [3] and found.pad.tolist() == [0]
    rows = [[5, 6, 7, GMASK, BOS, 8, 9], [11, GMASK, BOS], [12, 13, 14, 15, GMASK, BOS, 16]]
    _, padded, _ = left_padded_batch(rows, 9)
    found = GLMMask.from_bool(padded, 4, 3)
    assert found is not None and found.pad.tolist() == [2, 6, 2] and found.context.tolist() == [6, 8, 7]
    assert torch.equal(found.materialize(9, 4 + 9)[..., 4:], padded)


def test_recognises_decode_step_masks():
    # the original's generation passes the last row of the grown mask for each new token
    rows = [[5, 6, 7, GMASK, BOS], [11, GMASK, BOS]]
    _, padded, _ = left_padded_batch(rows, 5)
    grown = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    grown[:, :, :5, :5] = padded
    grown[:, :, 5] = grown[:, :, 4]
    grown[:, :, 5, 5] = False
    step = grown[:, :, -1:]
    found = GLMMask.from_bool(step, 0, 2)
    assert found is not None and found.pad.tolist() == [0, 2]
    assert torch.equal(found.materialize(1, 6), step)


def test_other_masks_are_not_glm_masks():
    random = torch.rand(2, 1, 5, 5) < 0.5
    random[:, :, -1] = False
    random[:, :, -1, 2] = True  # a hole in the last row: not [pad, T)
    assert GLMMask.from_bool(random, 0, 2) is None
    causal_only = ~torch.ones(5, 5, dtype=torch.bool).tril()
    found = GLMMask.from_bool(causal_only[None, None], 0, 1)
    assert found is not None and found.context.tolist() == [1]  # empty context is causal
    assert GLMMask.from_bool(torch.zeros(1, 1, 5, 5), 0, 1) is None  # not bool
