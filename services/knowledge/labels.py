"""Entity lookup by label: an in-memory index of every label, native name and code, matched ignoring case and accents."""

from __future__ import annotations

import heapq
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.errors import InvalidArgumentError, quoted
from services.knowledge.model import EntityMatch, local_name

DEFAULT_LOOKUP_LIMIT = 10
# The longest name in the graph (cities included) has 59 characters; a longer label matches nothing, and normalising
# megabytes of text costs seconds of a thread.
MAX_LABEL_CHARS = 500
# Ties between equally good matches go to the entity an agent most likely means: "Georgia" is first the country.
_TYPE_RANK = {"Country": 0, "Currency": 1, "Region": 2, "Subregion": 3, "State": 4, "City": 5}


def _is_diacritic(ch: str) -> bool:
    # Only the combining blocks used as accents on Latin, Greek and Cyrillic letters; marks that are vowels in
    # Indic or Arabic scripts (also category Mn) are kept, or "फ्रांस" would lose half its letters.
    code = ord(ch)
    return (
        0x0300 <= code <= 0x036F
        or 0x1AB0 <= code <= 0x1AFF
        or 0x1DC0 <= code <= 0x1DFF
        or 0x20D0 <= code <= 0x20FF
        or 0xFE20 <= code <= 0xFE2F
    )


def normalise(text: str) -> str:
    """Case-folded, accents removed, every run of characters other than letters, digits and marks made one space:
    "Côte d’Ivoire" -> "cote d ivoire", "JAPAN" -> "japan", "日本" -> "日本"."""
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(ch for ch in decomposed if not _is_diacritic(ch))
    folded = unicodedata.normalize("NFC", kept).casefold()
    spaced = "".join(ch if unicodedata.category(ch)[0] in "LNM" else " " for ch in folded)
    return " ".join(spaced.split())


@dataclass(frozen=True)
class _Entry:
    normalised: str
    text: str
    iri: str


class LabelIndex:
    """Names of entities -> entities. Built once from (iri, text) pairs, the entities' English labels and classes.

    ``lookup`` scores an exact normalised match 1.0, a prefix match (0.5, 0.9] and a substring match (0.1, 0.5),
    longer coverage of the name scoring higher; each entity appears once, with its best-matching name.
    """

    def __init__(
        self,
        names: Iterable[tuple[str, str]],
        english_labels: dict[str, str],
        types: dict[str, set[str]],
    ) -> None:
        self._entries: list[_Entry] = []
        self._exact: dict[str, list[_Entry]] = defaultdict(list)
        seen: set[tuple[str, str]] = set()
        for iri, text in names:
            normalised = normalise(text)
            if not normalised or (iri, normalised) in seen:
                continue
            seen.add((iri, normalised))
            entry = _Entry(normalised, text, iri)
            self._entries.append(entry)
            self._exact[normalised].append(entry)
        self._english = english_labels
        self._types = {iri: frozenset(classes) for iri, classes in types.items()}
        self._class_iris = frozenset(c for classes in self._types.values() for c in classes)

    def __len__(self) -> int:
        return len(self._entries)

    def class_names(self) -> list[str]:
        return sorted({local_name(c) for c in self._class_iris}, key=lambda n: (_TYPE_RANK.get(n, 99), n))

    def _resolve_class(self, type_: str) -> str:
        wanted = type_.strip()
        for class_iri in self._class_iris:
            if wanted == class_iri or wanted.casefold() == local_name(class_iri).casefold():
                return class_iri
        raise InvalidArgumentError(
            f"unknown type {quoted(type_)}; use one of {', '.join(self.class_names())} (a local name or the class IRI), "
            "or leave type empty"
        )

    def lookup(self, label: str, type_: str | None = None, limit: int | None = None) -> list[EntityMatch]:
        """Best matches for ``label``, highest score first; ``type_`` keeps only entities of that class."""
        if limit is None or limit == 0:
            limit = DEFAULT_LOOKUP_LIMIT
        if limit < 0:
            raise InvalidArgumentError(f"limit must be positive (or 0 for {DEFAULT_LOOKUP_LIMIT}), got {limit}")
        if not label.strip():
            raise InvalidArgumentError('label is empty; send a name such as "France", "japan" or "日本"')
        if len(label) > MAX_LABEL_CHARS:
            raise InvalidArgumentError(
                f'label has {len(label)} characters; send a name of at most {MAX_LABEL_CHARS} (such as "France")'
            )
        query = normalise(label)
        if not query:
            raise InvalidArgumentError(f"label {quoted(label)} has no letters or digits to match; send a name")
        class_iri = self._resolve_class(type_) if type_ and type_.strip() else None

        best: dict[str, tuple[float, str]] = {}
        for entry in self._candidates(query):
            if class_iri is not None and class_iri not in self._types.get(entry.iri, ()):
                continue
            score = _score(query, entry.normalised)
            if score > best.get(entry.iri, (0.0, ""))[0]:
                best[entry.iri] = (score, entry.text)

        def rank(item: tuple[str, tuple[float, str]]) -> tuple[float, int, str]:
            iri, (score, _) = item
            return (-score, self._type_rank(iri), self._english.get(iri, iri))

        top = heapq.nsmallest(limit, best.items(), key=rank)
        return [
            EntityMatch(
                iri=iri,
                label=self._english.get(iri, matched),
                types=tuple(sorted(local_name(c) for c in self._types.get(iri, ()))),
                matched_label=matched,
                score=round(score, 4),
            )
            for iri, (score, matched) in top
        ]

    def _candidates(self, query: str) -> Iterable[_Entry]:
        yield from self._exact.get(query, ())
        for entry in self._entries:
            if entry.normalised != query and query in entry.normalised:
                yield entry

    def _type_rank(self, iri: str) -> int:
        return min((_TYPE_RANK.get(local_name(c), 99) for c in self._types.get(iri, ())), default=99)


def _score(query: str, name: str) -> float:
    if name == query:
        return 1.0
    coverage = len(query) / len(name)
    if name.startswith(query):
        return 0.5 + 0.4 * coverage
    at_word_start = f" {query}" in f" {name}"
    return 0.1 + 0.35 * coverage + (0.05 if at_word_start else 0.0)
