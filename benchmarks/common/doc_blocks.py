"""The generated blocks of the docs: a benchmark's table lives between a begin and an end marker comment.

Every study's README.md holds its current result between `RESULT_BEGIN` and `RESULT_END` (written by the study's
script on a full run, `update_block`); some scripts also regenerate tables in docs/*.md (fid_digits ->
docs/validate.md, adm_digits -> docs/metrics.md, fp8_recipes -> docs/fp8.md) the same way. The dated history
of earlier runs is git's.
"""
from __future__ import annotations

from pathlib import Path

RESULT_BEGIN, RESULT_END = "<!-- result begin -->", "<!-- result end -->"


def replace_between(text: str, begin: str, end: str, body: str) -> str:
    """`text` with what lies between the markers `begin` and `end` replaced by `body` (unchanged without them)."""
    if begin not in text:
        return text
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def update_block(path: Path, body: str, begin: str = RESULT_BEGIN, end: str = RESULT_END) -> bool:
    """Replace the block between the markers in the file `path`; False (the file untouched) when the file or
    its markers are missing."""
    path = Path(path)
    if not path.is_file():
        return False
    text = path.read_text()
    if begin not in text or end not in text:
        return False
    path.write_text(replace_between(text, begin, end, body))
    return True
