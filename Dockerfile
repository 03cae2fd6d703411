# The optionstore image: the Celery worker and the `optionstore` command line.
FROM python:3.11-slim

# celeryconfig.py is a top-level module outside the installed packages: PYTHONPATH finds it.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    OPTIONS_LOG_FORMAT=json

WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY store ./store
COPY tasks ./tasks
COPY worker ./worker
# gcc only while installing: it builds the readers' C hit (store/_hit.c), then leaves the image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install . \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --uid 10001 optionstore

# Nothing here needs root, and Celery warns against running its workers as root.
USER optionstore
CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO"]
