"""The countries dataset as RDF: IRIs, labels in every language, shared entities once, optional parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pyoxigraph import Literal, NamedNode, RdfFormat, parse

from services.knowledge.dataset import (
    NAMESPACE,
    PREFIXES,
    RDF_TYPE,
    RDFS_LABEL,
    DatasetSpec,
    build_triples,
    default_data_dir,
    slug,
    write_ntriples,
)

MP = NAMESPACE
FRANCE = NamedNode(MP + "country/FR")


def _facts(spec: DatasetSpec) -> set[tuple[str, str, object]]:
    return {(t.subject.value, t.predicate.value, t.object) for t in build_triples(spec)}


@pytest.fixture(scope="module")
def europe() -> set[tuple[str, str, object]]:
    return _facts(DatasetSpec(countries=frozenset({"FR", "DE", "JP"})))


def test_country_has_english_and_translated_labels(europe: set) -> None:
    labels = {o for s, p, o in europe if s == FRANCE.value and p == RDFS_LABEL.value}
    assert Literal("France", language="en") in labels
    assert Literal("法国", language="zh-CN") in labels
    assert Literal("Frankreich", language="de") in labels
    assert len(labels) >= 19


def test_country_facts_use_the_documented_vocabulary(europe: set) -> None:
    fr = FRANCE.value
    assert (fr, RDF_TYPE.value, NamedNode(MP + "Country")) in europe
    assert (fr, MP + "capital", Literal("Paris")) in europe
    assert (fr, MP + "iso2", Literal("FR")) in europe
    assert (fr, MP + "iso3", Literal("FRA")) in europe
    assert (fr, MP + "nativeName", Literal("France")) in europe
    assert (fr, MP + "currency", NamedNode(MP + "currency/EUR")) in europe
    assert (fr, MP + "region", NamedNode(MP + "region/europe")) in europe
    assert (fr, MP + "subregion", NamedNode(MP + "subregion/western-europe")) in europe
    assert (fr, MP + "timezone", Literal("Europe/Paris")) in europe
    assert (fr, MP + "utcOffset", Literal("UTC+01:00")) in europe
    assert (fr, MP + "phoneCode", Literal("33")) in europe
    assert (fr, MP + "tld", Literal(".fr")) in europe
    latitude = next(o for s, p, o in europe if s == fr and p == MP + "latitude")
    assert latitude.datatype == NamedNode("http://www.w3.org/2001/XMLSchema#decimal")
    assert float(latitude.value) == 46.0


def test_currency_region_and_subregion_are_entities(europe: set) -> None:
    euro = MP + "currency/EUR"
    assert (euro, RDF_TYPE.value, NamedNode(MP + "Currency")) in europe
    assert (euro, RDFS_LABEL.value, Literal("Euro", language="en")) in europe
    assert (euro, MP + "code", Literal("EUR")) in europe
    assert (euro, MP + "symbol", Literal("€")) in europe
    assert (MP + "region/europe", RDFS_LABEL.value, Literal("Europe", language="en")) in europe
    assert (MP + "subregion/western-europe", MP + "region", NamedNode(MP + "region/europe")) in europe
    assert (MP + "currency/JPY", MP + "code", Literal("JPY")) in europe


def test_shared_entities_are_described_once() -> None:
    triples = list(build_triples(DatasetSpec(countries=frozenset({"FR", "DE"}))))
    euro_types = [t for t in triples if t.subject.value == MP + "currency/EUR" and t.predicate == RDF_TYPE]
    assert len(euro_types) == 1


def test_states_point_at_their_country(europe: set) -> None:
    idf = MP + "state/FR-IDF"
    assert (idf, RDF_TYPE.value, NamedNode(MP + "State")) in europe
    assert (idf, MP + "stateCode", Literal("IDF")) in europe
    assert (idf, MP + "country", FRANCE) in europe
    assert any(s == idf and p == RDFS_LABEL.value and o.language == "en" for s, p, o in europe)


def test_only_the_requested_countries_are_built(europe: set) -> None:
    countries = {s for s, p, o in europe if p == RDF_TYPE.value and o == NamedNode(MP + "Country")}
    assert countries == {MP + "country/FR", MP + "country/DE", MP + "country/JP"}
    assert not any(s.startswith(MP + "currency/USD") for s, _, _ in europe)


def test_cities_are_off_by_default_and_added_on_request() -> None:
    without = _facts(DatasetSpec(countries=frozenset({"AD"})))
    with_cities = _facts(DatasetSpec(countries=frozenset({"AD"}), include_cities=True))
    city = NamedNode(MP + "City")
    assert not any(o == city for _, _, o in without)
    cities = {s for s, p, o in with_cities if p == RDF_TYPE.value and o == city}
    assert cities
    some_city = next(iter(cities))
    assert (some_city, MP + "country", NamedNode(MP + "country/AD")) in with_cities


def test_optional_values_are_skipped_and_population_is_typed(tmp_path: Path) -> None:
    record = {
        "name": "Testland",
        "iso2": "TL",
        "iso3": "TST",
        "capital": "",
        "currency": "",
        "region": "",
        "subregion": "",
        "timezones": [],
        "translations": {"zh-CN": "测试"},
        "latitude": "not a number",
        "population": 1234,
    }
    (tmp_path / "countries.json").write_text(json.dumps([record]))
    facts = _facts(DatasetSpec(data_dir=tmp_path))
    subject = MP + "country/TL"
    predicates = {p for s, p, _ in facts if s == subject}
    assert MP + "capital" not in predicates
    assert MP + "currency" not in predicates
    assert MP + "region" not in predicates
    assert MP + "latitude" not in predicates
    population = next(o for s, p, o in facts if p == MP + "population")
    assert population == Literal("1234", datatype=NamedNode("http://www.w3.org/2001/XMLSchema#integer"))


def test_written_ntriples_parse_back(tmp_path: Path) -> None:
    target = tmp_path / "kg.nt"
    count = write_ntriples(DatasetSpec(countries=frozenset({"CI"})), target)
    parsed = list(parse(path=target, format=RdfFormat.N_TRIPLES))
    assert len(parsed) == count > 0
    assert any(q.object == Literal("Côte d'Ivoire", language="fr") for q in parsed)


def test_slug_and_prefixes() -> None:
    assert slug("South-Eastern Asia") == "south-eastern-asia"
    assert slug("Australia and New Zealand") == "australia-and-new-zealand"
    assert PREFIXES["mp"] == NAMESPACE
    assert PREFIXES["country"] == NAMESPACE + "country/"


def test_spec_round_trips_and_fingerprints_what_was_loaded() -> None:
    spec = DatasetSpec(countries=frozenset({"FR", "JP"}), include_cities=True)
    assert DatasetSpec.from_json(spec.to_json()) == spec
    assert spec.fingerprint() != DatasetSpec(countries=frozenset({"FR"})).fingerprint()
    assert DatasetSpec().fingerprint()["source"].startswith("countrystatecity-countries==")
    assert (default_data_dir() / "countries.json").exists()
