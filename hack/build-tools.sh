#!/usr/bin/env bash
# Builds the local Kubernetes toolchain used by hack/dev-cluster and the e2e tests, from the Go
# module proxy only: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd,
# kwok, kwokctl, helm and actionlint (lints .github/workflows); the real node's kubelet,
# kube-proxy and CoreDNS (hack/dev-cluster with FTO_REAL_NODE=1); with FTO_KUEUE=1 (or --kueue)
# also Kueue's controller. Versions are pinned by the committed modules under hack/tools/*/go.mod.
#
# Binaries land outside git in a cache keyed by version:
#   ${FTO_CACHE:-$HOME/.cache/finetune-operator}/bin/<group>-<version>/
# A group whose binaries are all present is skipped, so a second run costs well under a second.
#
# Usage:
#   hack/build-tools.sh            build whatever is missing (cold: see README developer notes)
#   hack/build-tools.sh --path     print the PATH fragment holding the binaries (builds nothing)
#   hack/build-tools.sh --check    exit 1 (listing what is missing) unless everything is built
#   hack/build-tools.sh --kueue    also build Kueue (as FTO_KUEUE=1 does)
#   hack/build-tools.sh --kueue-source   print the Kueue module's source folder in the Go module
#                                  cache (its CRDs and webhook manifests), downloading it if needed
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS_DIR="${HACK_DIR}/tools"
FTO_CACHE="${FTO_CACHE:-${HOME}/.cache/finetune-operator}"
# Two cores on the reference machine: more parallelism only adds memory pressure.
GO_BUILD_PARALLELISM="${FTO_GO_BUILD_PARALLELISM:-2}"

# Prints the version that a tools module pins for a given Go module (from its go.mod).
pinned_version() {
  local tools_module_dir="$1" go_module="$2"
  # A require block's line ("M vX") or a one-line require ("require M vX").
  awk -v m="${go_module}" '$1 == m && $2 ~ /^v/ { print $2; exit }
    $1 == "require" && $2 == m { print $3; exit }' "${tools_module_dir}/go.mod"
}

KUBE_VERSION="$(pinned_version "${TOOLS_DIR}/kubernetes" k8s.io/kubernetes)"
ETCD_VERSION="$(pinned_version "${TOOLS_DIR}/etcd" go.etcd.io/etcd/server/v3)"
KWOK_VERSION="$(pinned_version "${TOOLS_DIR}/kwok" sigs.k8s.io/kwok)"
HELM_VERSION="$(pinned_version "${TOOLS_DIR}/helm" helm.sh/helm/v3)"
KUEUE_VERSION="$(pinned_version "${TOOLS_DIR}/kueue" sigs.k8s.io/kueue)"
ACTIONLINT_VERSION="$(pinned_version "${TOOLS_DIR}/actionlint" github.com/rhysd/actionlint)"
COREDNS_VERSION="$(pinned_version "${TOOLS_DIR}/coredns" github.com/coredns/coredns)"

KUBE_BIN_DIR="${FTO_CACHE}/bin/kubernetes-${KUBE_VERSION}"
ETCD_BIN_DIR="${FTO_CACHE}/bin/etcd-${ETCD_VERSION}"
KWOK_BIN_DIR="${FTO_CACHE}/bin/kwok-${KWOK_VERSION}"
HELM_BIN_DIR="${FTO_CACHE}/bin/helm-${HELM_VERSION}"
KUEUE_BIN_DIR="${FTO_CACHE}/bin/kueue-${KUEUE_VERSION}"
ACTIONLINT_BIN_DIR="${FTO_CACHE}/bin/actionlint-${ACTIONLINT_VERSION}"
# The real node's binaries: a group of their own, so adding them never rebuilds the control plane.
KUBE_NODE_BIN_DIR="${FTO_CACHE}/bin/kube-node-${KUBE_VERSION}"
COREDNS_BIN_DIR="${FTO_CACHE}/bin/coredns-${COREDNS_VERSION}"
# Kueue is optional: built and checked only when asked for.
WITH_KUEUE="${FTO_KUEUE:-0}"

missing_binaries() {
  local dir="$1"; shift
  local name
  for name in "$@"; do
    [[ -x "${dir}/${name}" ]] || echo "${dir}/${name}"
  done
}

# build_group DIR TOOLS_MODULE LDFLAGS BINARY=PACKAGE...
# Builds into a scratch folder and moves the results in only on success, so an interrupted
# build never leaves a half-written binary that a later run would mistake for a finished one.
build_group() {
  local bin_dir="$1" module_dir="$2" ldflags="$3"; shift 3
  local names=() packages=() pair
  for pair in "$@"; do
    names+=("${pair%%=*}")
    packages+=("${pair#*=}")
  done
  if [[ -z "$(missing_binaries "${bin_dir}" "${names[@]}")" ]]; then
    echo "build-tools: up to date: ${bin_dir}"
    return 0
  fi
  # Scratch folders of interrupted runs are garbage (the lock below keeps runs apart).
  rm -rf "${bin_dir}".partial.*
  local scratch_dir="${bin_dir}.partial.$$"
  mkdir -p "${scratch_dir}"
  echo "build-tools: building ${names[*]} into ${bin_dir}"
  local started_at=$SECONDS index
  for index in "${!names[@]}"; do
    (
      cd "${module_dir}"
      # Server components are built static (no cgo), as upstream releases are; -trimpath and
      # -s -w keep the cached binaries small and independent of where this checkout lives.
      CGO_ENABLED=0 go build -p "${GO_BUILD_PARALLELISM}" -trimpath -buildvcs=false \
        -ldflags "-s -w ${ldflags}" -o "${scratch_dir}/${names[$index]}" "${packages[$index]}"
    )
  done
  mkdir -p "${bin_dir}"
  for index in "${!names[@]}"; do
    mv "${scratch_dir}/${names[$index]}" "${bin_dir}/${names[$index]}"
  done
  rm -rf "${scratch_dir}"
  echo "build-tools: built ${names[*]} in $((SECONDS - started_at))s"
}

kube_version_ldflags() {
  # Without these the binaries report v0.0.0-master, which breaks Helm's kubeVersion checks
  # and kwokctl's version-dependent component flags.
  local minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
  local package flags=""
  for package in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X ${package}.gitVersion=${KUBE_VERSION} -X ${package}.gitMajor=1"
    flags+=" -X ${package}.gitMinor=${minor} -X ${package}.gitTreeState=clean"
    flags+=" -X ${package}.buildDate=1970-01-01T00:00:00Z"
  done
  echo "${flags}"
}

print_path() {
  echo "${KUBE_BIN_DIR}:${ETCD_BIN_DIR}:${KWOK_BIN_DIR}:${HELM_BIN_DIR}:${KUEUE_BIN_DIR}:${ACTIONLINT_BIN_DIR}:${KUBE_NODE_BIN_DIR}:${COREDNS_BIN_DIR}"
}

# The Kueue module's source (config/components/crd/bases, config/components/webhook) in the Go
# module cache: the CRDs and webhook definitions of exactly the version built.
print_kueue_source() {
  (cd "${TOOLS_DIR}/kueue" && go mod download sigs.k8s.io/kueue \
    && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
}

check_all_built() {
  local missing
  missing="$(
    missing_binaries "${KUBE_BIN_DIR}" kube-apiserver kube-controller-manager kube-scheduler kubectl
    missing_binaries "${ETCD_BIN_DIR}" etcd
    missing_binaries "${KWOK_BIN_DIR}" kwok kwokctl
    missing_binaries "${HELM_BIN_DIR}" helm
    missing_binaries "${ACTIONLINT_BIN_DIR}" actionlint
    missing_binaries "${KUBE_NODE_BIN_DIR}" kubelet kube-proxy
    missing_binaries "${COREDNS_BIN_DIR}" coredns
    if [[ "${WITH_KUEUE}" == "1" ]]; then missing_binaries "${KUEUE_BIN_DIR}" kueue; fi
  )"
  if [[ -n "${missing}" ]]; then
    echo "build-tools: missing (run hack/build-tools.sh):" >&2
    echo "${missing}" >&2
    return 1
  fi
}

build_all() {
  command -v go >/dev/null || { echo "build-tools: go is not installed" >&2; exit 1; }
  mkdir -p "${FTO_CACHE}"
  # Two concurrent runs (say a developer and the test fixture) would race on the same folders.
  exec 9>"${FTO_CACHE}/build-tools.lock"
  flock 9
  local started_at=$SECONDS

  build_group "${KUBE_BIN_DIR}" "${TOOLS_DIR}/kubernetes" "$(kube_version_ldflags)" \
    kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver \
    kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
    kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler \
    kubectl=k8s.io/kubernetes/cmd/kubectl
  build_group "${KUBE_NODE_BIN_DIR}" "${TOOLS_DIR}/kubernetes" "$(kube_version_ldflags)" \
    kubelet=k8s.io/kubernetes/cmd/kubelet \
    kube-proxy=k8s.io/kubernetes/cmd/kube-proxy
  # main.go there: CoreDNS with only the plugins the cluster DNS uses.
  build_group "${COREDNS_BIN_DIR}" "${TOOLS_DIR}/coredns" \
    "-X github.com/coredns/coredns/coremain.GitCommit=${COREDNS_VERSION}" \
    coredns=.
  build_group "${ETCD_BIN_DIR}" "${TOOLS_DIR}/etcd" "" \
    etcd=go.etcd.io/etcd/server/v3
  # kwokctl configures each component's flags for its default Kubernetes version unless told,
  # so its default is stamped to the version built above.
  build_group "${KWOK_BIN_DIR}" "${TOOLS_DIR}/kwok" \
    "-X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${KUBE_VERSION#v}" \
    kwok=sigs.k8s.io/kwok/cmd/kwok \
    kwokctl=sigs.k8s.io/kwok/cmd/kwokctl
  build_group "${HELM_BIN_DIR}" "${TOOLS_DIR}/helm" \
    "-X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" \
    helm=helm.sh/helm/v3/cmd/helm
  build_group "${ACTIONLINT_BIN_DIR}" "${TOOLS_DIR}/actionlint" "" \
    actionlint=github.com/rhysd/actionlint/cmd/actionlint
  if [[ "${WITH_KUEUE}" == "1" ]]; then
    build_group "${KUEUE_BIN_DIR}" "${TOOLS_DIR}/kueue" \
      "-X sigs.k8s.io/kueue/pkg/version.GitVersion=${KUEUE_VERSION}" \
      kueue=sigs.k8s.io/kueue/cmd/kueue
  fi

  check_all_built
  echo "build-tools: all tools ready in $((SECONDS - started_at))s; PATH fragment: $(print_path)"
}

if [[ "${1:-}" == "--kueue" ]]; then
  WITH_KUEUE=1
  shift
fi
case "${1:-build}" in
  build) build_all ;;
  --path) print_path ;;
  --check) check_all_built ;;
  --kueue-source) print_kueue_source ;;
  *) echo "usage: $0 [--kueue] [--path|--check|--kueue-source]" >&2; exit 2 ;;
esac
