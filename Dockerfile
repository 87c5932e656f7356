# retrainer in a container: mount your photos at /data; bottlenecks and converted weights
# persist in the /cache volume. The container runs as the owner of the mounted /data folder
# (root when root owns it), so it works with any host folder and its outputs belong to you.
#   docker build -t retrainer .
#   docker run --rm -v "$PWD:/data" -v retrainer-cache:/cache retrainer \
#       train --image-dir photos --backbone efficientnet_lite0 --output-dir retrained
#   docker run --rm -v "$PWD:/data" -p 8000:8000 -e RETRAINER_API_KEY=... retrainer \
#       serve --model-dir retrained --host 0.0.0.0
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RETRAINER_CACHE_DIR=/cache

RUN useradd --create-home --uid 1000 retrainer \
    && mkdir -p /data /cache \
    && chown retrainer:retrainer /data /cache

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY retrainer ./retrainer
# The local checkout is the pinned version; the extras add the database drivers and the HTTP service.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[sql,serve]" \
    && rm -rf /src/build

COPY docker/entrypoint.sh /usr/local/bin/retrainer-entrypoint

USER 1000
# Convert the bundled EfficientNet-Lite0 weights once, so the image works offline from the start.
RUN python -c "from retrainer.backbones.efficientnet_lite import pretrained_weights_path as p; p()"

# The entrypoint starts as root only to look at who owns /data, then drops to that user
# (setpriv, from util-linux); `docker run --user UID` runs as UID directly.
# hadolint ignore=DL3002
USER 0

WORKDIR /data
# retrainer serve --host 0.0.0.0 (with RETRAINER_API_KEY set) listens here.
EXPOSE 8000
VOLUME ["/data", "/cache"]
ENTRYPOINT ["retrainer-entrypoint"]
CMD ["--help"]
