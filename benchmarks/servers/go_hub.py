"""Build and run the Go gorilla/websocket rooms hub (``benchmarks/servers/gohub``).

Go modules cannot be fetched here, so the hub is built in GOPATH mode against
Debian's packages (``apt install golang-go golang-github-gorilla-websocket-dev``).
The binary is cached by the source's hash. ``--check`` only builds: it exits
non-zero with one line saying what is missing, and the harness shows that
line as the reason the server was skipped.

Run: ``python benchmarks/servers/go_hub.py --host 127.0.0.1 --port 8765``
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parent / "gohub"
GOPATHS = ("/usr/share/gocode",)


def build() -> Path:
    go = shutil.which("go")
    if go is None:
        sys.exit("go is not installed (apt install golang-go golang-github-gorilla-websocket-dev)")
    gopath = os.environ.get("GOPATH") or ":".join(GOPATHS)
    if not any((Path(p) / "src/github.com/gorilla/websocket").is_dir() for p in gopath.split(":")):
        sys.exit(f"gorilla/websocket is not in GOPATH {gopath} "
                 "(apt install golang-github-gorilla-websocket-dev)")
    digest = hashlib.sha256((SRC / "main.go").read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path(tempfile.gettempdir())) / "trioserve-bench"
    binary = cache / f"gohub-{digest}"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": gopath, "GOFLAGS": "",
           "GOCACHE": str(cache / "gocache")}
    tmp = binary.with_suffix(".tmp")
    done = subprocess.run([go, "build", "-o", str(tmp), "."], cwd=SRC, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"go build failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    tmp.rename(binary)
    return binary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--check", action="store_true", help="only build; exit 0 if the hub can run")
    args = p.parse_args()
    binary = build()
    if args.check:
        return
    os.execv(binary, [str(binary), "-addr", f"{args.host}:{args.port}"])


if __name__ == "__main__":
    main()
