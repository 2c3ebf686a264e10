r"""Which module names a pattern picks: the one rule behind ``inject``'s ``target_modules`` / ``exclude_modules``,
the ``rank_pattern`` / ``alpha_pattern`` of ``inject`` and ``add_adapter``, and the patterns of a PEFT config."""
import re
from typing import Dict, Optional


def matches(name: str, pattern, suffix_regex: bool = False) -> bool:
    r"""Whether module ``name`` is picked by ``pattern``.

    Args:
        name: a qualified module name (``transformer.h.0.attn.c_attn``).
        pattern: a list (tuple, set) of names, each picking a module whose name equals it or ends with ``"."``
            plus it (``"c_attn"``); or one string, picking the same way or as a regular expression that matches
            the whole name. A string that is not a valid expression picks literally only.
        suffix_regex: the expression may also match a dotted suffix of the name only, as PEFT matches the keys
            of its ``rank_pattern`` / ``alpha_pattern`` (``r"h\.1\.attn\.c_attn"`` picks
            ``transformer.h.1.attn.c_attn``).

    Returns:
        True when the pattern picks the name.
    """
    if isinstance(pattern, str):
        if name == pattern or name.endswith("." + pattern):
            return True
        try:
            return re.fullmatch(rf"(?:.*\.)?(?:{pattern})" if suffix_regex else pattern, name) is not None
        except re.error:
            return False
    return any(name == t or name.endswith("." + t) for t in pattern)


def pattern_value(patterns: Optional[Dict[str, object]], name: str, default):
    """The value of the first key of ``patterns`` (``{pattern: value}``, a per-layer rank or alpha) that picks
    ``name`` (:func:`matches` with ``suffix_regex``, PEFT's rule), else ``default``."""
    for pat, value in (patterns or {}).items():
        if matches(name, pat, suffix_regex=True):
            return value
    return default
