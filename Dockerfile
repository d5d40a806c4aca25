# LoRA Studio on a CUDA machine: the studio with the gpu extra (xformers), serving on port 7860.
# Build: docker build -t lora-studio .    Run: docker run --gpus all -p 7860:7860 -v lora-data:/data lora-studio
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    LORA_STUDIO_DATA_DIR=/data

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/lora-studio
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY pyproject.toml README.md ./
COPY app ./app
COPY composer ./composer
COPY retrieval ./retrieval
COPY db ./db
COPY toyworld ./toyworld
COPY static ./static
RUN pip install --upgrade pip && pip install '.[gpu,postgres,ray]'

RUN useradd --create-home studio && mkdir -p /data && chown studio /data
USER studio
VOLUME ["/data"]
EXPOSE 7860
# Until the web server lands, the image renders from the CLI; `lora-studio serve` becomes the default command.
ENTRYPOINT ["lora-studio"]
CMD ["--help"]
