# The image every cluster definition in deploy/ runs: Ray's own GPU image for the Ray and
# Python versions the project pins, with this repository installed into its Python.
#   docker build -t registry.example.com/jlstm:0.1.0 . && docker push registry.example.com/jlstm:0.1.0
# The Ray version must match the one that submits jobs (`ray job submit` refuses a mismatch),
# so change RAY_VERSION together with the venv's Ray (deploy/README.md, "Versions").
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu

WORKDIR /home/ray/jlstm
# .dockerignore admits only the package sources, configs and the files pip needs.
COPY --chown=ray:users . .

# torch/torchvision come from the Makefile's TORCH_PINS (its one list of pins), every other
# package from pyproject.toml: nothing here names a package. The constraint keeps the
# image's own Ray, so pip never swaps the Ray that the base image was built around.
RUN set -eu; \
    torch_pins="$(sed -n 's/^TORCH_PINS := //p' Makefile)"; \
    test -n "$torch_pins"; \
    python -c 'import ray; print(f"ray=={ray.__version__}")' > /tmp/ray-constraint.txt; \
    pip install --no-cache-dir --constraint /tmp/ray-constraint.txt $torch_pins; \
    pip install --no-cache-dir --constraint /tmp/ray-constraint.txt . $torch_pins; \
    rm /tmp/ray-constraint.txt; \
    jlstm --help > /dev/null

# Keep idle task workers for a minute (docs/DESIGN.md, invariants); every node of a cluster
# built from this image gets it, whichever launcher starts Ray.
ENV RAY_idle_worker_killing_time_threshold_ms=60000
