"""Citrix Provisioning transfer server throughput against a plain static file server (median of 5 runs each).

    python benchmarks/pvs_serve.py [--size-mib 1024]

Both sides are downloaded with ``curl`` over loopback into /dev/null: LayerDesk's transfer server (the
HTTP one on port 3009 in production; a free port here) and ``python -m http.server`` serving the same
file. Prints MiB/s for each and the ratio (ours ÷ static).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.connectors.transfer_server import TransferServer

RUNS = 5


def _curl_seconds(url: str) -> float:
    started = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "-o", os.devnull, url], check=True)
    return time.perf_counter() - started


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        image = Path(work) / "Gold.vhdx"
        with image.open("wb") as file:  # real bytes: a sparse file would flatter both sides
            for _ in range(args.size_mib):
                file.write(os.urandom(1024 * 1024))
        size_mib = image.stat().st_size / 1024**2

        with TransferServer(image, bind="127.0.0.1", port=0, checksum="sha256:bench") as server:
            url = server.url("127.0.0.1")
            _curl_seconds(url)  # warm the page cache
            ours = statistics.median(_curl_seconds(url) for _ in range(RUNS))

        port = _free_port()
        static = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", work], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            static_url = f"http://127.0.0.1:{port}/{image.name}"
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            _curl_seconds(static_url)
            theirs = statistics.median(_curl_seconds(static_url) for _ in range(RUNS))
        finally:
            static.terminate()
            static.wait()

    print(f"file: {size_mib:.0f} MiB, median of {RUNS} curl downloads over loopback")
    print(f"LayerDesk transfer server: {size_mib / ours:8.1f} MiB/s ({ours:.2f} s)")
    print(f"python -m http.server:     {size_mib / theirs:8.1f} MiB/s ({theirs:.2f} s)")
    print(f"ratio (ours / static):     {theirs / ours:8.2f}")


if __name__ == "__main__":
    main()
