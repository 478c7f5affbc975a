"""Type checkers see the public surface: ``fastpunch.Device`` (exported
lazily at run time) is the real class to mypy, with its signature."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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
