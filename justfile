# Stipple tasks. On a fresh machine run them through ./dev (it installs .venv first):
#   ./dev up      ./dev test      ./dev        (lists the recipes)

set shell := ["bash", "-euo", "pipefail", "-c"]

default:
    @just --list

# Run the whole network on this machine: NATS, gateway on :8080, dispatcher, validator, 3 nodes
[group('run')]
up *args:
    stipple up {{ args }}

# Build the built-in tiny Stable Diffusion model into a folder
[group('run')]
make-tiny-model dir=".stipple/models/tiny-sd":
    stipple-node make-tiny-model {{ dir }}

# Lint, type-check, check deploy/k8s, then every test (what CI runs)
[group('test')]
test *args: lint typecheck k8s-check
    python -m pytest -n 2 --dist loadgroup {{ args }}

# Only the fast unit tests (no servers)
[group('test')]
unit *args:
    python -m pytest -m "not integration and not slow" {{ args }}

# Render deploy/k8s (kustomize) and validate every object offline, strictly
[group('test')]
k8s-check:
    python deploy/tools/k8s_check.py

# mypy --strict over libs/common and the services' domain modules (the files in pyproject's [tool.mypy])
[group('test')]
typecheck:
    python -m mypy

# ruff lint and format check
[group('test')]
lint:
    ruff check .
    ruff format --check .

# Write the gateway's OpenAPI document to docs/openapi.json (a test fails while it is out of date)
[group('dev')]
openapi:
    python -m stipple_gateway.openapi docs/openapi.json

# Write the Grafana dashboards' JSON from deploy/tools/dashboards.py (a test fails while it is out of date)
[group('dev')]
dashboards:
    python deploy/tools/dashboards.py

# Write deploy/k8s/base/nats/auth.conf (accounts, service users, the auth callout) from stipple_common.permissions
[group('dev')]
nats-auth:
    python deploy/tools/render_nats.py

# Draw docs/img/dashboard-*.png: a real Prometheus scraping `stipple up` under load (~6 min)
[group('dev')]
dashboard-pictures minutes="4":
    python deploy/tools/dashboard_snapshot.py --minutes {{ minutes }} --out docs/img

# Format the code
[group('dev')]
fmt:
    ruff format .
    ruff check --fix .
