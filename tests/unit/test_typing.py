"""Type checkers see the public surface: ``fastpunch.Device`` (exported
lazily at run time) is the real class to mypy, with its signature."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fastpunch


def run_mypy(tmp_path, code: str) -> subprocess.CompletedProcess:
    src = tmp_path / "use.py"
    src.write_text(textwrap.dedent(code))
    env = dict(os.environ)
    where = os.path.dirname(os.path.dirname(fastpunch.__file__))
    if "site-packages" not in where:           # a source checkout (installed: found by itself)
        env["MYPYPATH"] = where
    return subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent",
                           "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(src)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_mypy_sees_device_and_its_signature(tmp_path):
    out = run_mypy(tmp_path, """
        import fastpunch
        from typing import reveal_type
        d = fastpunch.Device(("203.0.113.1", 7443), "cam", b"k" * 32, ca_file="ca.pem")
        reveal_type(d)
        fastpunch.Device(("203.0.113.1", 7443), "cam", b"k" * 32)      # no ca_file
    """)
    assert 'Revealed type is "fastpunch.client.Device"' in out.stdout, out.stdout
    assert 'Missing named argument "ca_file" for "Device"' in out.stdout, out.stdout
    assert "use.py:6: error" in out.stdout and "use.py:4: error" not in out.stdout


ROOT = __file__.rsplit("/tests/", 1)[0]


def _mypy(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_the_engine_stub_passes_stubtest_and_mypy_strict(tmp_path):
    import fastpunch._engine as engine

    stub = os.path.join(os.path.dirname(engine.__file__), "_engine.pyi")
    assert os.path.exists(stub), "the stub ships beside the extension"
    env = dict(os.environ)
    where = os.path.dirname(os.path.dirname(fastpunch.__file__))
    if "site-packages" not in where:
        env["MYPYPATH"] = where
    st = _mypy("mypy.stubtest", "fastpunch._engine", "--allowlist",
               os.path.join(ROOT, "tests", "unit", "stubtest-allowlist.txt"), env=env)
    assert st.returncode == 0, st.stdout + st.stderr
    # the shipped stub, checked as a file of its own (it imports only typing
    # modules; checked where it lies, site-packages would count as sources)
    import shutil

    shutil.copy(stub, tmp_path / "_engine.pyi")
    strict = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                             "--cache-dir", str(tmp_path / "cache"), "_engine.pyi"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert strict.returncode == 0, strict.stdout
    assert "Success" in strict.stdout


def _pyx_params(text: str) -> dict:
    """class -> parameter names of its __cinit__/__init__ in _engine.pyx (the
    one that is not *args, **kwargs), '*' for the keyword-only marker."""
    import re

    out, cls = {}, None
    for line in text.splitlines():
        m = re.match(r"^cdef class (\w+)", line)
        if m:
            cls = m.group(1)
        m = re.match(r"^    def __(?:c)?init__\(self(?:, )?(.*)", line)
        if m and cls and "*args" not in m.group(1):
            sig = m.group(1)
            idx = text.index(line) + len(line)
            while sig.count("(") >= sig.count(")"):      # (continued on later lines)
                nxt = text[idx:].split("\n", 2)[1]
                sig += " " + nxt.strip()
                idx = text.index(nxt, idx) + len(nxt)
            sig = sig[:sig.rindex(")")]
            names = []
            for part in re.split(r",\s*(?![^()]*\))", sig):
                part = part.split("=")[0].strip()
                if part:
                    names.append(part.split()[-1].lstrip("*") if part != "*" else "*")
            out[cls] = names
    return out


def test_the_stub_constructors_match_the_extensions_own():
    # (stubtest cannot see a cdef class's __init__: this is its allowlist's check)
    import ast

    with open(os.path.join(ROOT, "src", "fastpunch", "_engine.pyx")) as f:
        pyx = _pyx_params(f.read())
    import fastpunch._engine as engine

    with open(os.path.join(os.path.dirname(engine.__file__), "_engine.pyi")) as f:
        tree = ast.parse(f.read())
    stub = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    a = item.args
                    stub[node.name] = ([p.arg for p in a.args[1:]] +
                                       (["*"] if a.kwonlyargs else []) +
                                       [p.arg for p in a.kwonlyargs])
    assert set(pyx) == set(stub) and pyx, (pyx, stub)
    for cls, names in pyx.items():
        assert stub[cls] == names, (cls, stub[cls], names)


def test_the_modules_held_to_mypy_strict_pass_it(tmp_path):
    # new modules are written strict from the start (the rest of the
    # package: issue 18); checked alone, imports followed silently
    modules = ["src/fastpunch/liveness.py"]
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                          "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"),
                          *modules], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stdout
