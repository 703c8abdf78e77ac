"""Class names: a request names its class by id or by name. Torch-free.

Without a names file a model's classes are named by their ids ("0", "1", ...): the bundled digits model's
names are its digits "0".."9". ImageNet models take the official DDT repo's `imagenet_classlabels.txt`
(`--class-names FILE`): one class per line, in id order, either as that file writes it, a Markdown table row

    | 0        | tench, Tinca tinca                 |

(the first cell must equal the line's index), or as a bare label (`tench, Tinca tinca`). A class is found by
its full label (first: ImageNet's 517 is "crane", its 134 "crane, bird") or by any one of its comma-separated
synonyms that no other class shares (a shared one is refused, naming the candidates), case-insensitively.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, InputError


def _key(name: str) -> str:
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

    def __post_init__(self):
        for i, label in enumerate(self.labels):
            self._by_label.setdefault(_key(label), []).append(i)
            for k in {_key(p) for p in label.split(",") if _key(p)}:
                self._by_synonym.setdefault(k, []).append(i)

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

    def resolve(self, value: int | str) -> int:
        """A class id in [0, N) from an id or a name; InputError naming the class otherwise."""
        n = len(self.labels)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise InputError("class", f"a class id in [0, {n}) or a class name", repr(value))
        if isinstance(value, int):
            if not 0 <= value < n:
                raise InputError("class", f"a class id in [0, {n})", value)
            return value
        hits = self._by_label.get(_key(value)) or self._by_synonym.get(_key(value), [])
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise InputError("class", "a name of one class (this one names several: use the full label or the id)",
                             f"{value!r} ({'; '.join(f'{i}: {self.labels[i]}' for i in hits)})")
        if value.strip().isdigit():  # "7" where the names are not the ids: the id
            return self.resolve(int(value))
        where = f" from {self.source}" if self.source else ""
        raise InputError("class", f"a class id in [0, {n}) or a class name{where}", repr(value)[:120])
