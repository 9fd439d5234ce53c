"""P-tuning templates: the markers, every row used exactly once, and the errors an upload gets."""

from __future__ import annotations

import pytest

from adapters_store import Anchor, InvalidTemplateError, Soft, Text, parse_template
from adapters_store.template import MAX_TEMPLATE_CHARS


def test_rows_anchors_and_text_in_template_order():
    assert parse_template("{soft:3} Review: {text} {soft} Sentiment:", 8) == (
        Soft(0, 3), Anchor(" Review: "), Text(), Anchor(" "), Soft(3, 5), Anchor(" Sentiment:"))


def test_the_default_form_and_explicit_counts():
    assert parse_template("{soft}{text}", 4) == (Soft(0, 4), Text())
    assert parse_template("{text}{soft:1}{soft:3}", 4) == (Text(), Soft(0, 1), Soft(1, 3))
    assert parse_template("Q: {text} A:{soft}", 2) == (Anchor("Q: "), Text(), Anchor(" A:"),
                                                       Soft(0, 2))


def test_doubled_braces_are_literal():
    assert parse_template("{{json}} {soft} {{{text}}}", 2) == (
        Anchor("{json} "), Soft(0, 2), Anchor(" {"), Text(), Anchor("}"))


@pytest.mark.parametrize(("template", "message"), [
    ("{soft}", "{text} exactly once, found 0"),
    ("{text}{soft}{text}", "exactly once, found 2"),
    ("{soft:2}{text}", "uses 2 rows; the adapter has 4"),
    ("{soft:3}{soft:3}{text}", "uses 6 rows; the adapter has 4"),
    ("{soft:4}{soft}{text}", "{soft} would take no rows"),
    ("{soft}{soft}{text}", "appears twice"),
    ("{soft:0}{soft}{text}", "at least one row"),
    ("{soft:-1}{text}", "unknown marker {soft:-1}"),
    ("{Soft}{text}", "unknown marker {Soft}"),
    ("{soft}{text} }", "unmatched '}'"),
    ("{soft {text}", "unmatched '{'"),
    ("{soft}{text}{", "unmatched '{'"),
    ("", "non-empty"),
])
def test_bad_templates_say_what_is_wrong(template, message):
    with pytest.raises(InvalidTemplateError) as info:
        parse_template(template, 4)
    assert message in str(info.value)


def test_an_overlong_template_is_refused():
    with pytest.raises(InvalidTemplateError, match="characters"):
        parse_template("{soft}{text}" + "x" * 5000, 4)


@pytest.mark.parametrize(("template", "named"), [
    ("{soft:\uff14}{text}", "U+FF14 (FULLWIDTH DIGIT FOUR)"),
    ("{soft:\u0663}{soft}{text}", "U+0663 (ARABIC-INDIC DIGIT THREE)"),
    ("{soft:1\u0b68}{text}", "U+0B68 (ORIYA DIGIT TWO)"),
    ("{soft:\u00b2}{soft}{text}", "U+00B2 (SUPERSCRIPT TWO)"),
])
def test_a_row_count_is_ascii_digits_only(template, named):
    with pytest.raises(InvalidTemplateError) as info:
        parse_template(template, 4)
    assert named in str(info.value) and "ASCII digits" in str(info.value)


def test_ascii_counts_with_leading_zeros_still_count():
    assert parse_template("{soft:01}{text}{soft:003}", 4) == (Soft(0, 1), Text(), Soft(1, 3))


@pytest.mark.parametrize(("char", "at"), [
    ("\x00", 6), ("\x01", 6), ("\x08", 6), ("\x0b", 6), ("\x0c", 6), ("\x1b", 6), ("\x1f", 6),
    ("\x7f", 6), ("\x80", 6), ("\x85", 6), ("\x9f", 6),
    ("\u202a", 6), ("\u202b", 6), ("\u202c", 6), ("\u202d", 6), ("\u202e", 6),
    ("\u2066", 6), ("\u2067", 6), ("\u2068", 6), ("\u2069", 6),
])
def test_control_and_bidi_override_characters_are_refused_by_code_point_and_place(char, at):
    with pytest.raises(InvalidTemplateError) as info:
        parse_template("{soft}" + char + " {text}", 4)
    assert f"U+{ord(char):04X}" in str(info.value)
    assert f"at character {at}" in str(info.value)


def test_the_first_refused_character_is_the_one_named():
    with pytest.raises(InvalidTemplateError, match=r"U\+202E .* at character 8"):
        parse_template("{soft}ab\u202e\x00{text}", 4)


def test_tab_newline_and_carriage_return_are_ordinary_anchor_text():
    assert parse_template("{soft}Q:\t{text}\r\nA:", 4) == (
        Soft(0, 4), Anchor("Q:\t"), Text(), Anchor("\r\nA:"))


@pytest.mark.parametrize("text", ["\u200e", "\u200f", "\u200b", "\ufeff", "\u00a0", "caf\u00e9",
                                  "\U0001f9ea"])
def test_other_unicode_in_anchors_is_kept(text):
    """Marks, zero-width and no-break spaces, accents, emoji: ordinary prompt text."""
    assert parse_template("{soft}" + text + "{text}", 4) == (Soft(0, 4), Anchor(text), Text())


def test_the_limit_is_in_characters_and_the_message_says_so():
    fits = "{soft}{text}" + "\U0001f9ea" * (MAX_TEMPLATE_CHARS - 12)  # 4 bytes each
    assert parse_template(fits, 4)[-1] == Anchor("\U0001f9ea" * (MAX_TEMPLATE_CHARS - 12))
    with pytest.raises(InvalidTemplateError,
                       match=f"{MAX_TEMPLATE_CHARS + 1} characters; at most "
                             f"{MAX_TEMPLATE_CHARS} characters"):
        parse_template(fits + "x", 4)
