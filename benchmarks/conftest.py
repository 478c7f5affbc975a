"""Benchmarks share the suite's rules (skips fail under FASTPUNCH_REQUIRE_LIVE,
nothing left behind). Run from the repository root with `python -m pytest`.

Every benchmark records extra_info["correct"]; a fast wrong answer fails."""

import pytest

from tests.conftest import nothing_left_behind, pytest_runtest_makereport, require_root  # noqa: F401


@pytest.fixture(autouse=True)
def output_is_correct(request):
    yield
    bench = request.node.funcargs.get("benchmark")
    if bench is not None:
        assert bench.extra_info.get("correct") is True, (
            f"{request.node.name} produced a wrong result: {bench.extra_info}")
