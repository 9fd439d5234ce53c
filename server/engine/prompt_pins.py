"""A running request's soft prompt, as token ids, pinned in the prompt table while it runs.

Both step loops turn a ticket into the ids the model reads here: its adapter's virtual ids
(rows of the prompt table) followed by its text's ids, or, for a templated adapter, rows,
anchors and text in template order (server.engine.prompt_layout). The rows stay pinned from
the request's start to its end, so an overwrite or an eviction meanwhile never changes what it
reads.
"""

from __future__ import annotations

from server.engine.errors import InvalidRequestError
from server.engine.loop_host import LoopHost
from server.engine.prompt_layout import assemble, compiled_pieces
from server.engine.prompt_table import PromptTable, TableEntry
from server.engine.tickets import Ticket
from server.engine.token_bounds import first_outside


class PromptPins:
    """Owned by the engine thread."""

    def __init__(self, scheduler: LoopHost, table: PromptTable) -> None:
        self._s = scheduler
        self._table = table
        self._held: dict[int, TableEntry] = {}  # id(ticket) -> its pinned entry

    def ids(self, ticket: Ticket) -> list[int] | None:
        """The request as token ids, its rows pinned; None if it cannot start now and goes
        back to the queue: its rows were evicted while it waited (it waits for their load
        again), or the rest of the table is pinned by running requests (it waits for them).
        Also None, the request failed, if an id other than its own virtual ids is not a row
        of the embedding: the model would read it as another adapter's row."""
        req = ticket.request
        vocab = self._table.vocab_size
        for source, ids in compiled_pieces(req.prompt_ids, ticket.layout):
            if (bad := first_outside(ids, vocab)) is not None:  # the edge refuses these
                self._s.fail(ticket, InvalidRequestError(
                    f"{source} holds id {bad}, which is not a row of the model's embedding "
                    f"(it has {vocab} rows)"))
                return None
        if req.adapter_id is None:
            return list(req.prompt_ids)
        assert ticket.version is not None
        entry = ticket.entry
        if entry is None or not self._table.pin(entry):
            if ticket.embeds is None:
                self._s.requeue(ticket, reload=True)
                return None
            entry = self._table.insert(req.namespace, req.adapter_id, ticket.version,
                                       ticket.embeds)
            if entry is None:
                self._s.requeue(ticket, reload=False)
                return None
            ticket.entry, ticket.embeds = entry, None
        self._held[id(ticket)] = entry
        if ticket.layout is not None:
            return assemble(ticket.layout, entry.ids, req.prompt_ids)
        return [*entry.ids, *req.prompt_ids]

    def release(self, ticket: Ticket) -> None:
        """The request ended (or was preempted and then ended): unpin its rows. Idempotent."""
        entry = self._held.pop(id(ticket), None)
        if entry is not None:
            self._table.release(entry)

    def __len__(self) -> int:
        return len(self._held)
