"""Answer metrics: how well generated answers match reference answers (exact match, contains, ROUGE-L)."""

from __future__ import annotations

import re
import unicodedata

ANSWER_METRICS = ("exact_match", "contains", "rouge_l")

# a CJK character is a word of its own (Chinese and Japanese text has no spaces between words)
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (Unicode NFKC first): 'Paris.' and ' paris' agree."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def words(text: str) -> list[str]:
    return _WORD.findall(normalize(text))


def _lcs(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words over the answer's and the reference's lengths."""
    a, r = words(answer), words(reference)
    if not a or not r:
        return float(a == r)
    common = _lcs(a, r)
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def answer_scores(answer: str, reference: str) -> dict[str, float]:
    """``exact_match`` (normalized strings equal), ``contains`` (the normalized reference occurs in the answer,
    on word boundaries) and ``rouge_l`` of one answer."""
    a, r = normalize(answer), normalize(reference)
    if not r:
        contains = False
    elif re.search(rf"[{_CJK}]", r):  # no word boundaries to respect
        contains = r in a
    else:
        contains = f" {r} " in f" {a} "
    return {"exact_match": float(a == r), "contains": float(contains), "rouge_l": rouge_l(answer, reference)}


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    return {name: sum(s[name] for s in scores) / len(scores) for name in ANSWER_METRICS} if scores else {}
