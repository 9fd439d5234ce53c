"""The last line of defence around reading and collapsing: whatever slips past the checks is
still a 400 (or 413) naming the file, with the original exception chained for the log."""

from __future__ import annotations

import pytest

from adapters_store import (
    FileTooLargeError,
    ShapeMismatchError,
    WeightsFormatError,
)
from adapters_store.parse import _about

NAME = "adapter_model.bin"


@pytest.mark.parametrize("raised", [
    RuntimeError("Trying to resize storage that is not resizable"),
    NotImplementedError("Cannot copy out of meta tensor; no data!"),
    ValueError("bad value"), TypeError("bad type"), OverflowError("too big"),
    IndexError("tuple index out of range"), KeyError("F4"), ZeroDivisionError("zero"),
])
def test_a_low_level_exception_becomes_a_format_error_naming_the_file(raised):
    with pytest.raises(WeightsFormatError) as err, _about(NAME, WeightsFormatError):
        raise raised
    message = str(err.value)
    assert message.startswith(f"{NAME} could not be read as an adapter")
    assert type(raised).__name__ in message
    assert err.value.__cause__ is raised


def test_running_out_of_memory_is_a_413():
    with pytest.raises(FileTooLargeError, match=f"{NAME}: reading it needs more memory"), \
            _about(NAME, WeightsFormatError):
        raise MemoryError()


def test_an_adapter_error_keeps_its_type_and_gains_the_file_name():
    original = ShapeMismatchError("prompt_embeddings has 7 rows")
    with pytest.raises(ShapeMismatchError) as err, _about(NAME, WeightsFormatError):
        raise original
    assert str(err.value) == f"{NAME}: prompt_embeddings has 7 rows"
    assert err.value.__cause__ is original


def test_an_adapter_error_that_names_the_file_passes_unchanged():
    original = WeightsFormatError(f"{NAME} is not a valid safetensors file")
    with pytest.raises(WeightsFormatError) as err, _about(NAME, WeightsFormatError):
        raise original
    assert err.value is original


def test_a_bug_in_this_package_is_not_disguised_as_bad_input():
    with pytest.raises(AssertionError), _about(NAME, WeightsFormatError):
        raise AssertionError("invariant broken")
