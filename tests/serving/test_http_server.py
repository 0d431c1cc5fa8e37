"""The HTTP server's log: health polls (every second while the roles start, 503 until they are
ready) are not access lines; every other request is. Its event loop is uvloop's."""

import asyncio
import logging

import uvloop

from mmserve.serving.http_server import HealthPollFilter, listening_url, run_event_loop

ACCESS_FORMAT = '%s - "%s %s HTTP/%s" %d'  # uvicorn's access record


def _access_record(path: str, status: int) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 0, ACCESS_FORMAT,
                             ("127.0.0.1:5000", "GET", path, "1.1", status), None)


def test_health_polls_stay_out_of_the_access_log():
    keep = HealthPollFilter().filter
    assert not keep(_access_record("/health", 503))
    assert not keep(_access_record("/health?probe=1", 200))


def test_other_requests_stay_in_the_access_log():
    keep = HealthPollFilter().filter
    assert keep(_access_record("/v1/chat/completions", 503))
    assert keep(_access_record("/healthz", 404))
    assert keep(logging.LogRecord("uvicorn.access", logging.INFO, __file__, 0, "no arguments", None, None))


def test_the_server_loop_is_uvloop_and_returns_what_its_coroutine_returns():
    async def main():
        await asyncio.sleep(0)
        return asyncio.get_running_loop()

    loop = run_event_loop(main())
    assert isinstance(loop, uvloop.Loop)
    assert loop.is_closed()


def test_the_address_said_is_the_one_listened_on():
    """``--port 0`` logged ``ready on http://127.0.0.1:0`` while uvicorn listened on a free port."""
    import socket

    import uvicorn
    from starlette.applications import Starlette

    async def main():
        server = uvicorn.Server(uvicorn.Config(Starlette(), host="127.0.0.1", port=0, log_level="warning"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        url = listening_url(server)
        server.should_exit = True
        await serving
        return url

    url = run_event_loop(main())
    host, port = url.removeprefix("http://").rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    with socket.socket() as probe:  # the port was this server's: free again once it stopped
        probe.bind(("127.0.0.1", int(port)))
