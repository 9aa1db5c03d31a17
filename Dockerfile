# The BlockDrop image: Ray's official GPU image for the pinned Ray and Python, plus this project.
# One image for the Ray cluster launcher (cluster/ray-cluster.yaml) and KubeRay (cluster/kuberay/).
#
#   docker build -t blockdrop:0.1.0 .
#   docker tag blockdrop:0.1.0 REGISTRY/blockdrop:0.1.0 && docker push REGISTRY/blockdrop:0.1.0
#
# The tag is blockdrop's version (blockdrop/__init__.py); the base image's Ray and Python versions
# are requirements.txt's ray pin and Python 3.11 (tests/test_cluster.py checks all three).
FROM rayproject/ray:2.60.0-py311-cu128

LABEL org.opencontainers.image.title="blockdrop" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="BlockDrop training, sweeps and serving on Ray, tracked in MLflow"

# Ray's image runs as user `ray` (home /home/ray, Python in /home/ray/anaconda3): pip needs no sudo.
WORKDIR /home/ray/blockdrop
COPY --chown=ray:users requirements.txt .
# Ray is already 2.60.0 here; this adds its train/tune/serve extras, torch (a CUDA build from PyPI),
# MLflow and the rest at the versions the tests ran against.
RUN pip install --no-cache-dir -r requirements.txt \
 && python -c "import torch, torchvision, ray, mlflow; print('torch', torch.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)"

COPY --chown=ray:users pyproject.toml ./
COPY --chown=ray:users blockdrop/ blockdrop/
COPY --chown=ray:users cluster/ cluster/
COPY --chown=ray:users tests/ tests/
COPY --chown=ray:users train_job.py tune_penalty.py serve_policy.py pytest.ini ./
# blockdrop itself, in place (editable: the code stays in this folder, which the jobs' commands name,
# and nothing is written here): `import blockdrop` from anywhere and the blockdrop-* commands.
# --no-deps: requirements.txt brought them; --no-build-isolation: its setuptools is the backend.
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
 && python -c "import importlib.metadata as m; print('blockdrop', m.version('blockdrop'))" \
 && blockdrop-train --help > /dev/null

# Jobs may run from any folder (a RayJob entrypoint, or a `ray job submit --working-dir` upload,
# which then comes first on sys.path): the baked-in code stays importable.
ENV PYTHONPATH=/home/ray/blockdrop \
    MLFLOW_DISABLE_TELEMETRY=true \
    RAY_USAGE_STATS_ENABLED=0

# The offline preset's data ships inside scikit-learn: a smoke run needs nothing mounted.
#   docker run --rm --gpus all blockdrop:0.1.0 python -m pytest tests/test_execution.py
CMD ["python", "train_job.py", "--help"]
