# facepipe on a CUDA GPU. Build:  docker build -t facepipe .
# Run (data and outputs as volumes):
#   docker run --gpus all --rm -v /data:/data -v $PWD/runs:/runs facepipe \
#       train --config /data/my_config.yaml output_dir=/runs/my_run
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/facepipe
ENV PATH=/opt/facepipe/bin:$PATH

WORKDIR /src
COPY setup.py README.md constraints.txt ./
COPY facepipe ./facepipe
COPY configs ./configs
# The CUDA build of the pinned torch comes from PyPI's default index on x86-64 Linux. faiss-cpu
# and faiss-gpu both provide the `faiss` module: keep only the GPU build (the `gpu` extra).
RUN pip install torch==2.13.0 \
 && pip install . -c constraints.txt \
 && pip uninstall -y faiss-cpu \
 && pip install "faiss-gpu-cu12"

RUN useradd --create-home --uid 1000 facepipe && mkdir -p /data /runs && chown facepipe /data /runs
USER facepipe
WORKDIR /runs
VOLUME ["/data", "/runs"]
ENTRYPOINT ["facepipe"]
CMD ["--help"]
