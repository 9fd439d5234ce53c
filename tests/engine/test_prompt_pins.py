"""A request's soft prompt as ids, pinned while it runs: from its table entry, from the rows it
kept on the host when the table was full at load time; back to its adapter's load when its
rows were evicted while it waited, and back to the queue while running requests hold the
whole table."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from adapters_store import Soft, Text
from server.engine.prompt_pins import PromptPins
from server.engine.prompt_table import PromptTable

HIDDEN = 4


class Decisions:
    """What the pins asked of the scheduler."""

    def __init__(self) -> None:
        self.requeued: list[tuple[object, bool]] = []
        self.failed: list[tuple[object, BaseException]] = []

    def fail(self, ticket: object, error: BaseException) -> None:
        self.failed.append((ticket, error))

    def requeue(self, ticket: object, *, reload: bool) -> None:
        self.requeued.append((ticket, reload))


def _setup(rows: int) -> tuple[PromptTable, Decisions, PromptPins]:
    table = PromptTable(vocab_size=100, hidden=HIDDEN, capacity_bytes=rows * HIDDEN * 4,
                        dtype=torch.float32, device="cpu")
    decisions = Decisions()
    return table, decisions, PromptPins(decisions, table)  # type: ignore[arg-type]


def _ticket(adapter: str | None, *, entry=None, embeds=None, layout=None,
            prompt_ids=(7, 8)) -> SimpleNamespace:
    request = SimpleNamespace(adapter_id=adapter, namespace="t", prompt_ids=prompt_ids)
    return SimpleNamespace(request=request, version="v1", entry=entry, embeds=embeds,
                           layout=layout)


def test_a_resident_entry_is_pinned_until_release():
    table, _, pins = _setup(8)
    entry = table.insert("t", "a", "v1", torch.ones(3, HIDDEN), pinned=False)
    ticket = _ticket("a", entry=entry)
    assert pins.ids(ticket) == [*entry.ids, 7, 8] and entry.pins == 1
    pins.release(ticket)
    pins.release(ticket)  # idempotent
    assert entry.pins == 0 and len(pins) == 0
    assert pins.ids(_ticket(None)) == [7, 8]


def test_rows_kept_on_the_host_are_inserted_when_the_request_starts():
    table, decisions, pins = _setup(8)
    ticket = _ticket("a", embeds=torch.full((2, HIDDEN), 5.0))
    ids = pins.ids(ticket)
    assert ids is not None and ticket.embeds is None and ticket.entry.pins == 1
    assert torch.equal(table.weight[ticket.entry.rows], torch.full((2, HIDDEN), 5.0))
    assert not decisions.requeued


def test_evicted_rows_send_the_request_back_to_its_load():
    table, decisions, pins = _setup(4)
    stale = table.insert("t", "a", "v1", torch.ones(3, HIDDEN), pinned=False)
    table.insert("t", "b", "v1", torch.ones(3, HIDDEN), pinned=False)  # evicts a
    ticket = _ticket("a", entry=stale)
    assert pins.ids(ticket) is None and decisions.requeued == [(ticket, True)]
    assert len(pins) == 0


def test_a_table_full_of_rows_in_use_sends_the_request_back_to_wait():
    table, decisions, pins = _setup(4)
    busy = table.insert("t", "busy", "v1", torch.ones(3, HIDDEN))  # a running request's
    ticket = _ticket("a", embeds=torch.ones(2, HIDDEN))
    assert pins.ids(ticket) is None and decisions.requeued == [(ticket, False)]
    assert ticket.embeds is not None  # kept for when there is room
    table.release(busy)
    assert pins.ids(ticket) is not None and ticket.entry.pins == 1


def test_a_templated_request_is_rows_anchors_and_text_in_template_order():
    table, _, pins = _setup(8)
    entry = table.insert("t", "a", "v1", torch.ones(4, HIDDEN), pinned=False)
    layout = (Soft(0, 1), (50, 51), Text(), Soft(1, 3), (52,))
    ticket = _ticket("a", entry=entry, layout=layout)
    v = entry.ids
    assert pins.ids(ticket) == [v[0], 50, 51, 7, 8, v[1], v[2], v[3], 52]


def test_an_id_past_the_embedding_never_reaches_the_model_as_another_adapters_row():
    """The loops build the model's ids here: a text or anchor id at or above the vocabulary
    would read a prompt-table row (another adapter's), so the request fails instead."""
    table, decisions, pins = _setup(8)
    other = table.insert("t", "other", "v1", torch.ones(3, HIDDEN), pinned=False)
    mine = table.insert("t", "a", "v1", torch.ones(2, HIDDEN), pinned=False)
    for ticket in (_ticket(None, prompt_ids=(7, other.ids[0])),
                   _ticket("a", entry=mine, prompt_ids=(7, 100)),
                   _ticket("a", entry=mine, layout=(Soft(0, 2), (other.ids[1],), Text()))):
        assert pins.ids(ticket) is None
        assert decisions.failed[-1][0] is ticket
        assert "not a row of the model's embedding" in str(decisions.failed[-1][1])
    assert mine.pins == 0 and other.pins == 0 and len(pins) == 0
