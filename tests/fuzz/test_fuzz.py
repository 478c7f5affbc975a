"""Bounded fuzzing in the test suite: the atheris harness over the Python
face, and a libFuzzer harness over the C parsers under ASan + UBSan.
FASTPUNCH_FUZZ_SECONDS bounds each run (default 30)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SECONDS = int(os.environ.get("FASTPUNCH_FUZZ_SECONDS", "30"))


def seed_corpus(directory: Path) -> Path:
    subprocess.run([sys.executable, str(HERE / "fuzz_parse.py"), "--write-seeds",
                    str(directory)], check=True, timeout=120)
    return directory


def run_fuzzer(cmd, tmp_path):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS * 3 + 120,
                          cwd=tmp_path)
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "leak-", "timeout-", "oom-")))
    assert proc.returncode == 0 and not crashes, (
        f"fuzzer found {crashes or 'a failure'} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    assert "Done" in proc.stderr or "DONE" in proc.stderr, proc.stderr[-2000:]
    return proc


def test_atheris_harness_over_the_python_face(tmp_path):
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    corpus = seed_corpus(tmp_path / "corpus")
    run_fuzzer([sys.executable, str(HERE / "fuzz_parse.py"), f"-max_total_time={SECONDS}",
                "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", str(corpus)], tmp_path)


def test_libfuzzer_harness_over_the_c_parsers_with_sanitizers(tmp_path):
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang is not installed (apt-get install clang)")
    sources = sorted(str(p) for p in (ROOT / "csrc").glob("fp_*.c"))
    if not sources:
        pytest.skip("csrc/ is not beside the tests (run from a checkout)")
    binary = tmp_path / "fuzz_parse"
    subprocess.run([clang, "-g", "-O1", "-fsanitize=fuzzer,address,undefined",
                    "-fno-sanitize-recover=undefined", "-D_GNU_SOURCE",
                    f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}", *sources,
                    str(HERE / "fuzz_parse.c"), "-o", str(binary)],
                   check=True, timeout=300, capture_output=True)
    corpus = seed_corpus(tmp_path / "corpus")
    run_fuzzer([str(binary), f"-max_total_time={SECONDS}", "-rss_limit_mb=2048",
                f"-artifact_prefix={tmp_path}/", str(corpus)], tmp_path)
