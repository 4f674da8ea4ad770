"""The acceptance rules for LLM-written text (recipe §4), as plain functions.

Lengths and differences are measured in *units*: a word of a space-separated language, or one
character of Chinese, Japanese or Korean (which have no spaces). Punctuation and case do not
count, so "Hello, world!" and "hello world" are the same text.

- ``length_ratio``: units of the new text over units of the reference;
- ``difference``: 1 - difflib's similarity ratio of the two unit sequences (0 identical, 1 nothing
  in common). A paraphrase must differ from its source by more than 0.30 when the source is one
  sentence and by more than 0.20 when it is a paragraph (``min_difference``);
- ``script``: the writing system most of the units belong to (a word counts once, like one CJK
  character, so "如何在Ubuntu上安装PyTorch" is Chinese), the stand-in for "same language";
- ``normalize``: the key duplicates are found by: NFKC, case-folded, sentence punctuation and
  quotes dropped, whitespace collapsed; other symbols are kept ("C++" and "C#", "-5" and "5" differ).
"""

from __future__ import annotations

import collections
import difflib
import functools
import re
import unicodedata

__all__ = ["units", "normalize", "length_ratio", "difference", "sentence_count", "min_difference",
           "script", "script_of_units", "same_script"]

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\u3100-\u312f\u31f0-\u31ff"
_UNIT = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
_FULL_WIDTH_END = re.compile(r"[。！？；\n]+")
_LATIN_END = re.compile(r"[.!?;]+(?=\s|$)")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc eg ie al fig no vol approx inc ltd co corp dept est".split())
_PUNCT = str.maketrans({ch: " " for ch in ".,!?;:'\"`´“”‘’«»「」『』，。！？；：、…·・()[]{}（）【】《》〈〉"})

# paragraphs (several sentences) may keep more of their source than single sentences
SENTENCE_DIFFERENCE = 0.30
PARAGRAPH_DIFFERENCE = 0.20


def units(text: str) -> list[str]:
    """Words and CJK characters, NFKC-normalized and case-folded; punctuation dropped."""
    return _UNIT.findall(unicodedata.normalize("NFKC", text).casefold())


def normalize(text: str) -> str:
    """The duplicate key: NFKC, case-folded, sentence punctuation and quotes dropped, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().translate(_PUNCT).split())


def length_ratio(new: str, reference: str) -> float:
    """units(new) / units(reference); inf when the reference has none."""
    ref = len(units(reference))
    return len(units(new)) / ref if ref else float("inf")


def difference(a: str, b: str) -> float:
    """1 - similarity of the unit sequences (difflib's ratio, junk heuristic off)."""
    ua, ub = units(a), units(b)
    if not ua and not ub:
        return 0.0
    # rounded: 1 - 0.7 is 0.30000000000000004, which would pass a "more than 30%" rule at exactly 30%
    return round(1.0 - difflib.SequenceMatcher(None, ua, ub, autojunk=False).ratio(), 12)


def _sentence_end(text: str, m: re.Match) -> bool:
    """A '.', '!', '?' or ';' followed by a space ends a sentence unless it closes an initialism
    ("U.S.", "e.g."), a single letter ("J. Smith") or a common abbreviation ("Dr.", "etc.")."""
    if text[m.start()] != ".":
        return True
    word = re.search(r"([\w.]+)$", text[:m.start()])
    if word is None:
        return True
    w = word.group(1).casefold()
    return "." not in w and len(w) > 1 and w not in _ABBREVIATIONS


def sentence_count(text: str) -> int:
    """Sentences, split at . ! ? ; followed by a space (not in "2.5", "U.S.", "Dr."), at their
    full-width forms and at line breaks."""
    count = 0
    for chunk in _FULL_WIDTH_END.split(text):
        start = 0
        for m in _LATIN_END.finditer(chunk):
            if _sentence_end(chunk, m):
                count += bool(units(chunk[start:m.start()]))
                start = m.end()
        count += bool(units(chunk[start:]))
    return count


def min_difference(source: str) -> float:
    """How much a paraphrase of ``source`` must differ from it: 0.30 for a sentence, 0.20 for a paragraph."""
    return SENTENCE_DIFFERENCE if sentence_count(source) <= 1 else PARAGRAPH_DIFFERENCE


@functools.lru_cache(maxsize=1 << 16)
def _script_of(ch: str) -> str | None:
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    if not name:
        return None
    first = name.split()[0]
    if first in ("HIRAGANA", "KATAKANA"):
        return "KANA"
    if first == "CJK":
        return "HAN"
    return first  # LATIN, CYRILLIC, GREEK, ARABIC, HEBREW, HANGUL, DEVANAGARI, THAI, ...


@functools.lru_cache(maxsize=1 << 18)
def _unit_script(unit: str) -> str | None:
    s = _script_of(unit[0])  # a unit is one CJK character or a run of one script's letters
    if s is None:  # a leading digit or underscore: the first letter decides
        s = next((x for x in map(_script_of, unit) if x is not None), None)
    return s


def script(text: str) -> str | None:
    """The writing system of most units ('LATIN', 'HAN', 'CYRILLIC', ...); None without letters.

    A word and a CJK character count once each. Japanese counts as 'KANA' when it has kana at all
    (its kanji would otherwise outvote them).
    """
    return script_of_units(units(text))


def script_of_units(text_units: list[str]) -> str | None:
    """``script`` of a text already cut into ``units``."""
    counts = collections.Counter(map(_unit_script, text_units))
    counts.pop(None, None)
    if not counts:
        return None
    if counts.get("KANA", 0) and counts.get("KANA", 0) + counts.get("HAN", 0) >= max(counts.values()):
        return "KANA"
    return max(counts, key=counts.get)


def same_script(a: str, b: str) -> bool:
    """True when both texts are mostly in one writing system (or either has no letters)."""
    sa, sb = script(a), script(b)
    return sa is None or sb is None or sa == sb
