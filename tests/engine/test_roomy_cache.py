"""KV cache layers that take a decode step's column in place (server.engine.roomy_cache): they
must hold exactly what transformers' concatenating DynamicLayer would, through regrowth."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from server.engine.roomy_cache import Columns, RoomyLayer, spare_columns


def test_columns_grow_in_place_until_full_then_regrow_keeping_their_content() -> None:
    start = torch.arange(6).reshape(2, 3)
    cols = Columns(torch.cat([start, torch.full((2, 2), -1)], dim=1), filled=3, dim=1)
    expected = start
    buffers = []
    for step in range(40):
        new = torch.full((2, 1), 100 + step)
        expected = torch.cat([expected, new], dim=1)
        view = cols.append(new)
        buffers.append(cols.buffer.data_ptr())
        assert torch.equal(view, expected)
    assert buffers[0] == buffers[1]  # the two spare columns were written in place
    assert len(set(buffers)) < 5  # regrown a few times in 40 steps, not at every one
    assert cols.buffer.shape[1] - cols.filled <= spare_columns(cols.filled)


def test_roomy_layer_returns_what_a_dynamic_layer_returns() -> None:
    keys, values = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    plain = DynamicLayer()
    plain.update(keys, values)
    roomy = RoomyLayer(Columns(keys.clone(), 5, dim=2), Columns(values.clone(), 5, dim=2))
    for n in (1, 1, 3, 40, 1):  # one step at a time, a chunk, then past the spare room
        k, v = torch.randn(3, 2, n, 4), torch.randn(3, 2, n, 4)
        want, got = plain.update(k, v), roomy.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        assert roomy.get_seq_length() == plain.get_seq_length()
        assert roomy.get_mask_sizes(1) == plain.get_mask_sizes(1)
