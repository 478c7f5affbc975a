"""What the portmap tests share: a PCP nonce and the check that a call
fails with one PortMapError code."""

from __future__ import annotations

import pytest

from fastpunch.portmap import PortMapError


NONCE = bytes(range(1, 13))


def raises(code: str, fn, *args, **kw) -> PortMapError:
    with pytest.raises(PortMapError) as info:
        fn(*args, **kw)
    assert info.value.code == code, info.value
    assert code in str(info.value)
    return info.value
