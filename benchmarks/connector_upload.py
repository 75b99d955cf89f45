r"""Folder connector throughput against the system's own copy tools, side by side (median of 5 runs each).

    python benchmarks/connector_upload.py [--size-mib 512] [--share \\HOST\SHARE\folder --user U]

Local: the folder connector's delivery ÷ ``cp`` of the same file into the same folder. With ``--share``
(password from the LAYERDESK_BENCH_PASSWORD environment variable): the connector's SMB delivery ÷
``smbclient put`` (Debian's smbclient) of the same file to the same share. Prints MiB/s and the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.connectors.base import ConnectorSettings, ImageSidecar
from app.connectors.folder import FolderConnector

RUNS = 5


class _Never:
    cancelled = False


def _sidecar(image: Path, run: int) -> ImageSidecar:
    return ImageSidecar(image.stem, f"Bench{run}", 1, "raw", image.stat().st_size, None, (),
                        datetime(2025, 1, 1, 0, 0, run, tzinfo=UTC), "bench")


def _median(action: object) -> float:
    times = []
    for run in range(RUNS):
        started = time.perf_counter()
        action(run)  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--share")
    parser.add_argument("--user", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        image = Path(work) / "image.raw"
        with image.open("wb") as file:  # real bytes: a sparse file would flatter both sides
            for _ in range(args.size_mib):
                file.write(os.urandom(1024 * 1024))
        out = Path(work) / "out"
        out.mkdir()

        def by_cp(run: int) -> None:
            subprocess.run(["cp", str(image), str(out / f"cp{run}.raw")], check=True)
            os.sync()

        def by_connector(run: int) -> None:
            FolderConnector().deliver(image, _sidecar(image, run), ConnectorSettings("bench", "folder", str(out)),
                                      None, lambda *_: None, _Never())
            os.sync()

        cp_s, ours_s = _median(by_cp), _median(by_connector)
        mib = args.size_mib
        print(f"local folder, {mib} MiB: cp {mib / cp_s:.0f} MiB/s, connector {mib / ours_s:.0f} MiB/s, "
              f"ratio connector/cp {cp_s / ours_s:.2f}")
        if args.share:
            password = os.environ.get("LAYERDESK_BENCH_PASSWORD", "")
            unc = args.share.replace("\\", "/")
            host_share = "/".join(unc.strip("/").split("/")[:2])
            folder = "\\".join(unc.strip("/").split("/")[2:])
            env = {**os.environ, "PASSWD": password}

            def by_smbclient(run: int) -> None:
                target = f"{folder}\\put{run}.raw" if folder else f"put{run}.raw"
                subprocess.run([shutil.which("smbclient") or "smbclient", f"//{host_share}", "-U", args.user,
                                "-c", f'put "{image}" "{target}"'], check=True, env=env, capture_output=True)

            def by_share(run: int) -> None:
                FolderConnector().deliver(image, _sidecar(image, run + 10),
                                          ConnectorSettings("bench", "folder", args.share, args.user), password,
                                          lambda *_: None, _Never())

            put_s, share_s = _median(by_smbclient), _median(by_share)
            print(f"SMB share, {mib} MiB: smbclient put {mib / put_s:.0f} MiB/s, connector {mib / share_s:.0f} "
                  f"MiB/s, ratio connector/smbclient {put_s / share_s:.2f}")


if __name__ == "__main__":
    main()
