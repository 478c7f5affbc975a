"""The CCS's budgets as pure pieces: the token bucket and the login gate."""

from __future__ import annotations

import pytest

from fastpunch.ccs.budget import Bucket, Budgets, Gate


def test_bucket_allows_its_burst_then_its_rate():
    b = Bucket(rate=10, burst=5, now=0.0)
    assert [b.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not b.take(0.05)                 # half a token
    assert b.take(0.1) and not b.take(0.1)  # one token a tenth of a second
    assert [b.take(100.0) for _ in range(6)] == [True] * 5 + [False]   # never more than burst


def test_bucket_ignores_a_clock_that_goes_back():
    b = Bucket(rate=1, burst=1, now=10.0)
    assert b.take(10.0)
    assert not b.take(5.0) and not b.take(10.5)
    assert b.take(11.0)


def test_gate_cuts_the_oldest_of_a_source_past_its_cap():
    cut = []
    g = Gate(per_source=2, total=10)
    for k in range(3):
        g.admit(k, "198.51.100.7", lambda k=k: cut.append(k))
    assert cut == [0] and g.count("198.51.100.7") == 2
    g.admit("other", "203.0.113.9", lambda: cut.append("other"))
    assert cut == [0] and len(g) == 3


def test_gate_cuts_the_oldest_of_all_past_the_total():
    cut = []
    g = Gate(per_source=5, total=3)
    for k, src in enumerate(["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"]):
        g.admit(k, src, lambda k=k: cut.append(k))
    assert cut == [0] and len(g) == 3 and g.count("192.0.2.1") == 0


def test_gate_forgets_who_left_and_uses_the_newest_cut():
    cut = []
    g = Gate(per_source=1, total=10)
    g.admit(1, "192.0.2.1", lambda: cut.append("handshake"))
    g.update(1, lambda: cut.append("session"))
    g.leave(1)
    g.leave(1)                               # twice is harmless
    g.admit(2, "192.0.2.1", lambda: cut.append(2))
    assert cut == [] and g.count("192.0.2.1") == 1
    g.update(2, lambda: cut.append("session 2"))
    g.admit(3, "192.0.2.1", lambda: cut.append(3))
    assert cut == ["session 2"]
    g.update(99, lambda: cut.append("never"))   # unknown keys are not added
    assert len(g) == 1


@pytest.mark.parametrize("field", ["messages_per_second", "write_buffer", "preauth_total",
                                   "handshake_timeout"])
def test_budgets_refuse_nonsense(field):
    with pytest.raises(ValueError, match=field):
        Budgets(**{field: 0})
