"""What the guided model costs over the baseline, per variant, measured in one run.

Prints one JSON line per (backbone, variant):

* ``train_step_ratio``: one SGD step of the guided model (forward, classification loss plus
  λ times its auxiliary loss, backward, update) over one step of the baseline, same batch.
  Goal: <= 1.3.
* ``inference_ratio``: latency of the deployed guided model over the deployed baseline's, same
  images. For ``teacher`` it includes what that variant really needs at inference: the
  baseline's saliency map (one forward and one backward of the baseline through
  ``pipeline.knowledge.saliency``), then the guided forward; no goal, the cost is reported. The other
  variants claim no added cost: goal <= 1.05.

The machine may be busy: every round runs each function once, in a shuffled order (inference,
cheap, gets ``--infer-rounds`` rounds of its own). A ratio is the median over rounds of the
ratio within a round, so load that comes and goes hits both sides alike; ``*_ratio_best`` (best
time over best time) is a second view, less robust on a shared machine. Times are medians.
Identical graphs (no_injection and consistency at inference) show the noise floor.

    python benchmarks/guided_cost.py --backbones resnet18 --size 128x352 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import add_machine_args, parse_machine_args, parse_size, time_rounds

from pipeline.knowledge.saliency import METHODS, create_saliency
from pipeline.models.losses import AUXILIARY_LOSSES
from pipeline.models.networks import BACKBONES, Classifier, GuidedClassifier
from pipeline.models.variants import SALIENCY_MAPS, VARIANTS

TRAIN_GOAL, INFERENCE_GOAL = 1.3, 1.05


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    prior: torch.Tensor,
    mask: torch.Tensor,
    prior_dropout: float = 0.5,
) -> Callable[[], None]:
    """One step as ``pipeline.training.loop.train`` takes it (λ = 1: the weight costs nothing)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    guided = isinstance(model, GuidedClassifier)
    model.train()

    def run() -> None:
        if not guided:
            loss = F.binary_cross_entropy_with_logits(model(x), y)
        else:
            model_prior = prior
            if model.variant.drops_prior:
                model_prior = prior * (torch.rand(len(x), 1, 1, 1, device=x.device) >= prior_dropout)
            logits, aux = model(x, model_prior)
            target = prior if model.variant.target == SALIENCY_MAPS else mask
            loss = F.binary_cross_entropy_with_logits(logits, y) + AUXILIARY_LOSSES[model.variant.target](
                aux, target, y
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def inference(deployed: nn.Module, x: torch.Tensor, teacher: nn.Module | None, method: str) -> Callable[[], object]:
    """The deployed model's forward; with a teacher, its saliency map first, as the prior."""
    explain = create_saliency(method, teacher) if teacher is not None else None

    @torch.no_grad()
    def run() -> object:
        if explain is None:
            return deployed(x)
        with torch.enable_grad():
            prior = explain(x).maps.unsqueeze(1)
        return deployed(x, prior)

    return run


def ratios(times: dict[str, list[float]], key: str, reference: str) -> tuple[float, float]:
    """(median of the within-round ratios, best over best)."""
    paired = statistics.median(t / r for t, r in zip(times[key], times[reference]))
    return paired, min(times[key]) / min(times[reference])


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(backbone: str, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    height, width = parse_size(args.size)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 1, height, width, generator=generator).to(args.device)
    y = (torch.arange(args.batch) % 2).float().to(args.device)
    prior = torch.rand(args.batch, 1, height, width, generator=generator).to(args.device)
    mask = (prior > 0.9).float()
    x_infer = x[: args.infer_batch]

    baseline = Classifier(backbone).to(args.device)
    deployed_baseline = Classifier(backbone).to(args.device).eval()
    train_funcs = {"baseline": train_step(baseline, x, y, prior, mask)}
    infer_funcs = {"baseline": inference(deployed_baseline, x_infer, None, args.saliency)}
    deployed = {}
    for variant in args.variants:
        model = GuidedClassifier(backbone, variant=variant).to(args.device)
        train_funcs[variant] = train_step(model, x, y, prior, mask)
        deployed[variant] = GuidedClassifier(backbone, variant=variant).to(args.device).deployable().eval()
        teacher = deployed_baseline if variant == "teacher" else None
        infer_funcs[variant] = inference(deployed[variant], x_infer, teacher, args.saliency)
    train_times = time_rounds(train_funcs, args.repeats, args.device)
    infer_times = time_rounds(infer_funcs, args.infer_rounds, args.device)

    rows = []
    for variant in args.variants:
        train_ratio, train_best = ratios(train_times, variant, "baseline")
        infer_ratio, infer_best = ratios(infer_times, variant, "baseline")
        claims_no_cost = variant != "teacher"
        rows.append(
            {
                "backbone": backbone,
                "size": args.size,
                "variant": variant,
                "device": args.device,
                "threads": torch.get_num_threads(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
                "train_batch": args.batch,
                "infer_batch": args.infer_batch,
                "repeats": args.repeats,
                "infer_rounds": args.infer_rounds,
                "train_ms_baseline": round(1000 * statistics.median(train_times["baseline"]), 2),
                "train_ms_guided": round(1000 * statistics.median(train_times[variant]), 2),
                "train_step_ratio": round(train_ratio, 3),
                "train_step_ratio_best": round(train_best, 3),
                "train_goal_met": train_ratio <= TRAIN_GOAL,
                "infer_ms_baseline": round(1000 * statistics.median(infer_times["baseline"]), 2),
                "infer_ms_guided": round(1000 * statistics.median(infer_times[variant]), 2),
                "inference_includes": f"baseline {args.saliency} saliency + guided forward"
                if not claims_no_cost
                else "guided forward",
                "inference_ratio": round(infer_ratio, 3),
                "inference_ratio_best": round(infer_best, 3),
                "inference_goal_met": infer_ratio <= INFERENCE_GOAL if claims_no_cost else None,
                "inference_parameters": parameters(deployed[variant]),
                "baseline_parameters": parameters(deployed_baseline),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet18"], choices=BACKBONES)
    parser.add_argument("--size", default="128x352", help="width x height")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=16, help="training batch")
    parser.add_argument("--infer-batch", type=int, default=1, help="inference batch (latency: 1)")
    parser.add_argument("--repeats", type=int, default=10, help="training rounds")
    parser.add_argument("--infer-rounds", type=int, default=50, help="inference rounds")
    parser.add_argument("--saliency", default="layercam", choices=list(METHODS), help="the teacher's method")
    add_machine_args(parser)
    args = parse_machine_args(parser)
    for backbone in args.backbones:
        for row in measure(backbone, args):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
