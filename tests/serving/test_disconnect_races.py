"""A client that leaves as its request is admitted: Python 3.11's ``asyncio.wait_for`` (admission's
wait for a queued slot) can swallow the cancel that arrives as the slot is granted, so the work
finishes anyway; what it started must be let go, not run to its end holding the slot."""

import asyncio

from mmserve.serving.router.relay import unless_disconnected


class Leaving:
    """An HTTP request whose client hangs up at once."""

    async def receive(self):
        return {"type": "http.disconnect"}


class Started:
    closed = False

    async def aclose(self):
        self.closed = True


def test_work_that_finishes_despite_its_cancel_has_what_it_started_closed():
    made = [Started(), Started()]

    async def work():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:  # as wait_for does when its future ended at the same moment
            pass
        return made

    assert asyncio.run(unless_disconnected(Leaving(), work)) is None
    assert [m.closed for m in made] == [True, True]
