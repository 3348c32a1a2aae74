"""The training cases tests/test_distributed.py compares between one process and two (the second
run by tests/support/ddp_worker.py under torchrun): one definition, so both sides train the same."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import GuidedParams, ModelParams, TrainParams
from pipeline.data.prepared import PreparedData
from pipeline.models.inference import predict
from pipeline.training.loop import train
from pipeline.training.objectives import Objective
from support.helpers import guided

# fp32: the tolerance is that of float sums in another order; bf16 autocast (model.precision auto on a
# CPU with AVX-512 bf16 or AMX) rounds every product and amplifies such differences over the steps.
MODEL = ModelParams(device="cpu", precision="fp32")
# Balanced epochs of 8 images in batches of 4: each process takes 2 images of each. A small
# learning rate: on 32x32 noise, BatchNorm over 4 values per channel (layer4 is 1x1) makes
# training at 0.01 chaotic, so that float rounding alone (one process against two, or one thread
# against two) leads elsewhere within 4 steps; at 1e-4 the weights still move 100x the tolerance.
# Four steps (undersampled epochs of 8 images): the tolerance holds over that few. On these noise
# images the float differences between one and two processes grow with the steps whatever the
# sampling (measured at 12 steps: up to 2-30% on batch-norm biases, undersampled or oversampled).
PARAMS = TrainParams(epochs=2, batch_size=4, lr=1e-4, seed=0, sampling="undersample")
# hard_negatives: the second epoch's defect-free images are chosen by the logits of the first,
# which every process gathers from the others' shares. recalibrate_bn: each process passes its
# share of the last epoch's batches, and the statistics are the whole batches'.
CASES = ("baseline", "consistency", "teacher", "hard_negatives", "recalibrate_bn")


def case(name: str, data: PreparedData) -> tuple[TrainParams, Objective]:
    if name == "baseline":
        return PARAMS, Objective()
    if name == "hard_negatives":
        return PARAMS.model_copy(update={"hard_negatives": 0.5}), Objective()
    if name == "recalibrate_bn":
        return PARAMS.model_copy(update={"recalibrate_bn": True}), Objective()
    priors = torch.from_numpy(np.random.default_rng(1).random(data.images.shape, dtype=np.float32))
    params = GuidedParams(**PARAMS.model_dump(), variant=name)
    return params, guided(params, priors, (priors > 0.8).float())


def train_cases(data: PreparedData) -> dict[str, dict]:
    """Each case trained on fold 0 of ``data``: its weights, config, history and test-fold scores (in a
    process group, each process trains its share and every process gets the same model)."""
    _, test_rows = data.split(0)
    results = {}
    for name in CASES:
        params, objective = case(name, data)
        model, config, history = train(data, 0, MODEL, params, objective)
        priors = objective.inference_priors(test_rows)
        results[name] = {
            "state": model.state_dict(),
            "config": config,
            "history": history,
            "scores": predict(model, config, data.images[test_rows], priors),
        }
    return results
