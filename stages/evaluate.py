"""Stage evaluate: baseline against guided on every test image, in numbers and pictures.

Classification per fold and over folds, localization against the true masks wherever they exist,
inference time per image of each model (the guided model's without its teacher prior, whose cost
is reported beside it). The logic lives in ``pipeline.evaluation.fold`` (running the models) and
``pipeline.evaluation.results`` (the tables); this script reads the params and writes the files.
Outputs: data/evaluation/{scores.csv, per_fold.csv, localization.csv, localization_per_fold.csv,
results.md, report.html, pr_curves.png, overlays.png, errors_<model>_{misses,false_alarms}.png,
training_{baseline,guided}.png, summary.json, timing.json, run.json};
data/metrics/evaluate.json; data/plots/pr_{baseline,guided}.csv.
"""

from __future__ import annotations

from pipeline.config import load_section
from pipeline.core import layout
from pipeline.core.artifacts import output_dir, read_json, write_csv, write_json
from pipeline.core.devices import pick_device, resolve_precision
from pipeline.core.runner import run_stage
from pipeline.core.tracking import stage_run
from pipeline.data.prepared import PreparedData
from pipeline.evaluation.fold import evaluate_folds, evaluation_metrics, timing_note, write_pictures
from pipeline.evaluation.report import ReportInputs, write_report
from pipeline.evaluation.results import check_test_folds, results_markdown

PREPARED, BASELINE, GUIDED = layout.PREPARED, layout.BASELINE, layout.GUIDED
SALIENCY, PSEUDO_MASKS, OUT = layout.SALIENCY, layout.PSEUDO_MASKS, layout.EVALUATION


def main() -> None:
    params = load_section("evaluate")
    saliency = load_section("saliency")
    model_params = load_section("model")
    device = pick_device(model_params.device)
    precision = resolve_precision(model_params.precision, device)
    data = PreparedData.load(PREPARED)
    check_test_folds(data.index, PREPARED / "index.csv")
    data_report = read_json(PREPARED / "report.json")
    dataset, title = data_report["dataset"], f"{data_report['dataset']}: baseline against guided"
    sections = {
        "evaluate": params,
        "saliency.method": saliency.method,
        "saliency.layers": saliency.layers,
        "saliency.batch_size": saliency.batch_size,
        "model.precision": model_params.precision,
    }
    with stage_run("evaluate", sections, dataset) as run:
        run.link_upstream(PREPARED, BASELINE, SALIENCY, PSEUDO_MASKS, GUIDED)
        run.tag_compute(str(device), precision.name)
        scores, located, panels, timing = evaluate_folds(data, saliency, device, precision, params)
        metrics, per_fold, located_per_fold = evaluation_metrics(scores, located, len(data.folds), params.threshold)
        if located.empty:
            print("  no defective test image has a true mask: localization is not scored")
        results = results_markdown(title, metrics, saliency.method)

        with output_dir(OUT) as out:
            write_csv(out / "scores.csv", scores)
            write_csv(out / "per_fold.csv", per_fold)
            write_csv(out / "localization.csv", located)
            write_csv(out / "localization_per_fold.csv", located_per_fold)
            (out / "results.md").write_text(results)
            write_pictures(out, dataset, scores, metrics, panels, params, saliency.method)
            write_report(
                out / "report.html",
                ReportInputs(
                    title, metrics, scores, located_per_fold, data_report, params.threshold, saliency.method, out
                ),
            )
            write_json(out / "summary.json", {"metrics": metrics, "device": str(device)})
            write_json(out / layout.TIMING, timing)
            run.write_lineage(out)
            run.log_artifact(out)
        write_json(layout.metrics_file("evaluate"), metrics)
        run.log_metrics({**metrics, "timing": timing})
        print(results + "\n" + timing_note(timing))


if __name__ == "__main__":
    run_stage("evaluate", main)
