"""A request runs with exactly the adapter version it was admitted with: an overwrite that
lands between admission and the adapter's load fails that request cleanly (409), and is what
the next request gets."""

from __future__ import annotations

import pytest

from adapters_store import LocalAdapterStore, ModelSpec, parse_directory
from server.engine.errors import AdapterChangedError
from tests.engine.test_engine import make_engine, request, upload_of
from tests.factories import load_peft_reference, make_adapter, reference_greedy


class OverwriteOnLoad(LocalAdapterStore):
    """A real local store in which another replica overwrites `adapter_id` with `parsed` at
    the moment the engine first loads it: the window the race needs, made certain."""

    def __init__(self, root, *, adapter_id: str, parsed) -> None:
        super().__init__(root)
        self._pending = (adapter_id, parsed)

    def get(self, namespace, adapter_id, *, verify=False):
        if self._pending is not None and self._pending[0] == adapter_id:
            _, parsed = self._pending
            self._pending = None
            LocalAdapterStore(self.root).put(namespace, adapter_id, parsed, overwrite=True)
        return super().get(namespace, adapter_id, verify=verify)


@pytest.fixture(scope="module")
def two_versions(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    model = tiny_model_dirs["llama"]
    return (make_adapter(model, root / "v1", "prompt_tuning", num_virtual_tokens=3, seed=31),
            make_adapter(model, root / "v2", "prompt_tuning", num_virtual_tokens=5, seed=32))


@pytest.mark.parametrize("batching", ["core", "static"])
async def test_an_overwrite_during_the_load_fails_the_request_with_409(
        tiny_model_dirs, tmp_path, two_versions, batching) -> None:
    v1, v2 = two_versions
    store = OverwriteOnLoad(tmp_path / "store", adapter_id="ad",
                            parsed=parse_directory(v2, spec=ModelSpec(token_dim=64)))
    engine = make_engine(tiny_model_dirs["llama"], tmp_path, store=store, batching=batching)
    try:
        await engine.add_adapter("t1", "ad", upload_of(v1))

        with pytest.raises(AdapterChangedError, match="replaced"):
            await engine.generate(request(engine, "Hi!", "ad"))

        again = await engine.generate(request(engine, "Hi!", "ad"))
        ref = load_peft_reference(tiny_model_dirs["llama"], v2)
        assert again.virtual_tokens == 5
        assert list(again.token_ids) == reference_greedy(ref, engine.tokenize("Hi!"), 8)
    finally:
        await engine.aclose(10)
