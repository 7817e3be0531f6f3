# facepipe on CUDA GPUs (README: "Docker and GPUs"). Build:  docker build -t facepipe .
# Run (data read-only and outputs as volumes):
#   docker run --gpus all --rm --shm-size 8g -v /srv/faces:/data:ro -v $PWD/runs:/runs facepipe \
#       train --config /data/my_config.yaml data.root=/data/train output_dir=/runs/my_run
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
# The CUDA build of the pinned torch comes from PyPI's default index on x86-64 Linux (torch 2.13.0:
# CUDA 13.0 libraries from pip, so the host needs an R580+ driver); faiss-gpu-cu12 uses CUDA 12
# libraries (from pip; the base image has the CUDA 12 runtime too). facepipe is
# installed with its `gpu` extra (faiss-gpu-cu12). faiss-cpu (a base requirement) and faiss-gpu-cu12
# both install the `faiss` module into the same files: removing faiss-cpu deletes them, so the GPU
# build is reinstalled last, and the build fails unless the installed faiss has GPU support.
ARG FAISS_GPU_VERSION=1.14.1.post1
RUN pip install torch==2.13.0 -c constraints.txt \
 && pip install ".[gpu]" "faiss-gpu-cu12==${FAISS_GPU_VERSION}" -c constraints.txt \
 && pip uninstall -y faiss-cpu \
 && pip install --no-deps --force-reinstall "faiss-gpu-cu12==${FAISS_GPU_VERSION}" \
 && python -c "import faiss; assert hasattr(faiss, 'StandardGpuResources'), 'faiss has no GPU support'" \
 && facepipe --help > /dev/null

# Non-root user with uid 1000 (Ubuntu 24.04 images ship a user `ubuntu` with that uid: removed).
# If the removal failed, useradd stops the build (uid 1000 not unique).
RUN if id -u ubuntu > /dev/null 2>&1; then userdel --remove ubuntu || true; fi \
 && useradd --create-home --uid 1000 facepipe && mkdir -p /data /runs && chown facepipe /data /runs
USER facepipe
WORKDIR /runs
VOLUME ["/data", "/runs"]
ENTRYPOINT ["facepipe"]
CMD ["--help"]
