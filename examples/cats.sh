#!/usr/bin/env bash
# The cat-breeds use case: a folder per breed, a model in minutes, labels for new photos.
#
#   cats/
#     maine coon/   *.jpg
#     siamese/      *.jpg
#     british shorthair/ *.jpg
#
# Usage: examples/cats.sh cats/ new_photos/
set -euo pipefail
images=${1:?usage: cats.sh IMAGE_DIR PHOTOS...}
shift

# EfficientNet-Lite0 works offline; drop --backbone for Inception-v3 (downloads its weights).
retrainer train --image-dir "$images" --backbone efficientnet_lite0 \
    --output-dir cats_model --print-misclassified

# Score the model on the held-out split that train kept aside, then label new photos.
# (evaluate leaves out, by content, the images the model was fitted on.)
retrainer evaluate --image-dir "$images" --model-dir cats_model
retrainer label --model-dir cats_model --top-k 3 "$@"
retrainer label --model-dir cats_model --json "$@" > cats_labels.jsonl
echo "labels written to cats_labels.jsonl"
