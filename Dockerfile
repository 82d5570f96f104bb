# gpufleet: one image for the API, proxy, dispatcher and reconciler.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --upgrade pip build \
 && python -m build --wheel --outdir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GPUFLEET_SERVER__HOST=0.0.0.0 \
    GPUFLEET_SERVER__PORT=8000 \
    GPUFLEET_CONFIG=/etc/gpufleet/config.toml \
    XDG_DATA_HOME=/var/lib/gpufleet
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
 && useradd --system --uid 10001 --home-dir /var/lib/gpufleet --create-home gpufleet \
 && mkdir -p /etc/gpufleet && chown gpufleet /etc/gpufleet
USER gpufleet
WORKDIR /var/lib/gpufleet
EXPOSE 8000
VOLUME ["/var/lib/gpufleet"]
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2).status == 200 else 1)"
ENTRYPOINT ["gpufleet"]
CMD ["serve"]
