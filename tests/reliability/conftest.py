"""The reliability suite (issue 14): merged weights that cannot drift, hostile adapter files, kills and Ctrl-C.

Every test adds what it exercised to one session-wide tally (the ``tally`` fixture); ``python -m pytest -q
tests/reliability`` ends with a "reliability summary" section printing it: files fuzzed, faults injected,
merge/unmerge toggles, the measured drift, and whether every reliability test passed. The figures are those of
the run that prints them.
"""
import collections

import pytest

_TALLY = {"counts": collections.Counter(), "drift": {}, "notes": []}


class Tally:
    """What the reliability tests exercised, for the summary (counts by kind, drift by layer, free notes)."""

    def add(self, kind: str, n: int = 1) -> None:
        _TALLY["counts"][kind] += n

    def drift(self, name: str, value: float) -> None:
        _TALLY["drift"][name] = max(value, _TALLY["drift"].get(name, 0.0))

    def note(self, text: str) -> None:
        _TALLY["notes"].append(text)


@pytest.fixture
def tally():
    return Tally()


def pytest_terminal_summary(terminalreporter):
    counts = _TALLY["counts"]
    if not counts and not _TALLY["drift"]:
        return
    ran = collections.Counter()
    for outcome in ("passed", "failed", "error", "xfailed", "xpassed", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "nodeid", "").startswith("tests/reliability/"):
                ran[outcome] += 1
    tr = terminalreporter
    tr.section("reliability summary")
    for kind in sorted(counts):
        tr.write_line(f"{kind}: {counts[kind]:,}")
    for name, value in sorted(_TALLY["drift"].items()):
        tr.write_line(f"max |W - W0| after merge/unmerge toggles, {name}: {value:.3g}")
    for text in _TALLY["notes"]:
        tr.write_line(text)
    bad = ran["failed"] + ran["error"] + ran["xpassed"]
    verdict = "all passed" if not bad and ran["passed"] else "NOT all passed"
    tr.write_line(f"reliability tests: {', '.join(f'{n} {o}' for o, n in sorted(ran.items()))} -> {verdict}")
