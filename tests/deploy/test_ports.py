"""The stack's servers listen where they say: port 0 where the server can take it, a retry
where it cannot (PostgreSQL), so a port taken by another process never fails a test."""

from __future__ import annotations

import socket

import pytest

from tests.deploy.stack import Postgres, http_ok, start_moto


@pytest.mark.slow
def test_moto_binds_port_0_and_the_url_names_the_port_it_got(tmp_path):
    proc, url = start_moto(tmp_path / "moto.log")
    try:
        port = int(url.rsplit(":", 1)[1])
        assert port > 0
        assert http_ok(f"{url}/moto-api/")
        assert f"Running on http://127.0.0.1:{port}" in (tmp_path / "moto.log").read_text()
    finally:
        proc.stop()
    with pytest.raises(ConnectionRefusedError):  # stopped: nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.slow
def test_postgres_moves_to_another_port_when_its_port_was_taken_meanwhile():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        pg = Postgres(port=busy)
        try:
            pg.start()
            assert pg.port != busy
            assert pg.query(pg.superuser, pg.password, "postgres", "SELECT 1") == [(1,)]
            assert "could not bind" in (pg.root / "log").read_text()
        finally:
            pg.stop()
