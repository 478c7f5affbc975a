"""fastpunch.portmap without a network: every encoder's bytes against the
RFC layouts, every decoder against well-formed and malformed replies, one
test module per module of the package.

Replies are built here with struct from the RFC layouts (or, for PCP,
from the request the way a server does: R bit set, result, epoch, assigned
address), never with the package's own encoders."""

import pytest

# helpers.raises asserts on the error's code: keep pytest's detailed messages
pytest.register_assert_rewrite("tests.unit.portmap.helpers")
