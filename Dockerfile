# calibserve for NVIDIA GPU hosts: the official vLLM OpenAI image plus the calibserve proxy.
#
#   docker build -t calibserve:0.1.0 .
#   docker run --gpus all -p 8000:8000 -e CALIBSERVE_SIGNING_KEY=... \
#     -v /srv/merged/model:/models/model:ro calibserve:0.1.0 --model /models/model
#
# `calibserve serve --model DIR` starts and supervises vLLM inside the container; with
# `--upstream URL` the same image runs only the proxy in front of vLLM servers elsewhere.
# The CPU variant is Dockerfile.cpu.

# Pinned: calibserve talks to vLLM over its OpenAI HTTP API, so any vLLM >= 0.11 works, but a
# moving tag would change the engine under a running deployment.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0
FROM ${VLLM_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/home/calibserve/.cache/huggingface

WORKDIR /opt/calibserve
COPY pyproject.toml README.md* ./
COPY cli ./cli
COPY calibration ./calibration
COPY merge ./merge
COPY server ./server
COPY routing ./routing
COPY demo ./demo
COPY fit ./fit
COPY tune ./tune
COPY testing ./testing

# The image already holds a CUDA build of vLLM and torch; `.[gpu]` only asks for vllm>=0.11.
# Constraining both to the installed versions makes the resolver keep them instead of pulling
# a different (CPU or mismatched CUDA) build from PyPI.
RUN python3 -m pip freeze | grep -E '^(vllm|torch)==' > /tmp/keep.txt \
    && uv pip install --system --no-cache --constraint /tmp/keep.txt ".[gpu]" \
    && rm /tmp/keep.txt \
    && calibserve --help > /dev/null

# Run unprivileged; the model directory is mounted read-only and the HF cache is the only
# place that needs to be writable.
RUN useradd --create-home --uid 10001 --user-group calibserve
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/calibserve

EXPOSE 8000

# /health is liveness only (the process answers); /ready also waits for the engine.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# No signing key here: CALIBSERVE_SIGNING_KEY comes from the runtime (compose env, a k8s Secret).
ENTRYPOINT ["calibserve", "serve"]
# --engine-console: a container's logs are its stdout, so vLLM's own output goes there too
# (outside a container it goes to a log file under $CALIBSERVE_HOME/runs/).
CMD ["--model", "/models/model", "--host", "0.0.0.0", "--port", "8000", "--engine-console"]
