"""Class names: a request names its class by id or by name. Torch-free.

Without a names file a model's classes are named by their ids ("0", "1", ...): the bundled digits model's
names are its digits "0".."9". ImageNet models take the official DDT repo's `imagenet_classlabels.txt`
(`--class-names FILE`): one class per line, in id order, either as that file writes it, a Markdown table row

    | 0        | tench, Tinca tinca                 |

(the first cell must equal the line's index), or as a bare label (`tench, Tinca tinca`).

One canonical spelling: a request names its class
- by id: a JSON integer, or the id as text in ASCII decimal digits as `str(id)` writes it ("3"; not "03", " 3 ",
  "+3", "3.0" or "٣", the Arabic-Indic three, which Python's int() would all read as 3); the CLI's --class is
  that text;
- or by name: its full label exactly as the names file writes it (first: ImageNet's 517 is "crane", its 134
  "crane, bird"), or exactly one of its comma-separated synonyms that no other class shares (a shared one is
  refused, naming the candidates). Case, spaces and quotes count: "TENCH" and " tench" are refused, and the
  error names the spelling meant ("did you mean 'tench'?").
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, InputError


CANONICAL_ID = re.compile(r"0|[1-9][0-9]*")  # ASCII only: re's [0-9] is not \d


def _key(name: str) -> str:
    """A loose form of a name (case, spaces, quotes dropped): only to say which spelling was meant."""
    return " ".join(name.strip().strip("'\",").split()).casefold()


def parse_class_names(text: str, where: str = "class names") -> list[str]:
    """The labels of a names file, in id order (see the module docstring for the format)."""
    names = []
    for n, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        if line.lstrip().startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) != 2 or not cells[0].isdigit():
                raise ConfigError(f"{where} line {n + 1}", "'| ID | LABEL |'", line.strip()[:80])
            if int(cells[0]) != len(names):
                raise ConfigError(f"{where} line {n + 1}: id", len(names), int(cells[0]),
                                  "classes must be listed in id order, one per line")
            label = cells[1]
        else:
            label = line.strip()
        if not _key(label):
            raise ConfigError(f"{where} line {n + 1}", "a class label", repr(line))
        names.append(label.strip())
    if not names:
        raise ConfigError(where, "one class label per line", "no labels")
    return names


@dataclass
class ClassNames:
    """Labels of a model's classes by id; `resolve` turns a request's `class` into an id."""

    labels: list[str]
    source: str = ""  # the names file, if any
    _by_label: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _by_synonym: dict[str, list[int]] = field(default_factory=dict, repr=False)

    _near: dict[str, str] = field(default_factory=dict, repr=False)  # loose form -> the canonical spelling

    def __post_init__(self):
        for i, label in enumerate(self.labels):
            self._by_label.setdefault(label, []).append(i)
            self._near.setdefault(_key(label), label)
            for p in {p.strip() for p in label.split(",") if p.strip()}:
                self._by_synonym.setdefault(p, []).append(i)
                self._near.setdefault(_key(p), p)

    @staticmethod
    def ids(num_classes: int) -> "ClassNames":
        """Classes named by their ids: "0", "1", ... (the digits model's names)."""
        return ClassNames([str(i) for i in range(num_classes)])

    @staticmethod
    def load(path: Path, num_classes: int) -> "ClassNames":
        """A names file for a model of `num_classes` classes (one label per class, no more, no fewer)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("--class-names", "a readable UTF-8 text file", f"{path} ({type(e).__name__})")
        labels = parse_class_names(text, str(path))
        if len(labels) != num_classes:
            raise ConfigError(f"--class-names {path}", f"{num_classes} labels (the model's classes)", len(labels))
        return ClassNames(labels, str(path))

    def __len__(self) -> int:
        return len(self.labels)

    def resolve(self, value: int | str, field: str = "class") -> int:
        """A class id in [0, N) from an id or a name in its one canonical spelling (the module doc); InputError
        naming `field` (`class` in a JSON body, `--class` on the command line) otherwise."""
        n = len(self.labels)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise InputError(field, f"a class id in [0, {n}) or a class name", repr(value))
        if isinstance(value, int):
            if not 0 <= value < n:
                raise InputError(field, f"a class id in [0, {n})", value)
            return value
        hits = self._by_label.get(value) or self._by_synonym.get(value, [])
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise InputError(field, "a name of one class (this one names several: use the full label or the id)",
                             f"{value!r} ({'; '.join(f'{i}: {self.labels[i]}' for i in hits)})")
        if CANONICAL_ID.fullmatch(value):  # "7" where the names are not the ids: the id
            return self.resolve(int(value), field)
        where = f" from {self.source}" if self.source else ""
        meant = self._near.get(_key(value))
        if meant is None and value.strip().isdigit():  # "03", " 3 ", "٣": the id they read as, if any
            k = int(value.strip())
            meant = str(k) if 0 <= k < n else None
        raise InputError(field, f"a class id in [0, {n}) or a class name{where}", repr(value)[:120],
                         f"did you mean {meant!r}? one spelling: ids in ASCII digits, names exactly as listed"
                         if meant else "")
