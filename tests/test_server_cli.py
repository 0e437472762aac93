"""`lowbit serve` as a user runs it: the CLI in a subprocess on a free port, then stopped with SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import openai


def _serve(*args: str) -> subprocess.Popen:
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lowbit.runtime.cli", "serve", "--threads", "1", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_serve_cli_end_to_end():
    proc = _serve("--port", "0", "--api-key", "k1", "--model-name", "tiny-chat", "--ctx", "256")
    try:
        # the address line comes once the port is bound and the model loaded and warmed up (a cold numba cache
        # first says which kernels it compiles)
        line = proc.stderr.readline()
        while line.startswith(("compiling kernels", "compiled ")):
            line = proc.stderr.readline()
        m = re.search(r"at (http://127\.0\.0\.1:\d+/v1) \(API key required\)", line)
        assert m, line
        client = openai.OpenAI(base_url=m.group(1), api_key="k1", max_retries=0, timeout=30)
        assert [x.id for x in client.models.list().data] == ["tiny-chat"]
        r = client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
        )
        assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason in ("stop", "length")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert time.monotonic() - t0 < 10
        assert proc.returncode == 0  # SIGTERM is how a server is told to stop: a clean exit
        assert "POST /v1/chat/completions 200 prompt=" in err  # the request log line
        assert "Traceback" not in err and "interrupted" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_serve_cli_busy_port_is_one_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = _serve("--port", str(s.getsockname()[1]))
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("lowbit: error: cannot listen on 127.0.0.1:")
    assert "Traceback" not in err
