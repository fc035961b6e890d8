"""The project's own Neo4j: lifecycle, auth, loopback only, port clashes, NEO4J_URI."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import neo4j
import pytest

from graphstore.connection import ConnectionSettings, open_driver, settings_from_env
from graphstore.errors import ConnectionFailed, ServerError
from graphstore.server import USER, ServerConfig, free_port, read_password, start, status, stop

pytestmark = pytest.mark.store
ROOT = Path(__file__).resolve().parent.parent


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_running_server_answers_and_is_locked_down(neo4j_server: ServerConfig, driver: neo4j.Driver) -> None:
    st = status(neo4j_server)
    assert st.running and st.pid is not None
    mode = stat.S_IMODE(os.stat(neo4j_server.password_file).st_mode)
    assert mode == 0o600
    password = read_password(neo4j_server)
    # the password never shows in a process listing or the server's logs
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert password not in ps
    for log_file in (neo4j_server.instance_dir / "logs").glob("*"):
        assert password not in log_file.read_text(errors="replace")
    # a wrong password is refused
    with pytest.raises(ConnectionFailed, match="refused the credentials"):
        open_driver(ConnectionSettings(uri=neo4j_server.bolt_uri, user=USER, password=password + "x"))
    # listens on loopback only
    ip = _non_loopback_ip()
    if ip is not None:
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((ip, neo4j_server.bolt_port)) != 0
    conf = (neo4j_server.conf_dir / "neo4j.conf").read_text()
    assert "server.default_listen_address=127.0.0.1" in conf
    assert "dbms.security.auth_enabled=true" in conf
    # Browser is served over HTTP
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{neo4j_server.http_port}/browser/", timeout=10) as r:
        assert b"Neo4j Browser" in r.read()


def test_start_stop_restart_reuses_data(tmp_path: Path, neo4j_server: ServerConfig) -> None:
    cfg = neo4j_server.instance(tmp_path / "inst", heap_initial="256m", heap_max="512m", pagecache="128m",
                                tx_memory_max="256m")
    try:
        start(cfg)
        assert start(cfg).running  # a second start returns the running server
        with open_driver(ConnectionSettings(uri=cfg.bolt_uri, user=USER, password=read_password(cfg))) as drv:
            drv.execute_query("CREATE (:Probe {v: $v})", v=42, database_="neo4j")
        pid = status(cfg).pid
        assert stop(cfg)
        assert not status(cfg).running
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        start(cfg)
        with open_driver(ConnectionSettings(uri=cfg.bolt_uri, user=USER, password=read_password(cfg))) as drv:
            rows = drv.execute_query("MATCH (p:Probe) RETURN p.v AS v", database_="neo4j").records
            assert [r["v"] for r in rows] == [42]
    finally:
        stop(cfg)
    assert not stop(cfg)


def test_port_taken_gives_clear_error(tmp_path: Path, neo4j_server: ServerConfig) -> None:
    cfg = ServerConfig(lib_dir=neo4j_server.lib_dir, instance_dir=tmp_path / "inst2",
                       bolt_port=neo4j_server.bolt_port, http_port=free_port())
    with pytest.raises(ServerError, match=f"Bolt port {neo4j_server.bolt_port} .* already in use"):
        start(cfg)


def test_neo4j_uri_set_means_nothing_is_started(tmp_path: Path, neo4j_server: ServerConfig) -> None:
    env = dict(os.environ, NEO4J_URI=neo4j_server.bolt_uri, NEO4J_USER=USER,
               NEO4J_PASSWORD=read_password(neo4j_server), PATHX_HOME=str(tmp_path / "home"))
    out = subprocess.run([sys.executable, "-m", "pathx.cli", "db", "start"], env=env, capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert "not starting" in out.stdout
    assert not (tmp_path / "home" / "neo4j").exists()
    status_out = subprocess.run([sys.executable, "-m", "pathx.cli", "db", "status"], env=env, capture_output=True,
                                text=True, cwd=ROOT, check=False)
    assert status_out.returncode == 0 and "external" in status_out.stdout


def test_unanswering_uri_names_the_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("NEO4J_URI", f"bolt://127.0.0.1:{port}")
    monkeypatch.setenv("NEO4J_PASSWORD", "whatever")
    with pytest.raises(ConnectionFailed, match=f"127.0.0.1:{port} does not answer.*NEO4J_URI"):
        open_driver(settings_from_env())
