# The device server alone: no KVM, no QEMU; it needs only its socket volume
# (and, for later devices, the images and directories it serves).
#   docker build -f docker/devserver.Dockerfile -t devmodel/devserver .
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY devserver devserver
COPY vmm_client vmm_client
RUN pip install --no-cache-dir build \
    && python -m build --wheel --outdir /wheels .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /nonexistent devmodel \
    && install -d -o devmodel -g devmodel -m 0700 /run/devmodel
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER devmodel
VOLUME ["/run/devmodel"]
ENTRYPOINT ["python", "-m", "devserver"]
CMD ["--listen", "unix:/run/devmodel/devserver.sock", "--device", "pci-testdev"]
HEALTHCHECK --interval=10s --timeout=3s CMD ["python", "-m", "devserver.service.healthcheck", "unix:/run/devmodel/devserver.sock"]
