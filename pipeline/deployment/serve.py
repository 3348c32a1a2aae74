"""``kgi serve``: serve a registered version over REST, once its files are shown to be the ones
registered.

    kgi serve models:/synthetic-guided@candidate -p 5001
    kgi serve models:/synthetic-guided@champion -h 127.0.0.1 -p 5001 -w 2

The version's files are downloaded into a temporary folder and each is checked against the
SHA-256 digests recorded when it was registered (its tag ``artifact_sha256``); a file that
differs, is missing or was added stops it with a message naming that file, before anything of the
version runs. Only then is ``mlflow models serve`` started, on that checked copy (not on the
store, which could change in between), with ``--env-manager local``: this Python environment.
The server runs until it is stopped (Ctrl-C, or SIGTERM to this process); the copy is deleted then.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from pipeline.core.errors import InputError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False
    )  # -h is the host, as in mlflow models serve
    parser.add_argument("model", help="registered version: models:/<name>@<alias>, models:/<name>/<version>")
    parser.add_argument("-h", "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)")
    parser.add_argument("-p", "--port", type=int, default=5001, help="port (default 5001)")
    parser.add_argument("-w", "--workers", type=int, default=1, help="server worker processes (default 1)")
    parser.add_argument("--help", action="help", help="show this help and exit")
    return parser.parse_args(argv)


def server_command(model_folder: Path, args: argparse.Namespace) -> list[str]:
    """``mlflow models serve`` of a checked local copy, in this Python's environment."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        str(model_folder),
        "--env-manager",
        "local",
        "-h",
        args.host,
        "-p",
        str(args.port),
        "-w",
        str(args.workers),
    ]


def run_server(command: list[str]) -> int:
    """Run the server in the foreground until it ends or this process is told to stop; its exit status."""
    server = subprocess.Popen(command)

    def stop(signum: int, frame: FrameType | None) -> None:
        server.terminate()  # the finally of main then deletes the checked copy

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches the server too (same process group): let it finish
        return server.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.core.tracking import FAST_CHECK, environment_defaults, tracking_uri, verified_download
    from pipeline.deployment.predict import registered_version, registry_client

    args = parse_args(argv)
    if not args.model.startswith("models:/"):
        raise InputError(
            f"{args.model!r}: kgi serve serves a registered version, models:/<name>@<alias> or "
            "models:/<name>/<version> (the release stage registers <dataset>-<model>@candidate)"
        )
    store = tracking_uri()
    with environment_defaults(FAST_CHECK):
        version = registered_version(registry_client(store), args.model, store)
    source = f"models:/{version.name}/{version.version}"
    with tempfile.TemporaryDirectory(prefix="kgi-serve-") as folder:
        local = verified_download(version, Path(folder))
        print(
            f"{args.model} is {source}: its files match the digests recorded at registration; "
            f"serving it on http://{args.host}:{args.port} (POST /invocations; Ctrl-C stops it)",
            file=sys.stderr,
            flush=True,
        )
        return run_server(server_command(local, args))
