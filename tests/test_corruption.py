"""The seeded corruption transforms: definitions, rates, determinism, errors."""

from __future__ import annotations

import re
import statistics

import pytest

from hf_moe_patch.data.corruption import Corruption, parse_corruption

TEXT = "a member of the genus Canis that has been domesticated by man since prehistoric times"
JUNK = re.compile(r"^(?:([A-Z])\1{1,3}|@@|#\$%|~~~|&&|%%)$")


def test_junk_inserts_only_junk_tokens_and_keeps_the_words_in_order():
    out = Corruption("junk", 0.5, seed=1)(TEXT)
    words = out.split(" ")
    kept = [w for w in words if not JUNK.match(w)]
    assert kept == TEXT.split(" ")
    assert len(words) > len(kept)  # rate 0.5 over 15 words inserts something


def test_junk_rate_is_the_expected_insertions_per_word():
    n_words = len(TEXT.split(" "))
    inserted = [len(Corruption("junk", 0.2, seed=s)(TEXT).split(" ")) - n_words for s in range(400)]
    assert statistics.mean(inserted) / n_words == pytest.approx(0.2, abs=0.02)


def test_char_noise_changes_about_rate_of_characters():
    out = Corruption("char", 0.1, seed=0)(TEXT * 20)
    # Every edit changes the length by at most one character; the text must change but stay close.
    assert out != TEXT * 20
    assert abs(len(out) - len(TEXT * 20)) < 0.1 * len(TEXT * 20)
    same = sum(a == b for a, b in zip(out, TEXT * 20))
    assert same < len(TEXT * 20)


def test_same_text_same_corruption_wherever_it_appears():
    c = Corruption("junk", 0.3, seed=7)
    assert c.apply([TEXT, "other", TEXT]) == [c(TEXT), c("other"), c(TEXT)]
    assert Corruption("junk", 0.3, seed=8)(TEXT) != c(TEXT)
    assert Corruption("char", 0.3, seed=7)(TEXT) != c(TEXT)


@pytest.mark.parametrize("kind", ["junk", "char"])
def test_rate_zero_is_the_identity(kind):
    assert Corruption(kind, 0.0)(TEXT) == TEXT


def test_tag_names_every_field():
    assert Corruption("char", 0.05, 3).tag == "char0.05s3"


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "typos"}, "kind='typos' is not valid; valid kinds: junk, char"),
    ({"rate": 1.5}, "rate=1.5 is not valid; valid range: a number in [0, 1]"),
])
def test_invalid_options_name_option_value_and_range(kwargs, message):
    with pytest.raises(ValueError) as err:
        Corruption(**kwargs)
    assert message in str(err.value)


def test_parse():
    assert parse_corruption("junk:0.1") == Corruption("junk", 0.1, 0)
    assert parse_corruption(None) is None
    with pytest.raises(ValueError, match="KIND:RATE"):
        parse_corruption("junk")
    with pytest.raises(ValueError, match="RATE must be a number"):
        parse_corruption("junk:lots")
