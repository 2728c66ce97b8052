"""Every module of skattn imports, every script and tool answers --help, and every skattn name
that scripts, tools, tests and the library use exists (docs/tools.md). Scripts and tools run
on a GPU that CI does not have, and setting a module attribute that was renamed
(`launch.SOME_SWITCH = ...`) raises nothing, so these checks keep them in step with the
library."""
import ast
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import skattn

ROOT = Path(__file__).resolve().parents[1]
ENTRY_FILES = sorted([*ROOT.glob("scripts/*.py"), *ROOT.glob("tools/*.py")])
OPTIONAL = {"matplotlib", "tqdm", "transformers", "accelerate"}  # extras of pyproject.toml


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(skattn.__path__, "skattn."))


def test_every_module_imports():
    names = _modules()
    # a package or module that walk_packages would miss would not be listed here
    assert {"skattn.api", "skattn.bench.models", "skattn.bench.calibrate",
            "skattn.kernels.attention"} <= set(names)
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name not in OPTIONAL:  # an extra not installed here is not a stale name
                failed[name] = repr(err)
        except Exception as err:  # noqa: BLE001 (every failure is reported)
            failed[name] = repr(err)
    assert not failed, failed


def test_old_module_paths_are_gone():
    # the model table and the cost-model fit belong to the benchmark
    for name in ("skattn.models", "skattn.calibrate", "skattn.calibrate_sweep"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(name)


# One interpreter runs every file's `--help` in turn (a process each would cost ~3 s apiece).
_HELP_DRIVER = r"""
import contextlib, io, json, runpy, sys
results = {}
for path in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [path, "--help"]
    saved_path = list(sys.path)
    sys.path.insert(0, path.rsplit("/", 1)[0])
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                runpy.run_path(path, run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001
        code, out = 1, io.StringIO(repr(e))
    sys.path[:] = saved_path
    results[path] = (code, out.getvalue()[-2000:])
print(json.dumps(results))
"""


def test_every_script_and_tool_answers_help():
    assert len(ENTRY_FILES) >= 8, ENTRY_FILES
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _HELP_DRIVER, *map(str, ENTRY_FILES)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(res.stdout.splitlines()[-1])
    bad = {Path(p).name: text for p, (code, text) in results.items() if code != 0}
    assert not bad, bad
    for path, (_, text) in results.items():
        # the usage (argparse) or the module docstring's first line
        doc = ast.get_docstring(ast.parse(Path(path).read_text())) or ""
        assert "usage" in text or doc.splitlines()[0] in text, (path, text[:300])


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        return None


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> skattn module, from every import in the file (function bodies too)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "skattn":
                    # `import skattn.x` binds skattn; `import skattn.x as y` binds y
                    out[a.asname or "skattn"] = a.name if a.asname else "skattn"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "skattn":
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if _module(full) is not None:  # a submodule (other names: _missing_names)
                    out[a.asname or a.name] = full
    return {k: v for k, v in out.items() if _module(v) is not None}


def _missing_names(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    missing = []
    for node in ast.walk(tree):  # imported modules and names must exist
        if isinstance(node, ast.Import):
            missing += [f"{node.lineno}: {a.name}" for a in node.names
                        if a.name.split(".")[0] == "skattn" and _module(a.name) is None]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "skattn":
            module = _module(node.module)
            if module is None:
                missing.append(f"{node.lineno}: {node.module}")
                continue
            missing += [f"{node.lineno}: {node.module}.{a.name}" for a in node.names
                        if not hasattr(module, a.name)
                        and _module(f"{node.module}.{a.name}") is None]
    aliases = _aliases(tree)
    for node in ast.walk(tree):  # module.attr chains, read or set
        if not isinstance(node, ast.Attribute):
            continue
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if not isinstance(base, ast.Name) or base.id not in aliases:
            continue
        obj = importlib.import_module(aliases[base.id])
        for attr in reversed(chain):
            if not isinstance(obj, types.ModuleType):
                break  # an attribute of a class or value: not a module's name
            if not hasattr(obj, attr) and _module(f"{obj.__name__}.{attr}") is None:
                missing.append(f"{node.lineno}: {base.id} ({obj.__name__}).{attr}")
                break
            obj = getattr(obj, attr, None) if hasattr(obj, attr) else _module(
                f"{obj.__name__}.{attr}")
    return sorted(set(missing))


def test_skattn_names_used_by_scripts_tools_and_tests_exist():
    files = [*ENTRY_FILES, *ROOT.glob("tests/*.py"), *ROOT.glob("src/skattn/**/*.py")]
    assert len(files) > 60
    missing = {str(p.relative_to(ROOT)): m for p in files if (m := _missing_names(p))}
    assert not missing, missing


def test_the_name_check_catches_a_stale_switch(tmp_path):
    # the kind of line the check exists for: setting a module global that is not there
    f = tmp_path / "probe.py"
    f.write_text("from skattn import launch\nimport skattn\n\n"
                 "def main():\n    launch.USE_PDL = False\n    launch.run\n"
                 "    skattn.bench.models.MODELS\n    skattn.Tuning().pdl\n"
                 "    from skattn.bench.timing import ColdTimer, NoSuchTimer\n")
    assert _missing_names(f) == ["5: launch (skattn.launch).USE_PDL",
                                 "9: skattn.bench.timing.NoSuchTimer"]


def test_public_api_is_listed_and_documented():
    # `skattn.__all__` is what `import skattn` gives besides submodules, and every name in it
    # has a numpy-style docstring (a Parameters or Attributes section)
    public = {name for name, obj in vars(skattn).items()
              if not name.startswith("_") and not inspect.ismodule(obj)}
    assert set(skattn.__all__) == public
    for name in skattn.__all__:
        doc = inspect.getdoc(getattr(skattn, name)) or ""
        assert "Parameters\n----------" in doc or "Attributes\n----------" in doc, name
