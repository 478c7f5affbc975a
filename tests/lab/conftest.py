import os
import subprocess
import sys

import pytest

from fastpunch.lab.pytest_plugin import lab_factory  # noqa: F401


@pytest.fixture
def cli(tmp_path):
    """``cli("lab", "up", ...)``: the fastpunch command in a subprocess, with
    a lab state directory of this test's own; whatever happened, the lab is
    taken down at the end."""
    if os.geteuid() != 0:
        pytest.skip("the lab CLI needs root")
    env = {**os.environ, "FASTPUNCH_LAB_STATE": str(tmp_path)}

    def run(*args, check=True):
        proc = subprocess.run([sys.executable, "-m", "fastpunch", *args], capture_output=True,
                              text=True, timeout=180, env=env)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    yield run
    run("lab", "down", check=False)      # whatever happened, nothing stays up
