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
RUN pip install . \
    && useradd --system --create-home --uid 10001 optionstore

# Nothing here needs root, and Celery warns against running its workers as root.
USER optionstore
CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO"]
