"""The TensorRT and cuda-python names the project uses, read from its code, and what the real bindings export.

`used_names(paths)` reads every .py file by AST (no hand list) and returns {module: {name chain: [file:line]}}:
- chains rooted at an imported module or an alias of one: `trt.ILogger.Severity.ERROR`,
  `cudart.cudaMemcpyKind.cudaMemcpyHostToDevice`, `from cuda.bindings.utils import get_cuda_native_handle`, and
  names assigned from them (`sev = trt.ILogger.Severity`; `sev.WARNING`);
- for tensorrt also the attributes and methods used on TensorRT objects, found by following values inside each
  file to a fixed point: a call of a tensorrt name, `check(...)` of a TensorRT value, a method call on one,
  variables, `self.` attributes, function returns and parameters fed by them (`runtime.deserialize_cuda_engine`,
  `ctx.execute_async_v3`, `engine.get_tensor_name`, ...), recorded as ("*", name); and the methods a class
  derived from a tensorrt class overrides (`log` of a `trt.ILogger`), which TensorRT calls by name.
  Values that cross files are not followed (each TensorRT object is made and used in one file today).

`TrtBinding(path)` reads a tensorrt.so without loading it (it needs libnvinfer): pybind11 keeps every class,
function, attribute and enum member name and every docstring as a C string in .rodata. Its `names` are the
identifier strings there, whole or as a merged tail that the code references (the linker merges "Logger" into
"ILogger"); `deprecated(name)` returns the deprecation/removal notes tied to a name: an `:ivar name:` line that
says so, or the docstring its registration code passes next to it (the string the nearest RIP-relative `lea`
loads, with no other name or signature in between). Run as a script it prints the check (a second CUDA major can
be checked with PYTHONPATH pointing at it).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import struct
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "ddt_export", ROOT / "scripts")
MODULES = ("tensorrt", "cuda.bindings.runtime", "cuda.bindings.driver", "cuda.bindings.nvrtc", "cuda.bindings.utils")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DEPRECATED = re.compile(r"deprecat|removed", re.I)


# ------------------------------------------------------------------------------------------ the project's uses


def _chain(node) -> tuple[str, ...] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return (node.id, *reversed(parts))
    return None


def _with_scopes(tree):
    """(node, function qualname, class name) for every node."""
    out = []

    def walk(node, scope, cls):
        out.append((node, scope, cls))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(child, f"{scope}.{child.name}" if scope else (f"{cls}.{child.name}" if cls else child.name), cls)
            elif isinstance(child, ast.ClassDef):
                walk(child, scope, child.name)
            else:
                walk(child, scope, cls)

    walk(tree, "", None)
    return out


class _File:
    """One file's uses of the MODULES."""

    def __init__(self, path: Path):
        self.path, self.tree = path, ast.parse(path.read_text(), str(path))
        self.nodes = _with_scopes(self.tree)
        self.aliases: dict[str, tuple[str, ...]] = {}  # local name -> (module, *attrs)
        self.uses: dict[tuple[str, ...], list[str]] = defaultdict(list)
        self._imports()
        self._assigned_aliases()

    def where(self, node) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{node.lineno}"

    def _imports(self):
        for node, _, _ in self.nodes:
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES:
                        self.aliases[a.asname or a.name] = (a.name,)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in MODULES:
                        self.aliases[a.asname or a.name] = (full,)
                    elif node.module in MODULES:
                        self.aliases[a.asname or a.name] = (node.module, a.name)
                        self.uses[(node.module, a.name)].append(self.where(node))

    def resolve(self, node) -> tuple[str, ...] | None:
        """The (module, *attrs) an expression names, or None."""
        ch = _chain(node)
        if ch and ch[0] in self.aliases:
            return self.aliases[ch[0]] + ch[1:]
        return None

    def _assigned_aliases(self):
        changed = True
        while changed:
            changed = False
            for node, _, _ in self.nodes:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    r = self.resolve(node.value)
                    if r and self.aliases.get(node.targets[0].id) != r:
                        self.aliases[node.targets[0].id], changed = r, True

    def chains(self):
        inner = {id(n.value) for n, _, _ in self.nodes if isinstance(n, ast.Attribute)}
        for node, _, _ in self.nodes:
            if isinstance(node, ast.Attribute) and id(node) not in inner:
                r = self.resolve(node)
                if r:
                    self.uses[r].append(self.where(node))

    # ---------------------------------------------------------------- TensorRT objects
    def trt_objects(self):
        funcs: dict[str, tuple] = {}  # qualname -> (FunctionDef, class name)
        for node, scope, cls in self.nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs[scope] = (node, cls)  # a def's own entry carries its qualname
        classes = {n.name: n for n, _, _ in self.nodes if isinstance(n, ast.ClassDef)}
        trt_classes = {name for name, c in classes.items() if any((self.resolve(b) or ("",))[0] == "tensorrt"
                                                                  for b in c.bases)}
        typed: set = set()

        def is_typed(e, scope, cls) -> bool:
            if isinstance(e, ast.Call):
                f = e.func
                if (self.resolve(f) or ("",))[0] == "tensorrt":
                    return True
                if isinstance(f, ast.Name) and f.id == "check" and e.args:
                    return is_typed(e.args[0], scope, cls)
                if isinstance(f, ast.Attribute) and is_typed(f.value, scope, cls):
                    return True
                target = callee(f, scope, cls)
                return bool(target and (("ret", target[0]) in typed or target[0].split(".")[0] in trt_classes))
            if isinstance(e, ast.Name):
                return ("name", scope, e.id) in typed
            if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                return ("attr", cls, e.attr) in typed
            return False

        def callee(f, scope, cls):
            """(function qualname, index of its first positional argument) of a call target in this file."""
            if isinstance(f, ast.Name):
                if f.id in classes and f"{f.id}.__init__" in funcs:
                    return f"{f.id}.__init__", 1
                for q in (f"{scope}.{f.id}", f.id):
                    if q in funcs:
                        return q, 0
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "self" and cls:
                if f"{cls}.{f.attr}" in funcs:
                    return f"{cls}.{f.attr}", 1
            return None

        changed = True
        while changed:
            before = len(typed)
            for node, scope, cls in self.nodes:
                if isinstance(node, ast.Assign) and is_typed(node.value, scope, cls):
                    for t in node.targets:
                        if isinstance(t, ast.Name):
                            typed.add(("name", scope, t.id))
                        elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                            typed.add(("attr", cls, t.attr))
                elif isinstance(node, ast.Return) and node.value is not None and is_typed(node.value, scope, cls):
                    typed.add(("ret", scope))
                elif isinstance(node, ast.Call):
                    target = callee(node.func, scope, cls)
                    if target:
                        fn = funcs[target[0]][0]
                        params = [a.arg for a in fn.args.posonlyargs + fn.args.args][target[1]:]
                        for p, a in zip(params, node.args):
                            if is_typed(a, scope, cls):
                                typed.add(("name", target[0], p))
            changed = len(typed) != before
        for node, scope, cls in self.nodes:
            if isinstance(node, ast.Attribute) and not node.attr.startswith("__") and is_typed(node.value, scope, cls):
                self.uses[("tensorrt", "*", node.attr)].append(self.where(node))
        for name in trt_classes:  # overridden methods: TensorRT calls them by name
            for item in classes[name].body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("__"):
                    self.uses[("tensorrt", "*", item.name)].append(self.where(item))


def used_names(paths=SOURCES) -> dict[str, dict[tuple[str, ...], list[str]]]:
    """{module: {(name, ...): [file:line, ...]}} over every .py file under `paths`."""
    out: dict[str, dict] = defaultdict(lambda: defaultdict(list))
    for base in paths:
        for path in sorted(Path(base).rglob("*.py")):
            f = _File(path)
            if not f.aliases:
                continue
            f.chains()
            if any(v[0] == "tensorrt" for v in f.aliases.values()):
                f.trt_objects()
            for chain, where in f.uses.items():
                out[chain[0]][chain[1:]].extend(where)
    return {m: dict(v) for m, v in out.items()}


# ------------------------------------------------------------------------------------------ tensorrt.so


def binding_path() -> Path | None:
    """The tensorrt .so of the installed bindings wheel (tensorrt_bindings/, or tensorrt/), found without
    importing it."""
    for pkg in ("tensorrt_bindings", "tensorrt"):
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        for d in (spec.submodule_search_locations or []) if spec else []:
            found = sorted(Path(d).glob("tensorrt*.so"))
            if found:
                return found[0]
    return None


def binding_version(so: Path) -> str:
    meta = sorted(so.parent.parent.glob("tensorrt*bindings-*.dist-info"))
    return meta[0].name.removesuffix(".dist-info").split("-")[1] if meta else "unknown"


class TrtBinding:
    """The names and docstrings in a tensorrt.so (x86-64 ELF), read as data."""

    def __init__(self, path: Path):
        self.path, data = Path(path), Path(path).read_bytes()
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1 or struct.unpack_from("<H", data, 18)[0] != 62:
            raise ValueError(f"{path}: not a little-endian x86-64 ELF file")
        sec = self._sections(data)
        ro_addr, ro_off, ro_size = sec[".rodata"]
        tx_addr, tx_off, tx_size = sec[".text"]
        rodata = data[ro_off:ro_off + ro_size]
        self._rodata, self._ro_addr = rodata, ro_addr
        starts, pos = {}, 0
        for piece in rodata.split(b"\0"):
            starts[ro_addr + pos] = piece
            pos += len(piece) + 1
        text = data[tx_off:tx_off + tx_size]
        refs = []  # (code address, string) of every RIP-relative lea into .rodata, in code order
        for m in re.finditer(rb"[\x48\x4c]\x8d[\x05\x0d\x15\x1d\x25\x2d\x35\x3d]", text):
            target = tx_addr + m.start() + 7 + struct.unpack_from("<i", text, m.start() + 3)[0]
            if ro_addr <= target < ro_addr + ro_size:
                o = target - ro_addr
                refs.append((tx_addr + m.start(), rodata[o:rodata.index(b"\0", o)]))
        strings = [s.decode("latin1") for s in starts.values()] + [s.decode("latin1") for _, s in refs]
        self.names = {s for s in strings if IDENT.fullmatch(s)}
        self.docs = {s for s in strings if len(s) > 15 and (" " in s or "\n" in s)}
        self._refs = [(a, s.decode("latin1")) for a, s in refs]
        self._tied = self._tie()
        init = self.path.parent / "__init__.py"  # the package's Python layer (nptype, __version__, ...)
        if init.is_file():
            for node in ast.parse(init.read_text()).body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    self.names.add(node.name)
                elif isinstance(node, ast.Assign):
                    self.names.update(t.id for t in node.targets if isinstance(t, ast.Name))

    @staticmethod
    def _sections(data: bytes) -> dict[str, tuple[int, int, int]]:
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        heads = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
        names_off = heads[shstrndx][4]
        out = {}
        for name, _, _, addr, off, size in heads:
            n = data[names_off + name:data.index(b"\0", names_off + name)].decode()
            out[n] = (addr, off, size)
        return out

    def _tie(self) -> dict[str, list[str]]:
        """{name: docstrings its registration passes}: each docstring the code loads goes to the nearest name
        loaded before or after it, not across another name or a signature string ("(...) -> ...")."""
        kind = ["name" if IDENT.fullmatch(s) else "sig" if s.startswith("(") and "->" in s else
                "doc" if s in self.docs else "" for _, s in self._refs]
        tied: dict[str, list[str]] = defaultdict(list)
        for i, k in enumerate(kind):
            if k != "doc":
                continue
            near = []
            for step in (-1, 1):
                j = i + step
                while 0 <= j < len(kind) and kind[j] not in ("name", "sig"):
                    j += step
                if 0 <= j < len(kind) and kind[j] == "name":
                    near.append((abs(self._refs[j][0] - self._refs[i][0]), self._refs[j][1]))
            if near:
                tied[min(near)[1]].append(self._refs[i][1])
        return tied

    def deprecated(self, name: str) -> list[str]:
        """The notes that say `name` is deprecated or removed ([] when none do)."""
        notes = [line.strip() for doc in self.docs for line in doc.splitlines()
                 if re.match(rf"\s*:ivar {re.escape(name)}:", line) and DEPRECATED.search(line)]
        return notes + [d.strip() for d in self._tied.get(name, []) if DEPRECATED.search(d)]

    def untied_deprecations(self) -> list[str]:
        """Deprecation notes this reading cannot tie to a name (docstrings kept in tables, not loaded by code)."""
        tied = {d for ds in self._tied.values() for d in ds}
        return [d.strip() for d in self.docs if DEPRECATED.search(d) and d not in tied and ":ivar" not in d]

    def untied_subjects(self, name: str) -> list[str]:
        """Untied notes whose subject may be `name`: it is named in them, or their replacement ("use X
        instead", "Superseded by X") is `name` plus a suffix (add_attention -> add_attention_v2)."""
        out = []
        for note in self.untied_deprecations():
            repl = re.findall(r"(?:use|[Ss]uperseded by)\s+`?(\w+)", note)
            if (name in IDENT.findall(note) and name not in repl) or any(r.startswith(name + "_") for r in repl):
                out.append(note)
        return out


def trt_problems(uses: dict[tuple[str, ...], list[str]], binding: TrtBinding) -> list[str]:
    """Every used TensorRT name missing from the binding or said deprecated/removed there, with where it is used."""
    out = []
    for chain, where in sorted(uses.items()):
        for k, name in enumerate(chain):
            if name == "*" or (name.startswith("__") and k > 0):  # ILogger.__init__: Python's own
                continue
            if name not in binding.names:
                out.append(f"trt.{'.'.join(chain)}: {name!r} is not in {binding.path.name} (used at {where[0]})")
            for note in binding.deprecated(name) + binding.untied_subjects(name):
                out.append(f"trt.{'.'.join(chain)}: {name!r} is deprecated: {note[:160]!r} (used at {where[0]})")
    return out


def cuda_problems(uses: dict[str, dict[tuple[str, ...], list[str]]]) -> list[str]:
    """Every used cuda-python name that the installed cuda.bindings lacks (getattr along the chain)."""
    out = []
    for module, chains in uses.items():
        if not module.startswith("cuda."):
            continue
        mod = importlib.import_module(module)
        for chain, where in sorted(chains.items()):
            obj = mod
            for name in chain:
                if not hasattr(obj, name):
                    out.append(f"{module}.{'.'.join(chain)}: no {name!r} (used at {where[0]})")
                    break
                obj = getattr(obj, name)
    return out


if __name__ == "__main__":
    used = used_names()
    for m, chains in sorted(used.items()):
        print(f"{m}: {len(chains)} names")
        for c in sorted(chains):
            print("   ", ".".join(c))
    so = binding_path()
    if so:
        b = TrtBinding(so)
        print(f"{so} ({binding_version(so)}): {len(b.names)} identifier strings; untied deprecations:",
              len(b.untied_deprecations()))
        print("\n".join(trt_problems(used.get("tensorrt", {}), b)) or "tensorrt: no problem")
    import cuda.bindings

    print(f"cuda.bindings {cuda.bindings.__version__} ({cuda.bindings.__file__})")
    print("\n".join(cuda_problems(used)) or "cuda-python: no problem")
    sys.exit(0)
