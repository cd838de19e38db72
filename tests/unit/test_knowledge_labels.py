"""Lookup by label: normalisation (case, accents, punctuation, scripts) and the ranking of matches."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgumentError
from services.knowledge.labels import LabelIndex, normalise

MP = "https://meshpilot.dev/kg/"
COUNTRY, STATE, CURRENCY = MP + "Country", MP + "State", MP + "Currency"


@pytest.fixture(scope="module")
def index() -> LabelIndex:
    names = [
        (MP + "country/CI", "Ivory Coast"),
        (MP + "country/CI", "Côte d'Ivoire"),
        (MP + "country/CI", "科特迪瓦"),
        (MP + "country/JP", "Japan"),
        (MP + "country/JP", "日本"),
        (MP + "country/JP", "JP"),
        (MP + "currency/JPY", "Japanese yen"),
        (MP + "currency/JPY", "JPY"),
        (MP + "country/FR", "France"),
        (MP + "country/FR", "法国"),
        (MP + "country/FR", "फ्रांस"),
        (MP + "country/GE", "Georgia"),
        (MP + "state/US-GA", "Georgia"),
        (MP + "country/GB", "United Kingdom"),
        (MP + "country/US", "United States"),
    ]
    english = {
        MP + "country/CI": "Ivory Coast",
        MP + "country/JP": "Japan",
        MP + "currency/JPY": "Japanese yen",
        MP + "country/FR": "France",
        MP + "country/GE": "Georgia",
        MP + "state/US-GA": "Georgia",
        MP + "country/GB": "United Kingdom",
        MP + "country/US": "United States",
    }
    types = {iri: {STATE if "/state/" in iri else CURRENCY if "/currency/" in iri else COUNTRY} for iri in english}
    return LabelIndex(names, english, types)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Côte d’Ivoire", "cote d ivoire"),
        ("  JAPAN ", "japan"),
        ("São Tomé and Príncipe", "sao tome and principe"),
        ("日本", "日本"),
        ("Straße", "strasse"),
        ("फ्रांस", "फ्रांस"),
    ],
)
def test_normalise(text: str, expected: str) -> None:
    assert normalise(text) == expected


def test_accents_and_case_are_ignored(index: LabelIndex) -> None:
    [best, *_] = index.lookup("cote d'ivoire")
    assert (best.iri, best.label, best.matched_label, best.score) == (
        MP + "country/CI",
        "Ivory Coast",
        "Côte d'Ivoire",
        1.0,
    )
    assert index.lookup("JAPAN")[0].iri == MP + "country/JP"


def test_chinese_and_hindi_names_match(index: LabelIndex) -> None:
    assert index.lookup("日本")[0].iri == MP + "country/JP"
    assert index.lookup("法国")[0].iri == MP + "country/FR"
    assert index.lookup("फ्रांस")[0].iri == MP + "country/FR"


def test_exact_beats_prefix_beats_substring(index: LabelIndex) -> None:
    matches = index.lookup("japan")
    assert [m.iri for m in matches] == [MP + "country/JP", MP + "currency/JPY"]
    assert matches[0].score == 1.0
    assert 0.5 < matches[1].score < 0.9
    substring = index.lookup("kingdom")
    assert substring[0].iri == MP + "country/GB"
    assert 0.1 < substring[0].score < 0.5
    prefix = index.lookup("united")
    assert {m.iri for m in prefix} == {MP + "country/GB", MP + "country/US"}
    assert all(0.5 < m.score < 0.9 for m in prefix)


def test_each_entity_appears_once_with_its_best_name(index: LabelIndex) -> None:
    matches = index.lookup("jp")
    assert [m.iri for m in matches].count(MP + "country/JP") == 1
    assert matches[0].iri == MP + "country/JP"
    assert matches[0].matched_label == "JP"


def test_ties_rank_countries_before_states(index: LabelIndex) -> None:
    matches = index.lookup("georgia")
    assert [m.iri for m in matches] == [MP + "country/GE", MP + "state/US-GA"]
    assert [m.types for m in matches] == [("Country",), ("State",)]


def test_type_filter_by_local_name_or_iri(index: LabelIndex) -> None:
    assert [m.iri for m in index.lookup("georgia", "State")] == [MP + "state/US-GA"]
    assert [m.iri for m in index.lookup("georgia", "state")] == [MP + "state/US-GA"]
    assert [m.iri for m in index.lookup("japan", CURRENCY)] == [MP + "currency/JPY"]


def test_limit(index: LabelIndex) -> None:
    assert len(index.lookup("georgia", limit=1)) == 1
    assert len(index.lookup("georgia", limit=0)) == 2


def test_no_match_is_an_empty_list(index: LabelIndex) -> None:
    assert index.lookup("Atlantis") == []


@pytest.mark.parametrize(
    ("label", "type_", "limit", "message"),
    [
        ("", None, None, "label is empty"),
        ("  ", None, None, "label is empty"),
        ("?!", None, None, "no letters or digits"),
        ("France", "Planet", None, "unknown type 'Planet'; use one of Country, Currency, State"),
        ("France", None, -1, "limit must be positive"),
    ],
)
def test_bad_input_says_what_to_change(
    index: LabelIndex, label: str, type_: str | None, limit: int | None, message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        index.lookup(label, type_, limit)
