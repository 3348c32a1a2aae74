"""Benchmark the saliency methods against the cost of the gradients they need.

Prints one JSON line per (method and layers, backbone, image size) with images per second and the
ratio of the method's time to two floors measured in the same run, on the same batch:

* floor a: one forward plus one backward to the input, parameters frozen;
* floor b: one forward plus the backward down to the method's earliest target layer only
  (the graph starts at that layer's output); for FullGrad, whose earliest target is the input,
  floor b is floor a.

LayerCAM is measured twice: on its default three layers and on one (the deepest, Grad-CAM's).
Goals: Grad-CAM and LayerCAM within 1.1x floor b; FullGrad within 1.5x floor a. Where the
optional ``grad-cam`` package (pytorch-grad-cam) is importable, its time for the same method and
layers is measured in the same rounds, with the goal of at least 2x its speed for Grad-CAM and
LayerCAM and 5x for FullGrad. It is a development extra, never a dependency of the project;
install the pinned version without its dependencies (ours already cover them: torch,
torchvision, opencv-contrib-python-headless for cv2, matplotlib, scikit-learn, scipy, tqdm):

    pip install --no-deps -r requirements-bench.txt

Times are the best of ``--repeats`` rounds; each round runs every function once in a shuffled
order, so background load hits methods and floors alike. On a CPU shared with other work,
``--threads 1 --clock cpu`` times each call by the CPU time of this process instead of the wall
clock: a single-threaded call's CPU time barely depends on what else the machine runs, whereas
wall time under a load above the core count is mostly waiting. Images per second are then per
CPU second. Peak memory is measured in a fresh subprocess per function (CUDA:
max_memory_allocated; CPU: peak RSS growth over one call after a batch-of-one warm-up, read from
/proc/self/status VmHWM after resetting it, so approximate).

    python benchmarks/saliency.py --backbones resnet18 --sizes 128x352 --repeats 2   # quick
    # benchmarks/results/saliency_cpu.jsonl: these four, concatenated (about 50 min on 2 busy cores)
    python benchmarks/saliency.py --threads 1 --clock cpu --backbones resnet18 --sizes 128x352 --repeats 7
    python benchmarks/saliency.py --threads 1 --clock cpu --backbones resnet18 --sizes 224x640 --repeats 5
    python benchmarks/saliency.py --threads 1 --clock cpu --backbones vgg16 --sizes 128x352 --repeats 4
    python benchmarks/saliency.py --threads 1 --clock cpu --backbones vgg16 --sizes 224x640 --repeats 2

Every row also records the machine (CPU count, torch threads and version, load average when the
run started), so a saved file such as ``benchmarks/results/saliency_cpu.jsonl`` says where its
numbers come from.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import add_machine_args, cpu_name, parse_machine_args, parse_size, time_rounds

from pipeline.knowledge.saliency import METHODS, create_saliency, defect_score
from pipeline.models.networks import BACKBONES, Classifier

GOALS = {"gradcam": ("floor_b", 1.1), "layercam": ("floor_b", 1.1), "fullgrad": ("floor_a", 1.5)}
PEER_GOALS = {"gradcam": 2.0, "layercam": 2.0, "fullgrad": 5.0}  # minimum speed-up over grad-cam


def variants(backbone: str, methods: list[str]) -> dict[str, tuple[str, list[str]]]:
    """What to measure, by key: method and target layers. LayerCAM also on its deepest layer alone."""
    out = {method: (method, BACKBONES[backbone].saliency_layers[method]) for method in methods}
    if "layercam" in methods:
        out["layercam_1layer"] = ("layercam", BACKBONES[backbone].saliency_layers["layercam"][-1:])
    return out


def earliest_layer(model: nn.Module, x: torch.Tensor, names: list[str]) -> str:
    """The target layer that runs first in the forward pass."""
    order: list[str] = []
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda *_, n=n: order.append(n)) for n in names]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return order[0]


def floor_a(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        leaf = x.detach().requires_grad_(True)
        return torch.autograd.grad(defect_score(model(leaf)).sum(), leaf)

    return run


def floor_b(model: nn.Module, x: torch.Tensor, layer: str) -> Callable[[], object]:
    module = dict(model.named_modules())[layer]

    def run() -> object:
        leaves: list[torch.Tensor] = []

        def cut(_m: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
            leaves.append(output.detach().requires_grad_(True))
            return leaves[-1]

        handle = module.register_forward_hook(cut)
        try:
            score = defect_score(model(x))
        finally:
            handle.remove()
        return torch.autograd.grad(score.sum(), leaves)

    return run


def grad_cam_package(model: nn.Module, x: torch.Tensor, method: str, layers: list[str]) -> Callable | None:
    """The same method in pytorch-grad-cam, or None where that package is not installed."""
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None
    import cv2  # its resizing is part of the package's cost: give it the threads torch has

    cv2.setNumThreads(torch.get_num_threads())
    cls = {"gradcam": pgc.GradCAM, "layercam": pgc.LayerCAM, "fullgrad": pgc.FullGrad}[method]
    wrapped = nn.Sequential(model, nn.Unflatten(0, (-1, 1)))  # (B,) -> (B, 1) class scores
    modules = dict(model.named_modules())
    targets = [modules[n] for n in layers]
    params = list(model.parameters())

    def run() -> object:
        for p in params:  # its hooks only see activations that require grad
            p.requires_grad_(True)
        try:
            with cls(model=wrapped, target_layers=targets) as cam:
                return cam(input_tensor=x, targets=[ClassifierOutputTarget(0)] * x.shape[0])
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None

    return run


def build(backbone: str, size: tuple[int, int], batch: int, device: str):
    torch.manual_seed(0)
    model = Classifier(backbone, in_channels=1).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(batch, 1, *size, device=device)
    return model, x


def functions(model: nn.Module, x: torch.Tensor, backbone: str, methods: list[str]) -> dict[str, Callable]:
    """Every function to time, by key: 'floor_a', 'floor_b:<layer>', '<variant>', 'pgc:<variant>'."""
    funcs: dict[str, Callable] = {"floor_a": floor_a(model, x)}
    for key, (method, layers) in variants(backbone, methods).items():
        saliency = create_saliency(method, model, layers or None)
        funcs[key] = lambda s=saliency: s(x)
        if layers:
            first = earliest_layer(model, x, layers)
            funcs.setdefault(f"floor_b:{first}", floor_b(model, x, first))
        package = grad_cam_package(model, x, method, layers)
        if package is not None:
            funcs[f"pgc:{key}"] = package
    return funcs


def peer_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("grad-cam")
    except Exception:  # not installed, or importable without metadata
        return None


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def probe_memory(backbone: str, size: str, batch: int, device: str, key: str) -> float:
    """Peak extra memory (MiB) of one call of one function; runs in a fresh process."""
    model, x = build(backbone, parse_size(size), batch, device)
    funcs = functions(model, x, backbone, list(METHODS))
    small = functions(model, x[:1], backbone, list(METHODS))
    small[key]()  # warm-up at batch 1 so one-time allocations are not counted
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        funcs[key]()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM) to the current RSS
    funcs[key]()
    return (_status_kb("VmHWM") - before) / 1024


def measure_memory(args: argparse.Namespace, backbone: str, size: str, device: str, key: str) -> float | None:
    command = [sys.executable, __file__, "--probe", backbone, size, str(args.batch), device, key]
    command += ["--threads", str(torch.get_num_threads())]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    try:
        return round(json.loads(done.stdout.strip().splitlines()[-1])["peak_mem_mb"], 1)
    except (IndexError, ValueError, KeyError):
        print(f"memory probe for {key} failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "vgg16"], choices=sorted(BACKBONES))
    parser.add_argument("--sizes", nargs="+", default=["128x352", "224x640"], help="width x height")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    add_machine_args(parser)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time (use with --threads 1 on a busy CPU machine)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--probe", nargs=5, metavar=("BACKBONE", "SIZE", "BATCH", "DEVICE", "KEY"), help=argparse.SUPPRESS
    )
    args = parse_machine_args(parser)
    if args.clock == "cpu" and not args.device.startswith("cpu"):
        parser.error("--clock cpu times CPU work only; use the wall clock on an accelerator")
    if args.probe:
        backbone, size, batch, device, key = args.probe
        print(json.dumps({"peak_mem_mb": probe_memory(backbone, size, int(batch), device, key)}))
        return

    machine = {
        "cpu_count": os.cpu_count(),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "grad_cam": peer_version(),
        "load_avg_at_start": [round(v, 2) for v in os.getloadavg()],
        "repeats": args.repeats,
        "clock": args.clock,
    }
    for backbone in args.backbones:
        for size in args.sizes:
            model, x = build(backbone, parse_size(size), args.batch, args.device)
            funcs = functions(model, x, backbone, args.methods)
            best = {key: min(times) for key, times in time_rounds(funcs, args.repeats, args.device, args.clock).items()}
            memory = {}
            if not args.no_memory:
                memory = {key: measure_memory(args, backbone, size, args.device, key) for key in funcs}
            for key, (method, layers) in variants(backbone, args.methods).items():
                b_key = f"floor_b:{earliest_layer(model, x, layers)}" if layers else "floor_a"
                floors = {"floor_a": best["floor_a"], "floor_b": best[b_key]}
                goal_floor, goal = GOALS[method]
                ratio = {name: best[key] / t for name, t in floors.items()}
                pgc = best.get(f"pgc:{key}")
                speedup = None if pgc is None else pgc / best[key]
                row = {
                    "method": method,
                    "layers": layers or "all bias layers and the input",
                    "backbone": backbone,
                    "size": size,
                    "batch": args.batch,
                    "device": args.device,
                    "threads": torch.get_num_threads(),
                    **machine,
                    "load_avg_1min": round(os.getloadavg()[0], 2),
                    "images_per_s": round(args.batch / best[key], 2),
                    "floor_a_images_per_s": round(args.batch / floors["floor_a"], 2),
                    "floor_b_images_per_s": round(args.batch / floors["floor_b"], 2),
                    "floor_b_layer": b_key.partition(":")[2] or "input",
                    "time_ratio_to_floor_a": round(ratio["floor_a"], 3),
                    "time_ratio_to_floor_b": round(ratio["floor_b"], 3),
                    "goal": f"<= {goal}x {goal_floor}",
                    "goal_met": ratio[goal_floor] <= goal,
                    "time_ratio_to_grad_cam_package": None if pgc is None else round(best[key] / pgc, 3),
                    "speedup_over_grad_cam_package": None if speedup is None else round(speedup, 2),
                    "peer_goal": f">= {PEER_GOALS[method]}x grad-cam's speed",
                    "peer_goal_met": None if speedup is None else speedup >= PEER_GOALS[method],
                    "grad_cam_package_images_per_s": None if pgc is None else round(args.batch / pgc, 2),
                    "peak_mem_mb": memory.get(key),
                    "grad_cam_package_peak_mem_mb": memory.get(f"pgc:{key}"),
                    "floor_a_peak_mem_mb": memory.get("floor_a"),
                    "floor_b_peak_mem_mb": memory.get(b_key),
                }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
