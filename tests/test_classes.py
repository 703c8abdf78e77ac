"""Class names (core.classes): the official imagenet_classlabels.txt table format or bare labels, by full label
or unique synonym, ids as text, and the refusals."""
from __future__ import annotations

import pytest

from ddt_export.core.classes import ClassNames, parse_class_names
from ddt_export.core.errors import ConfigError, InputError

# the official file's format (a Markdown table row per class, padded), with ImageNet's two cranes
TABLE = """| 0        | tench, Tinca tinca                                 |
| 1        | crane, bird                                        |
| 2        | crane                                              |
| 3        | maillot                                            |
| 4        | maillot, tank suit                                 |"""


def test_table_and_bare_formats():
    assert parse_class_names(TABLE) == ["tench, Tinca tinca", "crane, bird", "crane", "maillot", "maillot, tank suit"]
    assert parse_class_names("tench\n\ngoldfish\n") == ["tench", "goldfish"]
    with pytest.raises(ConfigError, match="line 2: id: expected 1, got 5"):
        parse_class_names("| 0 | a |\n| 5 | b |")
    with pytest.raises(ConfigError, match="no labels"):
        parse_class_names("\n\n")


def test_resolve(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text(TABLE)
    names = ClassNames.load(f, 5)
    assert names.resolve("Tinca tinca") == 0 and names.resolve("TENCH") == 0 and names.resolve(4) == 4
    assert names.resolve("crane") == 2  # the full label of 2 wins over the synonym of 1
    assert names.resolve("crane, bird") == 1 and names.resolve("tank suit") == 4 and names.resolve("3") == 3
    with pytest.raises(InputError, match=r"class: expected a name of one class .* got 'maillot' "
                                         r"\(0: maillot, swimsuit; 1: maillot, tank suit\)"):
        ClassNames(["maillot, swimsuit", "maillot, tank suit"]).resolve("maillot")
    with pytest.raises(InputError, match=rf"class: expected a class id in \[0, 5\) or a class name from {f}"):
        names.resolve("goldfish")
    with pytest.raises(InputError, match=r"class: expected a class id in \[0, 5\), got 5"):
        names.resolve(5)
    with pytest.raises(InputError, match="class: expected"):
        names.resolve(True)
    with pytest.raises(ConfigError, match="expected 10 labels"):
        ClassNames.load(f, 10)
    digits = ClassNames.ids(10)
    assert digits.labels[7] == "7" and digits.resolve("7") == 7 and digits.resolve(7) == 7
