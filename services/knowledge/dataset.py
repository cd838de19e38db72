"""The countries knowledge graph: turns the `countrystatecity-countries` package's JSON into RDF triples.

Vocabulary (namespace ``https://meshpilot.dev/kg/``, prefix ``mp:``). Every query may use these prefixes without
PREFIX lines: ``mp:``, ``rdf:``, ``rdfs:``, ``xsd:`` and one per kind of entity, because SPARQL prefixed names cannot
contain "/": ``country:FR`` = <https://meshpilot.dev/kg/country/FR>, likewise ``state:FR-75``, ``currency:EUR``,
``region:europe``, ``subregion:western-europe``, ``city:<id>``. Example::

    SELECT ?capital ?currency WHERE { country:FR mp:capital ?capital ; mp:currency/rdfs:label ?currency }

The graph::

    mp:country/<ISO2>          a mp:Country          e.g. mp:country/FR
        rdfs:label             English name @en, plus every translation of the data as a language-tagged label
                               (ar, br, de, es, fa, fr, hi, hr, it, ja, ko, nl, pl, pt, pt-BR, ru, tr, uk, zh-CN).
                               The store keeps language tags lower-case (zh-cn): compare them with
                               langMatches(lang(?l), "zh-CN"), not with "=".
        mp:nativeName          name in the country's own language ("Deutschland", "日本")
        mp:iso2 "FR"  mp:iso3 "FRA"  mp:numericCode "250"  mp:phoneCode "33"  mp:tld ".fr"  mp:emoji "🇫🇷"
        mp:capital             the capital's name as a plain string ("Paris"); absent for a few territories
        mp:currency            -> mp:currency/<CODE>
        mp:region              -> mp:region/<slug>      (Africa, Americas, Asia, Europe, Oceania, Polar)
        mp:subregion           -> mp:subregion/<slug>   (e.g. "Western Europe")
        mp:timezone            IANA zone name ("Europe/Paris"), one triple per zone
        mp:utcOffset           UTC offset name of each zone ("UTC+01:00")
        mp:latitude, mp:longitude   xsd:decimal
        mp:population          xsd:integer, only where the data has it (version 2.0.1 has none)
    mp:currency/<CODE>         a mp:Currency         rdfs:label "Euro"@en; mp:code "EUR"; mp:symbol "€"
    mp:region/<slug>           a mp:Region           rdfs:label "Europe"@en
    mp:subregion/<slug>        a mp:Subregion        rdfs:label "Western Europe"@en; mp:region -> its region
    mp:state/<ISO2>-<code>     a mp:State            e.g. mp:state/FR-IDF (Île-de-France), mp:state/US-CA
        rdfs:label @en; mp:nativeName; mp:stateCode "IDF"; mp:iso3166_2 "FR-IDF"; mp:stateType "metropolitan region";
        mp:country -> the country; mp:timezone; mp:latitude, mp:longitude
    mp:city/<id>               a mp:City (only when cities are included, see below)
        rdfs:label @en; mp:state -> the state; mp:country -> the country; mp:latitude, mp:longitude; mp:wikidataId

Plain values (codes, capitals, native names, zones) are xsd:string literals without a language tag, so
``?c mp:capital "Paris"`` matches. Cities are off by default: the data has 152k of them, and measured on a 2-core
machine they take the store from 63k triples / 5 MB / ~3 s to the first SERVING to 976k triples / 75 MB / ~26 s
(~15 s on every later start, building the 169k-name lookup index), while the agents' questions are about countries;
``DatasetSpec(include_cities=True)`` adds them.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from pyoxigraph import Literal, NamedNode, RdfFormat, Triple, serialize

NAMESPACE = "https://meshpilot.dev/kg/"
PREFIX = "mp"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
RDFS = "http://www.w3.org/2000/01/rdf-schema#"
XSD = "http://www.w3.org/2001/XMLSchema#"
ENTITY_KINDS = ("country", "state", "currency", "region", "subregion", "city")
# Predeclared in every query. SPARQL local names cannot contain "/", so mp:country/FR is written country:FR.
PREFIXES = {
    PREFIX: NAMESPACE,
    "rdf": RDF,
    "rdfs": RDFS,
    "xsd": XSD,
    **{kind: f"{NAMESPACE}{kind}/" for kind in ENTITY_KINDS},
}

# Bump when the triples produced for the same data change, so existing stores are rebuilt.
VOCABULARY_VERSION = 1
SOURCE_PACKAGE = "countrystatecity-countries"

CLASSES = ("Country", "State", "Currency", "Region", "Subregion", "City")

RDF_TYPE = NamedNode(RDF + "type")
RDFS_LABEL = NamedNode(RDFS + "label")
_XSD_DECIMAL = NamedNode(XSD + "decimal")
_XSD_INTEGER = NamedNode(XSD + "integer")
_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


def mp(local_name: str) -> NamedNode:
    """The IRI of ``mp:<local_name>``."""
    return NamedNode(NAMESPACE + local_name)


def country_iri(iso2: str) -> str:
    return f"{NAMESPACE}country/{iso2.upper()}"


def state_iri(iso2: str, state_code: str) -> str:
    return f"{NAMESPACE}state/{iso2.upper()}-{state_code}"


def currency_iri(code: str) -> str:
    return f"{NAMESPACE}currency/{code.upper()}"


def slug(name: str) -> str:
    """ASCII slug of a name for IRIs: "South-Eastern Asia" -> "south-eastern-asia"."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")


def default_data_dir() -> Path:
    """The JSON directory inside the installed `countrystatecity-countries` package."""
    return Path(str(resources.files("countrystatecity_countries") / "data"))


def source_version() -> str:
    try:
        return metadata.version(SOURCE_PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class DatasetSpec:
    """What to load: the data directory and which parts of it. Its ``fingerprint`` identifies a built store."""

    data_dir: Path | None = None
    include_cities: bool = False
    countries: frozenset[str] | None = None
    """ISO2 codes to load (with their states, and only the currencies and regions they use); None loads all."""

    def resolved_data_dir(self) -> Path:
        return self.data_dir or default_data_dir()

    def to_json(self) -> str:
        return json.dumps(
            {
                "data_dir": str(self.data_dir) if self.data_dir else None,
                "include_cities": self.include_cities,
                "countries": sorted(self.countries) if self.countries is not None else None,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> DatasetSpec:
        spec = json.loads(text)
        return cls(
            data_dir=Path(spec["data_dir"]) if spec["data_dir"] else None,
            include_cities=bool(spec["include_cities"]),
            countries=frozenset(spec["countries"]) if spec["countries"] is not None else None,
        )

    def fingerprint(self) -> dict[str, Any]:
        return {
            "source": f"{SOURCE_PACKAGE}=={source_version()}",
            "data_dir": str(self.resolved_data_dir()),
            "vocabulary_version": VOCABULARY_VERSION,
            "include_cities": self.include_cities,
            "countries": sorted(self.countries) if self.countries is not None else None,
        }


def _read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _literal(value: Any) -> Literal | None:
    text = str(value).strip() if value is not None else ""
    return Literal(text) if text else None


def _decimal(value: Any) -> Literal | None:
    text = str(value).strip() if value is not None else ""
    return Literal(text, datatype=_XSD_DECIMAL) if _DECIMAL.fullmatch(text) else None


class _TripleSink:
    """Collects triples, skipping empty values and emitting each shared entity (currency, region) once."""

    def __init__(self) -> None:
        self.triples: list[Triple] = []
        self.seen_entities: set[str] = set()

    def add(self, subject: NamedNode, predicate: NamedNode, obj: NamedNode | Literal | None) -> None:
        if obj is not None:
            self.triples.append(Triple(subject, predicate, obj))

    def drain(self) -> list[Triple]:
        triples, self.triples = self.triples, []
        return triples

    def first_time(self, iri: str) -> bool:
        if iri in self.seen_entities:
            return False
        self.seen_entities.add(iri)
        return True


def _add_region(sink: _TripleSink, region: str) -> NamedNode | None:
    if not region.strip():
        return None
    node = mp(f"region/{slug(region)}")
    if sink.first_time(node.value):
        sink.add(node, RDF_TYPE, mp("Region"))
        sink.add(node, RDFS_LABEL, Literal(region.strip(), language="en"))
    return node


def _add_subregion(sink: _TripleSink, subregion: str, region: NamedNode | None) -> NamedNode | None:
    if not subregion.strip():
        return None
    node = mp(f"subregion/{slug(subregion)}")
    if sink.first_time(node.value):
        sink.add(node, RDF_TYPE, mp("Subregion"))
        sink.add(node, RDFS_LABEL, Literal(subregion.strip(), language="en"))
        sink.add(node, mp("region"), region)
    return node


def _add_currency(sink: _TripleSink, country: dict[str, Any]) -> NamedNode | None:
    code = (country.get("currency") or "").strip()
    if not code:
        return None
    node = NamedNode(currency_iri(code))
    if sink.first_time(node.value):
        sink.add(node, RDF_TYPE, mp("Currency"))
        sink.add(node, mp("code"), Literal(code.upper()))
        name = (country.get("currency_name") or "").strip()
        sink.add(node, RDFS_LABEL, Literal(name, language="en") if name else None)
        sink.add(node, mp("symbol"), _literal(country.get("currency_symbol")))
    return node


def _add_country(sink: _TripleSink, country: dict[str, Any]) -> NamedNode:
    node = NamedNode(country_iri(country["iso2"]))
    sink.add(node, RDF_TYPE, mp("Country"))
    sink.add(node, RDFS_LABEL, Literal(country["name"].strip(), language="en"))
    for language, name in sorted((country.get("translations") or {}).items()):
        if name and name.strip() and language.lower() != "en":
            sink.add(node, RDFS_LABEL, Literal(name.strip(), language=language))
    for key, predicate in (
        ("native", "nativeName"),
        ("iso2", "iso2"),
        ("iso3", "iso3"),
        ("numeric_code", "numericCode"),
        ("phone_code", "phoneCode"),
        ("tld", "tld"),
        ("capital", "capital"),
        ("emoji", "emoji"),
    ):
        sink.add(node, mp(predicate), _literal(country.get(key)))
    sink.add(node, mp("currency"), _add_currency(sink, country))
    region = _add_region(sink, country.get("region") or "")
    sink.add(node, mp("region"), region)
    sink.add(node, mp("subregion"), _add_subregion(sink, country.get("subregion") or "", region))
    for zone in country.get("timezones") or []:
        sink.add(node, mp("timezone"), _literal(zone.get("zoneName")))
        sink.add(node, mp("utcOffset"), _literal(zone.get("gmtOffsetName")))
    sink.add(node, mp("latitude"), _decimal(country.get("latitude")))
    sink.add(node, mp("longitude"), _decimal(country.get("longitude")))
    population = country.get("population")
    if isinstance(population, int) or (isinstance(population, str) and population.isdigit()):
        sink.add(node, mp("population"), Literal(str(population), datatype=_XSD_INTEGER))
    return node


def _add_state(sink: _TripleSink, iso2: str, country: NamedNode, state: dict[str, Any]) -> None:
    code = str(state.get("state_code") or "").strip()
    if not code or not state.get("name"):
        return
    node = NamedNode(state_iri(iso2, code))
    sink.add(node, RDF_TYPE, mp("State"))
    sink.add(node, RDFS_LABEL, Literal(state["name"].strip(), language="en"))
    sink.add(node, mp("nativeName"), _literal(state.get("native")))
    sink.add(node, mp("stateCode"), Literal(code))
    sink.add(node, mp("iso3166_2"), _literal(state.get("iso3166_2")))
    sink.add(node, mp("stateType"), _literal(state.get("type")))
    sink.add(node, mp("country"), country)
    sink.add(node, mp("timezone"), _literal(state.get("timezone")))
    sink.add(node, mp("latitude"), _decimal(state.get("latitude")))
    sink.add(node, mp("longitude"), _decimal(state.get("longitude")))


def _add_city(sink: _TripleSink, iso2: str, country: NamedNode, city: dict[str, Any]) -> None:
    node = mp(f"city/{city['id']}")
    sink.add(node, RDF_TYPE, mp("City"))
    sink.add(node, RDFS_LABEL, Literal(city["name"].strip(), language="en"))
    state_code = str(city.get("state_code") or "").strip()
    if state_code:
        sink.add(node, mp("state"), NamedNode(state_iri(iso2, state_code)))
    sink.add(node, mp("country"), country)
    sink.add(node, mp("latitude"), _decimal(city.get("latitude")))
    sink.add(node, mp("longitude"), _decimal(city.get("longitude")))
    sink.add(node, mp("wikidataId"), _literal(city.get("wikiDataId")))


def read_countries(data_dir: Path, only: Collection[str] | None = None) -> list[dict[str, Any]]:
    """The package's country records, optionally only those whose ISO2 code is in ``only``."""
    countries = _read_json(data_dir / "countries.json")
    if only is not None:
        wanted = {code.upper() for code in only}
        countries = [c for c in countries if c["iso2"].upper() in wanted]
    return countries


def build_triples(spec: DatasetSpec) -> Iterator[Triple]:
    """Every triple of the dataset described by ``spec``, country by country."""
    data_dir = spec.resolved_data_dir()
    sink = _TripleSink()
    for country in read_countries(data_dir, spec.countries):
        iso2 = country["iso2"].upper()
        node = _add_country(sink, country)
        country_dir = data_dir / "by-country" / iso2
        states_file = country_dir / "states.json"
        if states_file.exists():
            for state in _read_json(states_file):
                _add_state(sink, iso2, node, state)
        if spec.include_cities:
            for cities_file in sorted((country_dir / "states").glob("*/cities.json")):
                for city in _read_json(cities_file):
                    _add_city(sink, iso2, node, city)
        yield from sink.drain()


def write_ntriples(spec: DatasetSpec, path: Path) -> int:
    """Writes the dataset as N-Triples to ``path``; returns the number of triples."""
    count = 0

    def counted() -> Iterator[Triple]:
        nonlocal count
        for triple in build_triples(spec):
            count += 1
            yield triple

    serialize(counted(), output=path, format=RdfFormat.N_TRIPLES)
    return count
