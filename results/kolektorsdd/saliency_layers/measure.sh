#!/bin/bash
# Pseudo-mask IoU and pointing game per saliency method and layers, on one trained baseline.
# In the project root, with the virtual environment active, after
#   kgi presets apply cpu-kolektorsdd && dvc repro train_baseline
# Each row reruns saliency and pseudo_labels only (dvc exp run pseudo_labels).
set -euo pipefail
ROWS=results/kolektorsdd/saliency_layers/rows.jsonl
run() { # name method layers blur
  dvc exp run pseudo_labels -S "saliency.method=$2" -S "saliency.layers=$3" -S "pseudo_labels.blur=$4" > /dev/null
  python - "$@" >> "$ROWS" <<'PY'
import json, sys
s = json.load(open("data/metrics/saliency.json")); p = json.load(open("data/metrics/pseudo_labels.json"))
print(json.dumps(dict(name=sys.argv[1], method=sys.argv[2], layers=sys.argv[3], blur=int(sys.argv[4]),
                      pointing_game=s["pointing_game"], mass_inside=s["mass_inside"], iou_train=p["iou_train"],
                      iou_test=p["iou_test"], foreground_share=p["foreground_share"])))
PY
}
run layercam-2-4 layercam null 0
run layercam-1 layercam '[features.layer1]' 0
run layercam-2 layercam '[features.layer2]' 0
run layercam-3 layercam '[features.layer3]' 0
run layercam-4 layercam '[features.layer4]' 0
run layercam-1-2 layercam '[features.layer1,features.layer2]' 0
run gradcam-3 gradcam '[features.layer3]' 0
run gradcam-4 gradcam null 0
run fullgrad fullgrad null 0
