"""scripts/serve.py as a child process on loopback, for the tools that drive a real server."""
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parent.parent


def start(model, port: int, *flags: str, **popen) -> subprocess.Popen:
    """serve.py MODEL on 127.0.0.1:port, returned once /health answers (or the process died)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), str(model), "--port", str(port),
                             *flags], env={**os.environ, "XLA_FLAGS": ""}, **popen)
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx2.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start in 4 minutes")
