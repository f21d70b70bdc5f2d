# The frontend: vmm_client (the KVM VMM, the vfio-user bridge for QEMU, and the
# probe). Run it with the device server's socket volume mounted, and with
# --device /dev/kvm for the KVM frontend.
#   docker build -f docker/vmm.Dockerfile -t devmodel/vmm .
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY devserver devserver
COPY vmm_client vmm_client
RUN pip install --no-cache-dir build \
    && python -m build --wheel --outdir /wheels .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /nonexistent devmodel
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER devmodel
ENTRYPOINT ["python", "-m", "vmm_client"]
CMD ["probe", "--devserver", "unix:/run/devmodel/devserver.sock"]
