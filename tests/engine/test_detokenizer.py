"""Incremental detokenization (never a partial character) and stop-string holding."""

from __future__ import annotations

import pytest

from server.engine.byte_tokenizer import EOS_ID, make_byte_tokenizer
from server.engine.detokenizer import IncrementalDetokenizer, StopStringFilter

MULTIBYTE = "héllo 👋 wörld ☕!"


@pytest.fixture(scope="module")
def tokenizer():
    return make_byte_tokenizer()


def test_multibyte_characters_are_never_split(tokenizer) -> None:
    ids = tokenizer(MULTIBYTE, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(MULTIBYTE)  # the byte tokenizer really splits characters
    detok = IncrementalDetokenizer(tokenizer)

    deltas = [detok.push(t) for t in ids]

    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == MULTIBYTE
    # The emoji's 4 bytes arrive as 4 tokens; nothing is released until the last one.
    assert "👋" in deltas


def test_special_tokens_add_no_text(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    ids = tokenizer("ok", add_special_tokens=False)["input_ids"] + [EOS_ID]

    assert "".join(detok.push(t) for t in ids) + detok.flush() == "ok"


def test_flush_releases_an_unfinished_character_as_decode_would(tokenizer) -> None:
    ids = tokenizer("a€", add_special_tokens=False)["input_ids"][:-1]  # '€' cut after 2 bytes
    detok = IncrementalDetokenizer(tokenizer)

    streamed = "".join(detok.push(t) for t in ids)
    flushed = detok.flush()

    assert streamed == "a"
    assert streamed + flushed == tokenizer.decode(ids)
    assert detok.flush() == ""


def test_stop_string_cuts_text_and_reports_the_stop() -> None:
    f = StopStringFilter(["END"])

    assert f.feed("hello E") == ("hello ", False)  # 'E' could start 'END': held
    assert f.feed("N") == ("", False)
    released, stopped = f.feed("D and more")

    assert stopped
    assert released == ""
    assert f.text == "hello "


def test_held_prefix_is_released_once_it_cannot_be_a_stop() -> None:
    f = StopStringFilter(["\n\n", "###"])

    assert f.feed("a#") == ("a", False)
    assert f.feed("#") == ("", False)
    assert f.feed("x") == ("##x", False)
    assert f.feed("\n") == ("", False)
    assert f.flush() == "\n"
    assert f.text == "a##x\n"


def test_earliest_of_several_stop_strings_wins() -> None:
    f = StopStringFilter(["cd", "b"])

    released, stopped = f.feed("abcd")

    assert stopped
    assert released == "a"
    assert f.text == "a"


def test_stop_string_spanning_many_deltas_is_found() -> None:
    f = StopStringFilter(["stop here"])
    out = []
    for ch in "we stop here now":
        released, stopped = f.feed(ch)
        out.append(released)
        if stopped:
            break

    assert stopped
    assert "".join(out) == "we "
    assert f.text == "we "


def test_no_stop_strings_releases_everything_at_once() -> None:
    f = StopStringFilter([""])  # empty stop strings are ignored

    assert f.feed("abc") == ("abc", False)
    assert f.flush() == ""
