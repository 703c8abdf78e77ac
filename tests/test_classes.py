"""Class names (core.classes): the official imagenet_classlabels.txt table format or bare labels, by full label
or unique synonym, ids as text in their one canonical spelling, and the refusals."""
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
    assert names.resolve("Tinca tinca") == 0 and names.resolve("tench") == 0 and names.resolve(4) == 4
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


@pytest.mark.parametrize("text, meant", [
    (" 3 ", "'3'"), ("03", "'3'"), ("\u0663", "'3'"), ("+3", None), ("3.0", None), ("", None), ("0x3", None),
    ("\uff13", "'3'"),  # a fullwidth three: int() reads it as 3 too
])
def test_ids_have_one_spelling(text, meant):
    """ASCII digits as str(id) writes them, nothing int() would also read as the id; the message names the
    spelling meant when there is one."""
    digits = ClassNames.ids(10)
    assert int(text.strip()) == 3 if meant else True  # what Python's int() makes of these (the trap)
    with pytest.raises(InputError) as e:
        digits.resolve(text, "--class")
    msg = str(e.value)
    assert msg.startswith(f"--class: expected a class id in [0, 10) or a class name, got {text!r}"), msg
    assert (f"did you mean {meant}?" in msg) if meant else ("did you mean" not in msg)
    assert digits.resolve("3") == 3 and digits.resolve("0") == 0 and digits.resolve(3) == 3


def test_names_have_one_spelling(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text(TABLE)
    names = ClassNames.load(f, 5)
    for text, meant in (("TENCH", "tench"), (" tench", "tench"), ("tinca  tinca", "Tinca tinca"),
                        ("Crane, Bird", "crane, bird")):
        with pytest.raises(InputError, match=rf"got {text!r} \(did you mean {meant!r}\?"):
            names.resolve(text)
    assert names.resolve("crane, bird") == 1 and names.resolve("Tinca tinca") == 0
