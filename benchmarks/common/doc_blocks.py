"""The generated blocks of the docs: a benchmark's table lives between a begin and an end marker comment."""
from __future__ import annotations


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    """`text` with what lies between the markers `begin` and `end` replaced by `body` (unchanged without them)."""
    if begin not in text:
        return text
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1]
