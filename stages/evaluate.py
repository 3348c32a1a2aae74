"""Stage evaluate: baseline against guided on every test image, in numbers and pictures.

Classification: AP (scikit-learn's definition) per fold, averaged over folds as the literature
reports it, and pooled; AUROC, accuracy at the chosen threshold, F1 at the best threshold, false
alarms at 100% recall, missed defects at zero false alarms. Localization wherever true masks
exist: saliency mass inside the mask and pointing game for both models, IoU of the pseudo-masks
and of the guided segmentation output. Inference time per image of each model.
Outputs: data/evaluation/{scores.csv, results.md, pr_curves.png, overlays.png, run.json};
data/metrics/evaluate.json; data/plots/pr_{baseline,guided}.csv.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.artifacts import output_dir, read_json, write_csv, write_json
from pipeline.config import EvaluateParams, ModelParams, SaliencyParams, load_section
from pipeline.data import PreparedData
from pipeline.metrics import localization_metrics, mask_iou, pr_curve, summarize_folds
from pipeline.models import GuidedClassifier, PriorAsChannel
from pipeline.runner import run_stage
from pipeline.saliency import create_saliency, saliency_maps
from pipeline.tracking import stage_run
from pipeline.training import inference_priors, load_model, pick_device, predict, segment
from pipeline.visualisation import (heatmap_overlay, mask_outline, overlay_grid, plot_pr_curves,
                                    results_table_markdown, save_png)

PREPARED, BASELINE, GUIDED = Path("data/prepared"), Path("data/baseline"), Path("data/guided")
SALIENCY, PSEUDO_MASKS = Path("data/saliency"), Path("data/pseudo_masks")
OUT = Path("data/evaluation")
METRICS = Path("data/metrics/evaluate.json")
MODELS = ("baseline", "guided")
HEATMAPS = ("baseline_saliency", "guided_saliency", "guided_segmentation")


def evaluate_fold(data: PreparedData, fold: int, saliency: SaliencyParams, device) -> tuple[pd.DataFrame, dict]:
    """Scores of both models on the fold's test images, and their maps for localization."""
    _, test = data.split(fold)
    images = data.images[test]
    priors = data.load_maps(SALIENCY / f"fold{fold}", test)
    baseline, baseline_config = load_model(BASELINE / f"fold{fold}.pt", device)
    guided, guided_config = load_model(GUIDED / f"fold{fold}.pt", device)
    # The teacher variant reads the baseline's maps at inference; the others read no prior.
    guided_priors = inference_priors(guided_config, priors)
    timings = {}
    started = time.perf_counter()
    baseline_scores = predict(baseline, baseline_config, images)
    timings["baseline"] = (time.perf_counter() - started) / len(test)
    started = time.perf_counter()
    guided_scores = predict(guided, guided_config, images, guided_priors)
    timings["guided"] = (time.perf_counter() - started) / len(test)
    # The guided model's own saliency, with its prior (if any) fed as an extra input channel.
    layers = saliency.layers and [f"guided.{name}" for name in saliency.layers]
    explainer = create_saliency(saliency.method, PriorAsChannel(guided, guided_priors is not None), layers)
    guided_maps, _, _ = saliency_maps(explainer, guided_config, images, 16, guided_priors)
    frame = pd.DataFrame({"fold": fold, "id": data.index["id"].to_numpy()[test], "row": test,
                          "label": data.index["label"].to_numpy()[test],
                          "baseline": baseline_scores, "guided": guided_scores})
    maps = {"baseline_saliency": priors.numpy(), "guided_saliency": guided_maps,
            "pseudo_mask": data.load_masks(PSEUDO_MASKS / f"fold{fold}", test).numpy() > 0}
    if isinstance(guided, GuidedClassifier):  # variants whose deployed model has no head have no S
        maps["guided_segmentation"] = segment(guided, guided_config, images, guided_priors)
    return frame, {"maps": maps, "seconds_per_image": timings, "variant": guided_config.get("variant", "teacher")}


def localization(data: PreparedData, frame: pd.DataFrame, maps: dict[str, np.ndarray]) -> dict:
    """Localization figures over defective test images that have a true mask."""
    picked = [(k, mask) for k, (row, label) in enumerate(zip(frame["row"], frame["label"]))
              if label == 1 and (mask := data.true_mask(row)) is not None]
    if not picked:
        return {}
    positions, masks = zip(*picked)
    result = {}
    for name in [n for n in HEATMAPS if n in maps]:
        scores = localization_metrics([maps[name][k] for k in positions], masks)
        result[name] = {key: scores[key] for key in ("mass_inside", "pointing_game")}
    result["pseudo_mask_iou"] = float(np.mean([mask_iou(maps["pseudo_mask"][k], m) for k, m in picked]))
    if "guided_segmentation" in maps:
        result["guided_segmentation_iou"] = float(np.mean(
            [mask_iou(maps["guided_segmentation"][k] > 0.5, m) for k, m in picked]))
    return result


def overlay_picture(data: PreparedData, frame: pd.DataFrame, maps: dict[str, np.ndarray], count: int) -> np.ndarray:
    """The hardest images: lowest-scored defective and highest-scored defect-free ones."""
    hardest = pd.concat([frame[frame["label"] == 1].nsmallest(count, "guided"),
                         frame[frame["label"] == 0].nlargest(count, "guided")])
    rows, titles = [], []
    for k, item in hardest.iterrows():
        image = data.images[item["row"]].numpy()
        mask = data.true_mask(item["row"])
        rows.append([image, mask if mask is not None else np.zeros_like(image, dtype=bool),
                     *(heatmap_overlay(image, maps[name][k]) for name in HEATMAPS if name in maps)])
        if mask is not None:
            rows[-1][2:] = [mask_outline(panel, mask, color=(255, 255, 255)) for panel in rows[-1][2:]]
        titles.append(f"{item['id']} y={item['label']} b={item['baseline']:.2f} g={item['guided']:.2f}")
    columns = ["image", "true mask", *(name.replace("_", " ") for name in HEATMAPS if name in maps)]
    return overlay_grid(rows, titles, columns)


def main() -> None:
    params: EvaluateParams = load_section("evaluate")
    saliency: SaliencyParams = load_section("saliency")
    device = pick_device(load_section("model").device)
    data = PreparedData.load(PREPARED)
    dataset = read_json(PREPARED / "report.json")["dataset"]
    sections = {"evaluate": params, "saliency.method": saliency.method, "saliency.layers": saliency.layers}
    with stage_run("evaluate", sections, dataset) as run:
        links = run.link_upstream(PREPARED, BASELINE, SALIENCY, PSEUDO_MASKS, GUIDED)
        results = [evaluate_fold(data, fold, saliency, device) for fold in data.folds]
        frame = pd.concat([r[0] for r in results], ignore_index=True)
        maps = {name: np.concatenate([r[1]["maps"][name] for r in results]) for name in results[0][1]["maps"]}
        seconds = {m: float(np.mean([r[1]["seconds_per_image"][m] for r in results])) for m in MODELS}
        summaries = {m: summarize_folds(frame.rename(columns={m: "score"}), params.threshold) for m in MODELS}
        metrics = {m: {**summaries[m]["mean"], "ap_std": summaries[m]["std"]["ap"],
                       "ap_pooled": summaries[m]["pooled"]["ap"],
                       "inference_ms_per_image": 1000 * seconds[m]} for m in MODELS}
        variant = results[0][1]["variant"]
        if variant == "teacher":  # only this variant pays for the baseline's saliency at inference
            teacher_ips = np.mean(list(read_json(SALIENCY / "report.json")["images_per_second"].values()))
            metrics["guided"]["inference_ms_per_image_with_teacher_prior"] = 1000 * (seconds["guided"] + 1 / teacher_ips)
        metrics["localization"] = localization(data, frame, maps)
        with output_dir(OUT) as out:
            write_csv(out / "scores.csv", frame.drop(columns="row"))
            curves = {}
            for m in MODELS:
                curves[m] = pr_curve(frame["label"].to_numpy(), frame[m].to_numpy())
                curves[m].attrs["ap"] = metrics[m]["ap"]
                write_csv(Path(f"data/plots/pr_{m}.csv"), curves[m])
            plot_pr_curves(curves, out / "pr_curves.png", title=f"{dataset}: precision-recall, test images")
            save_png(out / "overlays.png", overlay_picture(data, frame, maps, params.overlays))
            table = results_table_markdown(
                [{"Method": f"{m} ({variant}, {saliency.method} prior)" if m == "guided" else m, "Label type": "image-level",
                  "Pixel masks": 0, "AP (fold mean)": metrics[m]["ap"], "AP std": metrics[m]["ap_std"],
                  "AUROC": metrics[m]["auroc"], "False alarms at 100% recall": metrics[m]["false_alarms_at_full_recall"]}
                 for m in MODELS],
                ["Method", "Label type", "Pixel masks", "AP (fold mean)", "AP std", "AUROC",
                 "False alarms at 100% recall"])
            (out / "results.md").write_text(f"# {dataset}: baseline against guided\n\n{table}\n")
            write_json(out / "summary.json", {"summaries": summaries, "upstream_runs": links})
            run.write_lineage(out)
            run.log_artifact(out)
        write_json(METRICS, metrics)
        run.log_metrics(metrics)
        print(table)


if __name__ == "__main__":
    run_stage("evaluate", main)
