"""Every experiments/ script defines its flags only when run (define_flags() under __main__), so that tests may
import any two scripts that share a flag name (e.g. --config) in one process."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "experiments").glob("*.py"))


def _is_flag_definition(node) -> bool:
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        return False
    f = node.value.func
    return (isinstance(f, ast.Attribute) and f.attr.startswith("DEFINE") and isinstance(f.value, ast.Name)
            and f.value.id in ("flags", "config_flags"))


def _main_block(tree):
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return node
    return None


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_no_flag_is_defined_at_import(path):
    tree = ast.parse(path.read_text())
    at_import = [n.lineno for n in tree.body if _is_flag_definition(n)]
    assert not at_import, f"{path.name}: flags defined at import (lines {at_import}); move them into define_flags()"
    defines = any(isinstance(n, ast.FunctionDef) and n.name == "define_flags" for n in tree.body)
    if not defines:
        return
    main = _main_block(tree)
    assert main is not None, f"{path.name} has define_flags() but no __main__ block"
    calls = [ast.unparse(s) for s in main.body]
    assert "define_flags()" in calls, f"{path.name}: __main__ does not call define_flags(): {calls}"
    runs = [i for i, c in enumerate(calls) if c.startswith("app.run")]
    assert runs and calls.index("define_flags()") < runs[0], f"{path.name}: define_flags() must precede app.run"


def test_the_check_sees_a_module_level_flag():
    bad = ast.parse('from absl import flags\nflags.DEFINE_string("config", "", "x")\n')
    assert _is_flag_definition(bad.body[1])
    good = ast.parse('def define_flags():\n    flags.DEFINE_string("config", "", "x")\n')
    assert not any(_is_flag_definition(n) for n in good.body)
