"""Latency, throughput and memory of the REST scoring endpoint (``mlflow models serve``) on the CPU,
with one and with two workers.

A baseline trained one epoch on the embedded synthetic data (speed does not depend on how well it
is trained), or a model file (``--model``), is logged with ``pipeline.deployment.serving.log_scoring_model``
into a temporary MLflow store (default serving limits) and served twice on 127.0.0.1, by one
worker and by two, both at once; PNG files are sent over HTTP from this process. Contenders,
interleaved in rounds (``benchmarks/timing.py``), so that the machine's load falls on all alike:

- ``w<N>_single``, ``w<N>_batch16``: one request at a time of one image / 16 images (latency);
- ``w1_single_heatmap``: one image with its Grad-CAM overlay PNG;
- ``w1_49mp``: one 7000 x 7000 PNG (49 megapixels, just under ``serving.max_image_pixels``);
- ``w<N>_batch16_2clients``: two requests of 16 images sent at once (throughput: what a second
  worker adds, on a machine with a core free for it).

Prints one JSON line per contender (median and 90th-percentile seconds of a round, requests and
images per second at that median), one with the ratios measured in this run, and one per server
with its workers' peak resident memory (the kernel's VmHWM) after every round.

    OMP_NUM_THREADS=1 python benchmarks/serving.py --size 128x128 --rounds 15
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
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import cv2
import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from predict import parse_size, synthetic_models
from timing import cpu_name, time_rounds

from pipeline.deployment.serving import log_scoring_model, request_body, served
from pipeline.models.files import save_model

BATCH = 16
LARGE_SIDE = 7000
WORKERS = (1, 2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def poster(url: str, body: bytes, expected: int, clients: int = 1) -> Callable[[], None]:
    """``clients`` POSTs of ``body`` at once; fails loudly unless every image of each was scored."""

    def post_one() -> None:
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as answer:
            predictions = json.loads(answer.read())["predictions"]
        if len(predictions) != expected or any(p["error"] for p in predictions):
            raise RuntimeError(f"the server answered {predictions[:2]}...")

    def post() -> None:
        if clients == 1:
            post_one()
            return
        with ThreadPoolExecutor(clients) as pool:
            for future in [pool.submit(post_one) for _ in range(clients)]:
                future.result()

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


def peak_mib(pids: set[int]) -> int:
    """The largest VmHWM (peak resident memory) among ``pids``, in MiB."""
    peaks = [0]
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) // 1024)
    return max(peaks)


def contenders(urls: dict[int, str], files: list[bytes], large: bytes) -> dict[str, tuple[Callable[[], None], int]]:
    """name -> (one round's call, images it scores)."""
    funcs: dict[str, tuple[Callable[[], None], int]] = {}
    for workers, url in urls.items():
        funcs[f"w{workers}_single"] = (poster(url, request_body(files[:1]), 1), 1)
        funcs[f"w{workers}_batch16"] = (poster(url, request_body(files), BATCH), BATCH)
        funcs[f"w{workers}_batch16_2clients"] = (poster(url, request_body(files), BATCH, clients=2), 2 * BATCH)
    funcs["w1_single_heatmap"] = (poster(urls[1], request_body(files[:1], heatmap=True), 1), 1)
    funcs["w1_49mp"] = (poster(urls[1], request_body([large]), 1), 1)
    return funcs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="128x128", help="width x height of the synthetic images and model")
    parser.add_argument("--model", type=Path, help="a model file to serve instead (data/guided/fold0.pt)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as servers:
        folder = Path(scratch)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        os.environ["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = "300"
        path, images = model_file(args, folder)
        log_scoring_model(path, 0.5, "benchmark", "benchmark-serving", aliases=["champion"])
        files = [cv2.imencode(".png", image)[1].tobytes() for image in images[:BATCH]]
        large = cv2.imencode(".png", np.zeros((LARGE_SIDE, LARGE_SIDE), np.uint8))[1].tobytes()
        urls, pids, seen = {}, {}, {p.pid for p in psutil.Process().children(recursive=True)}
        for workers in WORKERS:  # one after the other, so that each server's processes are known
            urls[workers] = servers.enter_context(served("models:/benchmark-serving@champion", free_port(), workers))
            pids[workers] = {p.pid for p in psutil.Process().children(recursive=True)} - seen
            seen |= pids[workers]
        funcs = contenders(urls, files, large)
        times = time_rounds({name: call for name, (call, _) in funcs.items()}, args.rounds, "cpu")
        memory = {workers: peak_mib(pids[workers]) for workers in WORKERS}
    report(args, images, {name: (times[name], count) for name, (_, count) in funcs.items()}, memory)


def report(args: argparse.Namespace, images: np.ndarray, results: dict, memory: dict[int, int]) -> None:
    common = {
        "size": f"{images.shape[2]}x{images.shape[1]}",
        "rounds": args.rounds,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    per_second = {}
    for name, (seconds, count) in results.items():
        median = statistics.median(seconds)
        per_second[name] = count / median
        requests = 2 if name.endswith("2clients") else 1
        row = {"contender": name, "server_workers": int(name[1]), "images_per_round": count, **common}
        row |= {
            "round_s_median": round(median, 3),
            "round_s_p90": round(float(np.percentile(seconds, 90)), 3),
            "requests_per_s": round(requests / median, 2),
            "images_per_s": round(count / median, 1),
        }
        print(json.dumps(row), flush=True)
    ratios = {
        "two_workers_vs_one_throughput": per_second["w2_batch16_2clients"] / per_second["w1_batch16_2clients"],
        "batch16_vs_single_images_per_s": per_second["w1_batch16"] / per_second["w1_single"],
        "heatmap_vs_plain_latency": per_second["w1_single"] / per_second["w1_single_heatmap"],
        "49mp_vs_128px_latency": per_second["w1_single"] / per_second["w1_49mp"],
    }
    print(json.dumps({"ratios": {k: round(v, 2) for k, v in ratios.items()}, **common}), flush=True)
    for workers, peak in memory.items():
        print(json.dumps({"server_workers": workers, "worker_peak_rss_mib": peak, **common}), flush=True)


if __name__ == "__main__":
    main()
