"""Batch building: soft prompt + token embeddings per row, left-padded, mask 0 on the pads."""

from __future__ import annotations

import pytest
import torch

from server.engine.batch import RowInput, build_batch_inputs

HIDDEN = 6


@pytest.fixture
def embedding() -> torch.nn.Embedding:
    torch.manual_seed(0)
    return torch.nn.Embedding(20, HIDDEN)


def test_rows_are_left_padded_with_soft_prompt_before_tokens(embedding) -> None:
    soft_a = torch.randn(2, HIDDEN)
    soft_c = torch.randn(4, HIDDEN)
    rows = [
        RowInput([5, 6, 7], soft_a),  # 2 + 3 = 5
        RowInput([1, 2, 3, 4, 5, 6], None),  # 6
        RowInput([], soft_c),  # 4, only virtual tokens
    ]

    batch = build_batch_inputs(embedding, rows)

    assert batch.inputs_embeds.shape == (3, 6, HIDDEN)
    assert batch.lengths == (5, 6, 4)
    assert batch.attention_mask.tolist() == [
        [0, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1],
    ]
    emb = embedding.weight.detach()
    assert torch.equal(batch.inputs_embeds[0, 1:3], soft_a)
    assert torch.equal(batch.inputs_embeds[0, 3:], emb[[5, 6, 7]])
    assert torch.equal(batch.inputs_embeds[1], emb[[1, 2, 3, 4, 5, 6]])
    assert torch.equal(batch.inputs_embeds[2, 2:], soft_c)
    # Pads are zeros, so nothing but the mask distinguishes them.
    assert not batch.inputs_embeds[0, 0].any()
    assert not batch.inputs_embeds[2, :2].any()


def test_batch_takes_the_embedding_dtype_and_casts_soft_prompts(embedding) -> None:
    embedding = embedding.to(torch.bfloat16)
    batch = build_batch_inputs(embedding, [RowInput([1, 2], torch.randn(3, HIDDEN))])

    assert batch.inputs_embeds.dtype == torch.bfloat16
    assert batch.attention_mask.dtype == torch.long


def test_empty_soft_prompt_is_the_same_as_none(embedding) -> None:
    with_empty = build_batch_inputs(embedding, [RowInput([3, 4], torch.zeros(0, HIDDEN))])
    without = build_batch_inputs(embedding, [RowInput([3, 4], None)])

    assert torch.equal(with_empty.inputs_embeds, without.inputs_embeds)
    assert torch.equal(with_empty.attention_mask, without.attention_mask)


def test_a_row_with_nothing_in_it_is_rejected(embedding) -> None:
    with pytest.raises(ValueError, match="row 1"):
        build_batch_inputs(embedding, [RowInput([1], None), RowInput([], None)])


def test_no_rows_is_rejected(embedding) -> None:
    with pytest.raises(ValueError):
        build_batch_inputs(embedding, [])


@pytest.mark.parametrize("shape", [(3, HIDDEN + 1), (1, 3, HIDDEN), (HIDDEN,)])
def test_soft_prompt_of_the_wrong_shape_is_rejected(embedding, shape) -> None:
    with pytest.raises(ValueError, match="prompt_embeds"):
        build_batch_inputs(embedding, [RowInput([1, 2], torch.zeros(shape))])
