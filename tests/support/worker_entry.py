"""A worker entry point for tests: the real protocol (app.tasks.worker.main) with test functions."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from app.errors import UserError
from app.tasks.worker import WorkerReport, main


def count(args: dict[str, Any], report: WorkerReport) -> dict[str, Any]:
    for i in range(int(args["to"])):
        report.progress(100 * (i + 1) / int(args["to"]), f"item {i + 1}")
        report.log(f"did item {i + 1}")
    print("a library printing to stdout")
    return {"summary": f"counted to {args['to']}", "secret_seen": args.get("secret") == "s3cr3t"}


def forever(args: dict[str, Any], report: WorkerReport) -> dict[str, Any]:
    report.log(f"pid {os.getpid()}")
    while True:
        time.sleep(0.05)


def refuse(args: dict[str, Any], report: WorkerReport) -> dict[str, Any]:
    raise UserError("That layer disk is not NTFS.")


def bug(args: dict[str, Any], report: WorkerReport) -> dict[str, Any]:
    return {"value": 1 / 0}


def die(args: dict[str, Any], report: WorkerReport) -> dict[str, Any]:
    sys.stderr.write("out of memory\n")
    sys.stderr.flush()
    os._exit(137)


def commit_then_linger(args: dict[str, Any], report: WorkerReport) -> dict[str, Any]:
    """Like an import past its commit point: a SIGTERM no longer stops it, the result still comes."""
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    report.log("committed")
    terminated.wait(10)
    return {"summary": "kept", "terminated": terminated.is_set()}


def chatty(args: dict[str, Any], report: WorkerReport) -> dict[str, Any]:
    """Logs as LayerDesk's modules do, and as a library does."""
    logging.getLogger("app.engine.example").info("layer disk cache hit: %s", "2-2-abc.ntfs")
    logging.getLogger("app.engine.example").warning("wimlib: %s", "a warning")
    logging.getLogger("app.engine.example").debug("too detailed for the task log")
    logging.getLogger("somelibrary").warning("not LayerDesk's")
    return {"summary": "logged"}


FUNCTIONS = {"chatty": chatty, "commit_then_linger": commit_then_linger, "count": count, "forever": forever,
             "refuse": refuse, "bug": bug, "die": die}

if __name__ == "__main__":
    sys.exit(main(resolver=lambda name: FUNCTIONS[name]))
