"""One training process of tests/test_distributed.py, run by torchrun: trains the test's tiny
data set in every case the test compares and saves rank 0's results to the folder given."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.core import distributed
from pipeline.models import losses
from pipeline.training.loop import TrainingDiverged, train

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: support.* as the tests import it
from support.distributed_cases import MODEL, case, train_cases
from support.helpers import noise_data


def main(out: Path) -> None:
    torch.set_num_threads(1)
    data = noise_data()
    with distributed.process_group(torch.device("cpu")) as ranks:
        results: dict[str, Any] = train_cases(data)
        # Per-sample values of a global batch of 5 (one padded sample): each process holds its share.
        mine, real = distributed.shard(5, ranks), distributed.real_samples(5, ranks)
        results["whole_batch"] = distributed.whole_batch(torch.tensor(mine, dtype=torch.float32) * real, 5, ranks)
        # A global batch of 3 samples all on rank 0: rank 1 joins the statistics with none.
        norm = distributed.SyncedBatchNorm(2, momentum=None)
        batch = torch.arange(24.0).view(3, 2, 2, 2)
        output = norm(batch if ranks.main else batch[:0])
        results["empty_share"] = {"running_mean": norm.running_mean, "running_var": norm.running_var, "output": output}
        # Resuming: the first epoch's checkpoint, then a second run that resumes and trains epoch 2.
        params, _ = case("baseline", data)
        checkpoint = out / "fold0.pt"
        train(data, 0, MODEL, params.model_copy(update={"epochs": 1}), checkpoint=checkpoint, fingerprint="f")
        torch.distributed.barrier()  # rank 0 writes the checkpoint after the last step the others take part in
        model, _, history = train(data, 0, MODEL, params, checkpoint=checkpoint, fingerprint="f")
        results["resumed"] = {"state": model.state_dict(), "history": history}
        # A non-finite loss in one process only stops every process, at the same batch.
        if ranks.rank == 1:
            # A fault injected into this process alone, as a test double of the loss.
            losses.BatchShare.mean = lambda self, *args, **kwargs: torch.tensor(float("nan"))  # type: ignore[method-assign]
        try:
            train(data, 0, MODEL, params)
        except TrainingDiverged as error:
            (out / f"diverged_rank{ranks.rank}.txt").write_text(str(error))
        if ranks.main:
            torch.save(results, out / "results.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
