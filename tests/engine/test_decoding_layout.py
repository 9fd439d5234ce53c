"""How the continuous-batching loop lays rows out in its shared KV cache when rows join, move
or leave: right-aligned, zero-padded in front, trimmed of columns no row uses."""

from __future__ import annotations

import torch

from server.engine.decoding import _place_rows


def test_rows_of_several_sources_are_right_aligned_with_zeros_in_front() -> None:
    a = torch.arange(1, 3 * 5 + 1).reshape(3, 5)  # 3 rows, 5 columns
    b = torch.arange(100, 100 + 2 * 3).reshape(2, 3)
    out = _place_rows([a, b], [torch.tensor([2, 0]), torch.tensor([1])], trims=[1, 0],
                      width=6, seq=1)
    assert out.tolist() == [
        [0, 0, 12, 13, 14, 15],  # a's row 2 without its first column
        [0, 0, 2, 3, 4, 5],  # a's row 0
        [0, 0, 0, 103, 104, 105],  # b's row 1
    ]


def test_cache_layers_are_placed_on_their_sequence_axis_from_strided_sources() -> None:
    keys = torch.randn(4, 2, 7, 3)[:, :, ::1]  # [batch, heads, seq, head_dim]
    strided = torch.randn(4, 2, 14, 3)[:, :, ::2]  # non-contiguous on the sequence axis
    out = _place_rows([keys, strided], [torch.tensor([3]), torch.tensor([0, 2])],
                      trims=[2, 0], width=8, seq=2)
    assert out.shape == (3, 2, 8, 3) and out.is_contiguous()
    assert torch.equal(out[0, :, 3:], keys[3, :, 2:]) and not out[0, :, :3].any()
    assert torch.equal(out[1, :, 1:], strided[0]) and torch.equal(out[2, :, 1:], strided[2])
    assert not out[1:, :, :1].any()
