"""The benchmark scripts against the package, without running a measurement.

- every script under benchmarks/ imports, and every name it takes from `ddt_export` or `benchmarks` (at module
  level or inside a function, where the heavy imports sit) exists, so an API that moves breaks here and not in
  the next measurement; each script's command line parses (`--help`);
- the generated blocks regenerate: from the committed raw JSON, the scripts' own formatting writes exactly the
  blocks that README/docs hold now (adm_digits -> docs/metrics.md, fp8_recipes -> docs/fp8.md, fid_digits ->
  docs/validate.md, serve_load -> its README), and every marker a script writes to is there;
- results.md and docs/benchmarks.md name every study folder, and every study folder has its README.
"""
from __future__ import annotations

import ast
import importlib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.rglob("*.py") if p.name != "__init__.py")
STUDIES = sorted(p.name for p in BENCH.iterdir() if p.is_dir() and p.name not in ("common", "__pycache__"))
OURS = ("ddt_export", "benchmarks")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def block(text: str, begin: str, end: str) -> str:
    assert text.count(begin) == 1 and text.count(end) == 1, f"markers {begin} / {end}"
    return text.split(begin, 1)[1].split(end, 1)[0]


def test_every_script_is_found():
    assert len(SCRIPTS) >= 14 and "common" in {p.parent.name for p in SCRIPTS}


OPTIONAL = ("torch", "torchvision", "diffusers", "huggingface_hub", "modelopt", "ray")  # extras a study may need


def _optional(e: ModuleNotFoundError) -> bool:
    """The production install (no [export] extra): a module that needs one of these is not importable there."""
    return e.name in OPTIONAL


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(BENCH)))
def test_script_imports_and_its_names_exist(path):
    try:
        mod = importlib.import_module(module_of(path))
    except ModuleNotFoundError as e:  # the production install: a study that needs torch says so and skips
        if not _optional(e):
            raise
        pytest.skip(f"{path.relative_to(BENCH)} needs {e.name} (not installed)")
    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in OURS:
            try:  # function-level imports (where the heavy ones sit) of modules that need an extra
                target = importlib.import_module(node.module)
            except ModuleNotFoundError as e:  # checked in the full install's run
                if not _optional(e):
                    raise
                continue
            for alias in node.names:
                if not hasattr(target, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{node.module}.{alias.name} (line {node.lineno})")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OURS:
                    importlib.import_module(alias.name)
    assert not missing, f"{path.name} imports names that do not exist: {missing}"
    if callable(getattr(mod, "main", None)):
        with pytest.raises(SystemExit) as e:
            mod.main(["--help"])
        assert e.value.code == 0


def test_no_study_imports_another():
    """Studies import benchmarks.common and their own folder only (no circle can form between studies)."""
    for path in SCRIPTS:
        own = path.parent.name
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.startswith("benchmarks."):
                assert node.module.split(".")[1] in ("common", own), f"{path}: imports {node.module}"


def test_adm_report_regenerates_the_blocks(tmp_path, monkeypatch, capsys):
    adm = importlib.import_module("benchmarks.adm_digits.adm_digits")
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "metrics.md", tmp_path / "docs" / "metrics.md")
    shutil.copy(BENCH / "adm_digits" / "README.md", tmp_path / "README.md")
    monkeypatch.setattr(adm, "ROOT", tmp_path)
    monkeypatch.setattr(adm, "HERE", tmp_path)
    assert adm.report(json.loads((BENCH / "adm_digits" / "adm_digits.json").read_text())) == 0
    assert (tmp_path / "docs" / "metrics.md").read_text() == (ROOT / "docs" / "metrics.md").read_text()
    assert (tmp_path / "README.md").read_text() == (BENCH / "adm_digits" / "README.md").read_text()
    block((ROOT / "docs" / "metrics.md").read_text(), adm.MARK_BEGIN, adm.MARK_END)


def test_fp8_report_regenerates_the_blocks(tmp_path, monkeypatch, capsys):
    study = importlib.import_module("benchmarks.fp8_recipes.fp8_sensitivity")
    rep = importlib.import_module("benchmarks.fp8_recipes.fp8_report")
    doc = ROOT / "docs" / "fp8.md"
    shutil.copy(doc, tmp_path / "fp8.md")
    monkeypatch.setattr(rep, "DOC", tmp_path / "fp8.md")
    monkeypatch.setattr(rep, "PLOT", tmp_path / "fp8-pareto.png")
    monkeypatch.setattr(study, "RESULTS", BENCH / "fp8_recipes" / "fp8_sensitivity.json")
    assert rep.report(study.load()) == 0
    assert (tmp_path / "fp8.md").read_text() == doc.read_text()
    assert (tmp_path / "fp8-pareto.png").stat().st_size > 0
    text = doc.read_text()
    for name in ("deviation", "calibration", "xl", "screen", "fid", "n2000", "bias"):  # every table report writes
        block(text, f"<!-- fp8 {name} begin -->", f"<!-- fp8 {name} end -->")


def test_fid_digits_table_is_the_docs_block():
    fd = importlib.import_module("benchmarks.fid_digits.fid_digits")
    res = json.loads((BENCH / "fid_digits" / "fid_digits.json").read_text())
    md = fd.table(res["rows"], res["seeds"], res["real_floor"], res["num"])
    assert block((ROOT / "docs" / "validate.md").read_text(), fd.MARK_BEGIN, fd.MARK_END).strip() == md


def test_serve_section_regenerates_the_readme_block(tmp_path):
    rep = importlib.import_module("benchmarks.serve_load.report")
    readme = BENCH / "serve_load" / "README.md"
    shutil.copy(readme, tmp_path / "README.md")
    rep.write_section(json.loads((BENCH / "serve_load" / "serve_load.json").read_text()), tmp_path / "README.md")
    assert (tmp_path / "README.md").read_text() == readme.read_text()


def test_every_study_has_its_readme_and_rows():
    common = importlib.import_module("benchmarks.common.doc_blocks")
    results = (BENCH / "results.md").read_text()
    overview = (ROOT / "docs" / "benchmarks.md").read_text()
    linked = set(re.findall(r"\]\(([a-z0-9_]+)/\)", results))
    assert linked == set(STUDIES), f"results.md links {sorted(linked)}, folders {STUDIES}"
    for study in STUDIES:
        assert (BENCH / study / "README.md").is_file(), study
        assert f"(../benchmarks/{study}/README.md)" in overview, f"docs/benchmarks.md lacks {study}"
    # the studies whose scripts write their README's result section
    for study in ("export_xl", "xl_cpu", "fid_digits", "dp_vs_uniform", "adm_digits", "serve_load"):
        block((BENCH / study / "README.md").read_text(), common.RESULT_BEGIN, common.RESULT_END)
