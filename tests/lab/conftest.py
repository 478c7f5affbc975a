from fastpunch.lab.pytest_plugin import lab_factory  # noqa: F401
