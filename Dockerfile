# meshauthz: the authorizer, the mock IdP, the dev CA and the demo services in one image.
# Envoy runs from the official image (docker-compose.yml); the bundled proxy is `authz proxy`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY authz ./authz
RUN pip install .
COPY policies ./policies
COPY deploy ./deploy

# Never run as root: the CA and SVIDs live in a volume owned by this user.
RUN useradd --create-home --uid 10001 mesh && mkdir -p /certs && chown mesh /certs
USER mesh

EXPOSE 9191 9192 9193
ENTRYPOINT ["authz"]
CMD ["serve", "--policies", "/app/deploy/policies", "--grpc", "0.0.0.0:9191", "--http", "0.0.0.0:9192", "--admin", "0.0.0.0:9193"]
