"""P-tuning templates: the markers, every row used exactly once, and the errors an upload gets."""

from __future__ import annotations

import pytest

from adapters_store import Anchor, InvalidTemplateError, Soft, Text, parse_template


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
