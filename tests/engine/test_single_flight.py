"""SingleFlight: callers asking for a key being computed share that computation, its result or
its error; other keys, and later calls, compute their own."""

import threading
import time

import pytest

from mmserve.engine.single_flight import SingleFlight


def _start(fn) -> tuple[threading.Thread, list]:
    out = []
    thread = threading.Thread(target=lambda: out.append(_outcome(fn)))
    thread.start()
    return thread, out


def _outcome(fn):
    try:
        return fn()
    except Exception as error:
        return error


def test_callers_of_a_key_being_computed_share_its_result_and_its_error():
    flight = SingleFlight()
    started, release, calls = threading.Event(), threading.Event(), []

    def slow(value):
        def compute():
            calls.append(value)
            started.set()
            release.wait(10)
            if isinstance(value, Exception):
                raise value
            return value
        return compute

    for value in ("pixels", ValueError("that file will not decode")):
        started.clear(), release.clear()
        calls.clear()
        first = _start(lambda: flight.run("key", slow(value)))
        assert started.wait(10)
        others = [_start(lambda: flight.run("key", slow("computed again"))) for _ in range(5)]
        elsewhere = flight.run("another key", lambda: "its own")  # not held up by the key being computed
        time.sleep(0.3)  # the five are waiting on the first call's result by now
        release.set()
        for thread, _ in [first, *others]:
            thread.join(10)
        outcomes = [out[0] for _, out in [first, *others]]
        assert calls == [value] and elsewhere == ("its own", True)
        if isinstance(value, Exception):
            assert all(outcome is value for outcome in outcomes)
        else:
            assert outcomes == [("pixels", True)] + [("pixels", False)] * 5


def test_a_key_is_computed_again_once_its_computation_has_returned():
    flight = SingleFlight()
    assert flight.run("key", lambda: 1) == (1, True)
    assert flight.run("key", lambda: 2) == (2, True)
    with pytest.raises(KeyError):
        flight.run("key", lambda: {}["missing"])
    assert flight.run("key", lambda: 3) == (3, True)
