"""The load benchmark's websocket sessions against a real dashboard server on the tiny city."""

from __future__ import annotations

import asyncio

import websockets

from bench.bench_load import Session, _free_port, _level, _rerun, _start_server, _stop_server


def test_a_session_switches_the_layer_through_the_websocket(tiny_demo):
    port = _free_port()
    server = _start_server(tiny_demo, port)

    async def browse() -> Session:
        session = Session()
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"], max_size=None
        ) as ws:
            await _rerun(ws, session)
            assert session.widgets["Layer"].value == "overall score (lbm)"
            assert not any("Leefbaarometer class 1..9" in text for text in session.texts)
            session.widgets["Layer"].value = "Leefbaarometer class 1..9"
            await _rerun(ws, session)
        return session

    try:
        session = asyncio.run(browse())
    finally:
        _stop_server(server)
    assert session.errors == []
    assert session.widgets["Layer"].value == "Leefbaarometer class 1..9"
    # the legend is the page's answer to the switch: the class layer's nine classes
    assert any("Leefbaarometer class 1..9" in text for text in session.texts)


def test_a_short_load_level_measures_reruns_without_errors(tiny_demo):
    level = _level(tiny_demo, sessions=2, duration_s=3.0, think_s=0.3)
    assert level["errors"] == 0, level["first_errors"]
    assert level["reruns"] >= 2
    assert 0 < level["rerun_p50_s"] <= level["rerun_p95_s"] <= level["rerun_max_s"]
    assert level["server_rss_peak_mb"] >= level["server_rss_idle_mb"] > 0
