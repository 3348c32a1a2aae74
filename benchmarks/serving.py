"""Requests per second and latency of the REST scoring endpoint (``mlflow models serve``) on the CPU.

A baseline trained one epoch on the embedded synthetic data (speed does not depend on how well it
is trained), or a model file (``--model``), is logged with ``pipeline.deployment.serving.log_scoring_model``
into a temporary MLflow store, served on 127.0.0.1 with one worker, and sent PNG files over HTTP
from this process, one request at a time. Contenders, interleaved in rounds
(``benchmarks/timing.py``): ``single`` (one image per request), ``batch16`` (16 images per
request) and ``single_heatmap`` (one image, with its Grad-CAM overlay PNG). Prints one JSON line
per contender: median and 90th-percentile latency, requests and images per second at that median.

    OMP_NUM_THREADS=1 python benchmarks/serving.py --size 128x128 --rounds 30
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from predict import parse_size, synthetic_models
from timing import time_rounds

from pipeline.deployment.serving import log_scoring_model, request_body, served
from pipeline.models.files import save_model

BATCH = 16


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def poster(url: str, body: bytes, expected: int) -> Callable[[], None]:
    """One POST of ``body``; fails loudly unless all ``expected`` images were scored."""

    def post() -> None:
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            predictions = json.loads(answer.read())["predictions"]
        if len(predictions) != expected or any(p["error"] for p in predictions):
            raise RuntimeError(f"the server answered {predictions[:2]}...")

    return post


def model_file(args: argparse.Namespace, folder: Path) -> tuple[Path, np.ndarray]:
    """The model file to serve and PNG-encodable test images (uint8 (N, H, W))."""
    height, width = parse_size(args.size)
    models, images = synthetic_models(height, width, [])
    if args.model:
        return args.model, images.numpy()
    path = folder / "baseline.pt"
    save_model(path, models["baseline"].model, models["baseline"].config)
    return path, images.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="128x128", help="width x height of the synthetic images and model")
    parser.add_argument("--model", type=Path, help="a model file to serve instead (data/guided/fold0.pt)")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        path, images = model_file(args, folder)
        version = log_scoring_model(path, 0.5, "benchmark", "benchmark-serving", aliases=["champion"])
        files = [cv2.imencode(".png", image)[1].tobytes() for image in images[:BATCH]]
        with served("models:/benchmark-serving@champion", free_port()) as url:
            funcs = {
                "single": poster(url, request_body(files[:1]), 1),
                "batch16": poster(url, request_body(files), BATCH),
                "single_heatmap": poster(url, request_body(files[:1], heatmap=True), 1),
            }
            times = time_rounds(funcs, args.rounds, "cpu")
    for name, seconds in times.items():
        per_request = 1 if name.startswith("single") else BATCH
        median = statistics.median(seconds)
        print(
            json.dumps(
                {
                    "contender": name,
                    "images_per_request": per_request,
                    "size": f"{images.shape[2]}x{images.shape[1]}",
                    "rounds": args.rounds,
                    "server_workers": 1,
                    "torch_threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "load_avg_1min": round(os.getloadavg()[0], 2),
                    "latency_ms_median": round(1000 * median, 1),
                    "latency_ms_p90": round(1000 * float(np.percentile(seconds, 90)), 1),
                    "requests_per_s": round(1 / median, 2),
                    "images_per_s": round(per_request / median, 1),
                    "threshold": float(version.tags["threshold"]),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
