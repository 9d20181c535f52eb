"""Slow tier: kill -9 in the middle of tuning, and tuning through TVM's RPC tracker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from graphopt.cli import main
from tests.tuning._models import conv_relu

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _recs(db: Path) -> list[dict]:
    path = db / "records.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_kill_9_then_resume(tmp_path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(conv_relu(), model)
    db = tmp_path / "db"
    argv = ["tune", str(model), "--db", str(db), "--per-task", "8", "--batch", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "graphopt", *argv],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # kill its measurement workers with it
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if sum(r["t"] == "rec" for r in _recs(db)) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "tuning ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = sum(r["t"] == "rec" for r in _recs(db))
    assert killed_at >= 3
    assert main(argv) == 0  # resumes: the database opens, the rest is tuned
    recs = _recs(db)
    conv = next(r["w"] for r in recs if r["t"] == "wl" and r["name"] == "fused_conv2d_nchwc_relu")
    assert sum(r["t"] == "rec" and r["w"] == conv for r in recs) == 8
    assert main(argv) == 0  # and a third run spends nothing
    assert len(_recs(db)) == len(recs)


def test_ctrl_c_keeps_what_was_measured(tmp_path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(conv_relu(), model)
    db = tmp_path / "db"
    argv = ["tune", str(model), "--db", str(db), "--per-task", "8", "--batch", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "graphopt", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and sum(r["t"] == "rec" for r in _recs(db)) < 2:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends (to the main process here)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "resume" in err
    assert "compile uses" in out  # the table of what was measured
    kept = sum(r["t"] == "rec" for r in _recs(db))
    assert 2 <= kept < 8 + 2
    assert main(argv) == 0
    recs = _recs(db)
    conv = next(r["w"] for r in recs if r["t"] == "wl" and r["name"] == "fused_conv2d_nchwc_relu")
    assert sum(r["t"] == "rec" and r["w"] == conv for r in recs) == 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_servers(port: int, key: str, count: int, timeout: float = 120) -> None:
    from tvm import rpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            info = rpc.connect_tracker("127.0.0.1", port).summary()
            if info.get("queue_info", {}).get(key, {}).get("free", 0) >= count:
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1)
    raise AssertionError(f"{count} RPC servers did not register in {timeout} s")


def test_tune_through_rpc_tracker(tmp_path, capsys) -> None:
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (the tune extra)")
    model = tmp_path / "m.onnx"
    onnx.save(conv_relu(), model)
    port = _free_port()
    py = sys.executable
    procs = [
        subprocess.Popen(
            [
                py,
                "-m",
                "tvm.exec.rpc_tracker",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--port-end",
                str(port + 1),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    ]
    try:
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        py,
                        "-m",
                        "tvm.exec.rpc_server",
                        "--host",
                        "127.0.0.1",
                        "--tracker",
                        f"127.0.0.1:{port}",
                        "--key",
                        "loopback",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        _wait_for_servers(port, "loopback", 2)
        db = tmp_path / "db"
        tracker = ["--rpc-tracker", f"127.0.0.1:{port}"]
        argv = ["tune", str(model), "--db", str(db), "--per-task", "2", "--batch", "2"]
        assert main([*argv, *tracker, "--rpc-key", "loopback"]) == 0
        out = capsys.readouterr()
        assert "2 device(s) under key 'loopback'" in out.err
        recs = _recs(db)
        assert any(r["t"] == "rec" and r["ok"] for r in recs)
        # a key with no devices: a one-line error, no waiting
        start = time.monotonic()
        assert main([*argv, "--per-task", "3", *tracker, "--rpc-key", "nobody"]) == 2
        assert "no device under key 'nobody'" in capsys.readouterr().err
        assert time.monotonic() - start < 30
    finally:
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
