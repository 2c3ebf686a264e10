"""Slot checks for E2E texts: which of the MR's eight attributes a text realises, by documented patterns.

Venue names (:data:`NAMES`, :data:`NEAR`) are found and blanked out first, so ``Raja Indian Cuisine`` is not Indian
food; the other attributes are matched by the regular expressions of ``_PATTERNS`` (price and rating by class: low,
middle / average, high; a negated family-friendly form wins). Each MR attribute is **correct** (its value or class
is realised), **wrong** (only another value is) or **missing**; an attribute the MR lacks but the text realises is
**added** (except a bare ``restaurant``). Slot error rate = (missing + wrong + added) / MR attributes (Dušek et
al., 2019); checked on the test set's references (README.md) and in ``tests/nlg/test_slots.py``.
"""
import re
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from .data import mr_fields

ATTRIBUTES = ("name", "Type", "food", "price", "customer rating", "area", "family friendly", "near")

# Every venue name that occurs in the E2E data, as a name or as a near value.
NAMES = ("The Vaults", "The Cambridge Blue", "The Eagle", "The Mill", "Loch Fyne", "Bibimbap House",
         "The Rice Boat", "The Wrestlers", "Aromi", "The Phoenix", "Browns Cambridge", "Taste of Cambridge",
         "Cocum", "The Dumpling Tree", "The Punter", "The Golden Curry", "Alimentum", "Midsummer House",
         "Blue Spice", "Strada", "The Waterman", "Zizzi", "Green Man", "Clowns", "Giraffe", "The Olive Grove",
         "The Twenty Two", "The Cricketers", "Wildwood", "The Golden Palace", "The Plough", "Cotto", "Fitzbillies",
         "Travellers Rest Beefeater")
NEAR = ("Café Adriatic", "Café Brazil", "Burger King", "The Sorrento", "The Rice Boat", "Clare Hall",
        "Raja Indian Cuisine", "Café Rouge", "Yippee Noodle Bar", "The Portland Arms", "All Bar One",
        "Express by Holiday Inn", "The Bakers", "Café Sicilia", "Avalon", "The Six Bells", "Ranch",
        "Crowne Plaza Hotel", "Rainbow Vegetarian Café")

_PRICE_CTX = r"(?:price|priced|prices|pricing|cost|costs|costing|spend|range|£)"
_RATING_CTX = r"(?:rating|ratings|rated|rate|rates|star|stars|review|reviews|reviewed|score|scored)"

# attribute -> value class -> pattern (on lowercased text with venue names blanked out).
_PATTERNS: Dict[str, Dict[str, str]] = {
    "Type": {
        "pub": r"\bpubs?\b",
        "coffee shop": r"\bcoffee[\s-]*(?:shop|house)s?\b|\bcaf[eé]s?\b|\bcoffeeshops?\b",
        "restaurant": r"\brestaurants?\b",
    },
    "food": {
        "english": r"\benglish\b|\bbritish\b",
        "french": r"\bfrench\b",
        "italian": r"\bitalian\b",
        "chinese": r"\bchinese\b",
        "indian": r"\bindian\b",
        "japanese": r"\bjapanese\b|\bsushi\b",
        "fast food": r"\bfast[\s-]*food\b",
    },
    "area": {
        "city centre": r"\bcity[\s-]*cent(?:re|er)\b|\b(?:cent(?:re|er)|middle|heart) of (?:the )?(?:city|town)\b"
                       r"|\bcentrally\b"
                       r"|\btown[\s-]*cent(?:re|er)\b|\bdowntown\b",
        "riverside": r"\briver",
    },
    "family friendly": {
        "no": r"\b(?:not|isn'?t|aren'?t|n't|non|no|never)[\s-]+(?:(?:very|really|a|for|the|whole|suitable|good|"
              r"recommended|friendly|to|with|allow|allowing|allowed|welcome|welcoming)[\s-]+)*"
              r"(?:famil|kid|child)"
              r"|\b(?:famil(?:y|ies)|kids?|child(?:ren)?)[\s-]*(?:un|not[\s-]*)friendly"
              r"|\badults?[\s-]*(?:only|oriented)\b|n't recommend bring|\bno facilities for (?:famil|kids|child)"
              r"|\b(?:family|kid|child)[\s-]*friendly\s*:?\s*no\b"
              r"|\bno[\s-]+(?:kids|children|families|child)\b",
        "yes": r"\b(?:famil(?:y|ies)|kids?|child(?:ren)?)[\s-]*(?:friendly|oriented|welcome)"
               r"|\bfor (?:the (?:whole )?)?(?:famil|kids|child)|\bwelcomes? (?:famil|kids|child)"
               r"|\b(?:suitable|good|great|perfect|ideal|fun) for (?:the (?:whole )?)?(?:famil|kids|child)"
               r"|\bbring (?:the |your )?(?:whole )?(?:famil|kids|child)",
    },
    "price": {
        "low": r"\bcheap|\binexpensive\b|\baffordabl|\bbudget\b|(?:less than|under|below) (?:£ ?)?20\b"
               rf"|\blow[\s-]*{_PRICE_CTX}|\b{_PRICE_CTX}\s+(?:range\s+)?(?:is|are|of)?\s*low\b",
        "middle": r"\bmoderate|£ ?20 ?- ?25|\b20 ?- ?25\b|\breasonabl|\b(?:mid|medium)[\s-]*(?:range|price|priced)"
                  rf"|\baverage[\s-]*{_PRICE_CTX}|\b{_PRICE_CTX}\s+(?:range\s+)?(?:is|are|of)?\s*average\b",
        "high": r"\bexpensive\b|\bpricey\b|\bpricy\b|(?:more than|over|above) (?:£ ?)?30\b|£ ?30"
                rf"|\bhigh[\s-]*(?:end\b|{_PRICE_CTX})|\b{_PRICE_CTX}\s+(?:range\s+)?(?:is|are|of)?\s*high\b",
    },
    "customer rating": {
        "low": r"\b1 out (?:of )?5\b|\bone[\s-]*stars?\b|\b1[\s-]*stars?\b|\bpoor(?:ly)?\b"
               rf"|\blow(?:ly)?[\s-]*(?:customer[\s-]*)?{_RATING_CTX}"
               rf"|\b{_RATING_CTX}\s+(?:of\s+|is\s+|as\s+|are\s+)*(?:a\s+)?low\b",
        "average": r"\b3 out (?:of )?5\b|\bthree[\s-]*stars?\b|\b3[\s-]*stars?\b|\bmediocre\b"
                   rf"|\baverage[\s-]*(?:customer[\s-]*)?{_RATING_CTX}"
                   rf"|\b{_RATING_CTX}\s+(?:of\s+|is\s+|as\s+|are\s+)*(?:an?\s+)?average\b",
        "high": r"\b5 out (?:of )?5\b|\b(?:great|good|excellent|top)[\s-]*(?:customer[\s-]*)?(?:rating|review)s?\b"
                r"|\bfive[\s-]*stars?\b|\b5[\s-]*stars?\b|\bexcellent\b|\btop[\s-]*rated\b"
                rf"|\bhigh(?:ly)?[\s-]*(?:customer[\s-]*)?{_RATING_CTX}"
                rf"|\b{_RATING_CTX}\s+(?:of\s+|is\s+|as\s+|are\s+)*(?:a\s+)?high(?:ly)?\b|\bwell[\s-]*rated\b",
    },
}
_COMPILED = {a: {v: re.compile(p) for v, p in d.items()} for a, d in _PATTERNS.items()}

# MR value -> class, for the attributes whose E2E values come in pairs of wordings.
_VALUE_CLASS = {
    "price": {"cheap": "low", "less than £ 20": "low", "moderate": "middle", "£ 20 - 25": "middle",
              "high": "high", "more than £ 30": "high"},
    "customer rating": {"low": "low", "1 out of 5": "low", "average": "average", "3 out of 5": "average",
                        "high": "high", "5 out of 5": "high"},
}
_VENUES = sorted(set(NAMES) | set(NEAR), key=len, reverse=True)  # longest first: "The Rice Boat" before a part


def parse_mr(mr: str) -> Dict[str, str]:
    """``"name : The Eagle | Type : pub"`` -> ``{"name": "The Eagle", "Type": "pub"}``.

    Raises:
        ValueError: a field without ``:``.
    """
    slots = {}
    for field_, key, value in mr_fields(mr):
        if value is None:
            raise ValueError(f"MR field {field_!r} is not 'key : value'")
        slots[key] = value
    return slots


def _normalise(text: str) -> str:
    text = " ".join(text.lower().split()).replace(" - ", "-")  # E2E's tokenised "family - friendly"
    return text.replace("cafe ", "café ").replace(" cafe", " café")


def _value_class(attr: str, value: str) -> str:
    value = _normalise(value)
    if attr in _VALUE_CLASS:
        table = {_normalise(k): v for k, v in _VALUE_CLASS[attr].items()}
        return table.get(value, value)
    return value


def realised(text: str) -> Dict[str, set]:
    """Per attribute, the values (classes for price and rating) the text realises; ``"venues"``: the venue names
    it mentions (for ``name`` and ``near``), in their MR spelling."""
    t = _normalise(text)
    venues = set()
    for v in _VENUES:
        low = _normalise(v)
        if low in t:
            venues.add(v)
            t = t.replace(low, " ")  # blank it out: no cuisine or café inside a name
    # A placeholder left in a text (a delexicalised model wrote "[near]" for an MR without one) names no venue
    # of the MR: it counts like a venue the MR does not have.
    venues |= set(re.findall(r"\[(?:name|near)\]", t))
    found = {"venues": venues}
    for attr, classes in _COMPILED.items():
        found[attr] = {v for v, rx in classes.items() if rx.search(t)}
    if "no" in found["family friendly"]:
        found["family friendly"] = {"no"}  # "not family friendly" also contains "family friendly"
    return found


@dataclass
class SlotReport:
    """One text's slot check: attribute -> ``"ok"`` / ``"missing"`` / ``"wrong"``, and the attributes added."""
    status: Dict[str, str] = field(default_factory=dict)
    added: List[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(s != "ok" for s in self.status.values()) + len(self.added)

    def problems(self) -> List[str]:
        """Human-readable problems, e.g. ``["missing near", "added customer rating"]``."""
        return [f"{s} {a}" for a, s in self.status.items() if s != "ok"] + [f"added {a}" for a in self.added]


def check(mr: str, text: str) -> SlotReport:
    """A :class:`SlotReport`: which attributes of the E2E MR ``mr`` the ``text`` gets right, misses, gets wrong
    or adds."""
    slots = parse_mr(mr)
    found = realised(text)
    report = SlotReport()
    venues = found["venues"]
    for attr, value in slots.items():
        if attr in ("name", "near"):
            other = slots.get("near" if attr == "name" else "name")
            if value in venues or _normalise(value) in {_normalise(v) for v in venues}:
                report.status[attr] = "ok"
            elif venues - {other}:
                report.status[attr] = "wrong"
            else:
                report.status[attr] = "missing"
            continue
        if attr not in _COMPILED:
            continue  # an attribute this matcher does not know: not counted
        got = found[attr]
        want = _value_class(attr, value)
        report.status[attr] = "ok" if want in got else ("wrong" if got else "missing")
    if "near" not in slots and venues - {slots.get("name")}:
        report.added.append("near")
    for attr in _COMPILED:
        got = found[attr] - ({"restaurant"} if attr == "Type" else set())
        if attr not in slots and got:
            report.added.append(attr)
    return report


def slot_scores(mrs: Sequence[str], texts: Sequence[str]) -> Dict[str, float]:
    """Corpus slot figures for one text per MR.

    Returns:
        ``name_rate`` (share of texts that contain the MR's name), ``near_rate`` (share of the MRs with a ``near``
        whose text contains it; None when no MR has one), ``slot_error_rate`` ((missing + wrong + added) / MR
        attributes), and the counts ``slots``, ``missing``, ``wrong``, ``added``.

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    if len(mrs) != len(texts) or not mrs:
        raise ValueError(f"{len(mrs)} MRs but {len(texts)} texts (need the same, non-zero number)")
    counts = {"slots": 0, "missing": 0, "wrong": 0, "added": 0}
    name_ok, near_ok, near_n = 0, 0, 0
    for mr, text in zip(mrs, texts):
        r = check(mr, text)
        counts["slots"] += len(r.status)
        for s in r.status.values():
            if s != "ok":
                counts[s] += 1
        counts["added"] += len(r.added)
        name_ok += r.status.get("name") == "ok"
        if "near" in r.status:
            near_n += 1
            near_ok += r.status["near"] == "ok"
    errors = counts["missing"] + counts["wrong"] + counts["added"]
    return {"name_rate": name_ok / len(mrs), "near_rate": near_ok / near_n if near_n else None,
            "slot_error_rate": errors / counts["slots"], **counts}


def format_slot_line(s: Dict[str, float]) -> str:
    """One line for a :func:`slot_scores` result, e.g. ``slots: name in 100/100 texts, ...``."""
    near = "no MR has a near" if s["near_rate"] is None else f"near value in {s['near_rate']:.0%} of those with one"
    return (f"slots: name in {s['name_rate']:.0%} of texts, {near}; slot error rate {s['slot_error_rate']:.1%} "
            f"({s['missing']} missing, {s['wrong']} wrong, {s['added']} added of {s['slots']} attributes)")
