"""Images per second of predict, guided against baseline, measured in one run.

Prints one JSON line per (device, variant, stage) on the CPU, and on the GPU too where
``torch.cuda.is_available()``:

* ``score``: the model's forward on a batch (``pipeline.models.inference.predict``); for the teacher
  variant with the baseline's saliency map first, which it reads as its prior.
* ``predict``: what ``pipeline.deployment.predict`` computes per batch: resizing, the score and the model's
  own saliency map for the overlay (no file input and output).
* ``files``: ``pipeline.deployment.predict.predict_files`` on PNG files: reading, the above, the overlay
  PNGs and the CSV. CPU only (disk and PNG coding, not the device, dominate).

Models are trained for one epoch on the embedded synthetic data (speed does not depend on how
well they are trained), or read from a project's ``data/`` folder (``--data data``: baseline and
guided ``fold0.pt``). Every round runs the baseline and each guided model once, in a shuffled
order; ``time_ratio`` is the median over rounds of guided time over baseline time within a
round, so load that comes and goes hits both alike. Images per second are from median times.

    python benchmarks/predict.py --size 128x128 --images 64 --rounds 7 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import add_machine_args, parse_machine_args, parse_size, time_rounds

from pipeline.config import GuidedParams, ModelParams, TrainParams
from pipeline.core.artifacts import write_image
from pipeline.data.prepared import PreparedData
from pipeline.data.synthetic import generate
from pipeline.deployment.predict import LoadedModel, Predictor, load_file, predict_files
from pipeline.knowledge.pseudo_labels import pseudo_mask
from pipeline.knowledge.saliency import create_saliency, saliency_maps
from pipeline.models.files import needs_prior
from pipeline.models.inference import predict
from pipeline.models.variants import VARIANTS
from pipeline.training.loop import train
from pipeline.training.objectives import GuidedObjective, guidance_for


def synthetic_models(height: int, width: int, variants: list[str]) -> tuple[dict[str, LoadedModel], torch.Tensor]:
    """Baseline and guided models trained one epoch on 64 synthetic images; the test images."""
    images = list(generate(16, 4, width, height, 0.25, 1.0, seed=0))
    index = pd.DataFrame(
        {
            "id": [i.id for i in images],
            "label": [i.label for i in images],
            "group": [i.group for i in images],
            "has_mask": False,
            "fold": [0 if k % 4 == 0 else -1 for k in range(len(images))],
        }
    )  # -1: training only
    data = PreparedData(Path("."), index, torch.from_numpy(np.stack([i.image for i in images])))
    model_params = ModelParams(backbone="resnet18", device="cpu")
    baseline, config, _ = train(data, 0, model_params, TrainParams(epochs=1, batch_size=16))
    priors = saliency_maps(create_saliency("layercam", baseline), config, data.images)[0]
    masks = np.stack([pseudo_mask(p, label) for p, label in zip(priors, index["label"])])
    models = {"baseline": LoadedModel(baseline.eval(), config, "synthetic")}
    for variant in variants:
        params = GuidedParams(epochs=1, batch_size=16, variant=variant)
        guidance = guidance_for(VARIANTS[variant], torch.from_numpy(priors), torch.from_numpy(masks).float())
        guided, guided_config, _ = train(data, 0, model_params, params, GuidedObjective(guidance, params))
        models[variant] = LoadedModel(guided.deployable().eval(), guided_config, "synthetic")
    return models, data.images


def project_models(data: Path) -> tuple[dict[str, LoadedModel], torch.Tensor]:
    """The fold-0 models of a project's data folder and its prepared images."""
    models = {"baseline": load_file(data / "baseline" / "fold0.pt")}
    guided = load_file(data / "guided" / "fold0.pt")
    models[guided.config.get("variant", "teacher")] = guided
    return models, PreparedData.load(data / "prepared").images


def stage_functions(
    models: dict[str, LoadedModel], images: torch.Tensor, device: str, stage: str, folder: Path
) -> dict[str, Callable[[], object]]:
    teacher = models["baseline"]
    funcs = {}
    for name, loaded in models.items():
        loaded = LoadedModel(loaded.model.to(device), loaded.config, loaded.source)
        predictor = Predictor(loaded, 0.5, teacher=teacher if needs_prior(loaded.config) else None)
        batch = images.to(device) if stage == "score" else images
        if stage == "score":

            def run(predictor: Predictor = predictor, batch: torch.Tensor = batch) -> object:
                priors = None
                if predictor.teacher is not None:
                    priors = torch.from_numpy(
                        saliency_maps(predictor.teacher, predictor.teacher_config, batch, len(batch))[0]
                    )
                return predict(predictor.loaded.model, predictor.config, batch, priors, len(batch))
        elif stage == "predict":
            arrays = list(images.numpy())

            def run(predictor: Predictor = predictor, arrays: list = arrays) -> object:
                return predictor(arrays)
        else:
            files = sorted(folder.glob("*.png"))

            def run(predictor: Predictor = predictor, files: list = files, name: str = name) -> object:
                return predict_files(predictor, files, folder.parent / f"out-{name}", len(files), progress=False)

        funcs[name] = run
    return funcs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="128x128", help="width x height of the synthetic images")
    parser.add_argument("--images", type=int, default=64, help="images per round (one batch)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["consistency", "teacher"],
        choices=["consistency", "no_injection", "none", "teacher"],
    )
    stages = ["score", "predict", "files"]
    parser.add_argument("--stages", nargs="+", default=stages, choices=stages)
    parser.add_argument("--data", type=Path, help="a project's data/ folder instead of synthetic models")
    add_machine_args(parser, device=False)
    args = parse_machine_args(parser)
    height, width = parse_size(args.size)
    models, images = project_models(args.data) if args.data else synthetic_models(height, width, args.variants)
    images = images[torch.arange(args.images) % len(images)]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "images"
        for k, image in enumerate(images.numpy()):
            write_image(folder / f"{k:04d}.png", image)
        for device in devices:
            for stage in args.stages:
                if stage == "files" and device != "cpu":
                    continue
                times = time_rounds(stage_functions(models, images, device, stage, folder), args.rounds, device)
                for variant in (name for name in models if name != "baseline"):
                    config = models[variant].config
                    print(
                        json.dumps(
                            {
                                "stage": stage,
                                "device": device,
                                "variant": variant,
                                "backbone": config["backbone"],
                                "size": f"{config['width']}x{config['height']}",
                                "images": args.images,
                                "rounds": args.rounds,
                                "threads": torch.get_num_threads(),
                                "load_avg_1min": round(os.getloadavg()[0], 2),
                                "images_per_s_baseline": round(args.images / statistics.median(times["baseline"]), 1),
                                "images_per_s_guided": round(args.images / statistics.median(times[variant]), 1),
                                "time_ratio": round(
                                    statistics.median(g / b for g, b in zip(times[variant], times["baseline"])), 3
                                ),
                                "guided_includes": "baseline saliency prior"
                                if needs_prior(config)
                                else "nothing extra",
                            }
                        ),
                        flush=True,
                    )
            for loaded in models.values():
                loaded.model.to("cpu")


if __name__ == "__main__":
    main()
