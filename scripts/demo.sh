#!/usr/bin/env bash
# The demo: prepare Fashion-MNIST, train the fmnist preset stage by stage from
# cached features, evaluate on the 10,000 test images. SEED=1 scripts/demo.sh for another seed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

SEED=${SEED:-0}
DATA=${DATA:-data/fashion-mnist}
RUN=${RUN:-runs/fmnist-seed$SEED}
start=$(date +%s)
if [ ! -f "$DATA/dataset.json" ]; then
    .venv/bin/greedy-cli prepare fashion-mnist --out "$DATA"
fi
.venv/bin/greedy-cli run fmnist --data "$DATA" --run "$RUN" --seed "$SEED"
echo "demo: $(( $(date +%s) - start )) s wall time; report in $RUN/eval.json"
