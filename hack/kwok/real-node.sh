# shellcheck shell=bash
# The real node of the local cluster (FTO_REAL_NODE=1): sourced by hack/dev-cluster, which
# defines CLUSTER_NAME, CLUSTER_DIR, KUBECONFIG_PATH, FTO_CACHE, log and kubectl_cluster.
#
# Beside kwok's simulated nodes, one node runs real containers on this machine:
#   - containerd (the Debian package) as a plain background process, with its own socket and
#     state under ${REAL_NODE_RUN}, images kept across clusters under ${FTO_CACHE}/containerd;
#   - CNI: the Debian containernetworking-plugins bridge + portmap + loopback, pods in
#     ${REAL_NODE_POD_CIDR} on the bridge ${REAL_NODE_BRIDGE};
#   - the kubelet, registered as ${REAL_NODE_NAME} with the address ${REAL_NODE_IP}, added to
#     the loopback interface (a kubelet refuses a loopback node IP such as 127.0.0.1; this
#     kernel has no dummy interfaces), labelled and tainted so that only pods that ask for it
#     land there;
#   - kube-proxy (iptables) for Service ClusterIPs, among them kubernetes.default, whose
#     endpoint is the API server on ${REAL_NODE_IP};
#   - CoreDNS on ${REAL_NODE_IP}:53 behind the kube-dns Service (${REAL_NODE_DNS_IP}), serving
#     cluster.local from the API server: the headless Services' pod names resolve in pods.
# Every process runs from this machine's binaries, nothing is pulled: images are imported with
# `hack/dev-cluster load-image IMAGE|ARCHIVE` (podman save --format oci-archive). The pause
# image is built here from busybox-static's sleep.
#
# containerd, iptables and the kubelet's directories are shared by the whole machine: one real
# node at a time (the cluster owning it is named in ${REAL_NODE_RUN}/owner).

REAL_NODE_NAME="${FTO_REAL_NODE_NAME:-real-node}"
REAL_NODE_RUN=/run/fto-node
REAL_NODE_IP=10.250.0.1
REAL_NODE_BRIDGE=fto-cni0
REAL_NODE_POD_CIDR=10.244.0.0/24
# The API server's default Service range is 10.0.0.0/24: .1 is kubernetes.default.
REAL_NODE_API_SERVICE_IP=10.0.0.1
REAL_NODE_DNS_IP=10.0.0.10
REAL_NODE_LABELS="finetune.dev/real-node=true,finetune.dev/accelerator=cpu,type=real"
REAL_NODE_PAUSE_IMAGE=localhost/fto-pause:1
# On each image load-image imports: the podman image ID it came from.
PODMAN_ID_LABEL=dev.finetune.podman-id
REAL_NODE_DIR="${CLUSTER_DIR}/node"
CONTAINERD_ROOT="${FTO_CACHE}/containerd/root"
CONTAINERD_SOCKET="${REAL_NODE_RUN}/containerd/containerd.sock"
KUBELET_ROOT="${REAL_NODE_RUN}/kubelet"

real_node_enabled() {
  [[ "${FTO_REAL_NODE:-0}" == "1" ]]
}

# The real node's pid files, one per process: containerd, kubelet, kube-proxy, coredns.
real_node_pid() {
  local pid_file="${REAL_NODE_DIR}/pids/$1.pid" pid
  [[ -f "${pid_file}" ]] || return 1
  pid="$(<"${pid_file}")"
  kill -0 "${pid}" 2>/dev/null || return 1
  echo "${pid}"
}

ctr_node() {
  ctr --address "${CONTAINERD_SOCKET}" --namespace k8s.io "$@"
}

# Options the kwokctl configuration gets when the cluster has a real node: the API server also
# listens on ${REAL_NODE_IP} (pods reach it there through kubernetes.default), its certificate
# names that address and the Service IP, it reaches the kubelet with the admin client
# certificate, and kwok manages only the nodes annotated as its own.
render_real_node_kwokctl_options() {
  cat <<EOF
  kubeApiserverCertSANs:
  - ${REAL_NODE_IP}
  - ${REAL_NODE_API_SERVICE_IP}
EOF
}

render_real_node_component_patches() {
  cat <<EOF
componentsPatches:
- name: kube-apiserver
  extraArgs:
  # One address only can be bound: all of them, so that 127.0.0.1 (kubeconfig) and
  # ${REAL_NODE_IP} (pods, via kube-proxy) both reach it.
  - {key: bind-address, value: 0.0.0.0, override: true}
  - {key: advertise-address, value: ${REAL_NODE_IP}}
  - {key: kubelet-client-certificate, value: ${CLUSTER_DIR}/pki/admin.crt}
  - {key: kubelet-client-key, value: ${CLUSTER_DIR}/pki/admin.key}
  - {key: kubelet-preferred-address-types, value: InternalIP}
- name: kwok-controller
  extraArgs:
  - {key: manage-all-nodes, value: "false", override: true}
  - {key: manage-nodes-with-annotation-selector, value: kwok.x-k8s.io/node=fake}
EOF
}

# -- configuration files ----------------------------------------------------------------------

render_containerd_config() {
  # containerd's defaults, with its own paths and the settings this machine needs:
  # restrict_oom_score_adj (no CAP_SYS_RESOURCE: lowering a score fails, and with it every
  # sandbox), the cgroupfs driver (no systemd), the CNI plugins of the Debian package.
  containerd config default | python3 -c '
import re, sys
root, state, socket, cni_conf, pause = sys.argv[1:]
text = sys.stdin.read()
def setting(key, value):
    global text
    text, count = re.subn(r"(?m)^(\s*)" + re.escape(key) + r" = .*$",
                          lambda m: m.group(1) + key + " = " + value, text)
    assert count, key
setting("root", f"\"{root}\"")
setting("state", f"\"{state}\"")
text = re.sub(r"(?ms)(\[grpc\]\s*\n\s*address = )\"[^\"]*\"", lambda m: m.group(1) + f"\"{socket}\"", text)
setting("restrict_oom_score_adj", "true")
setting("sandbox_image", f"\"{pause}\"")
setting("bin_dir", "\"/usr/lib/cni\"")
setting("conf_dir", f"\"{cni_conf}\"")
setting("SystemdCgroup", "false")
print(text)
' "${CONTAINERD_ROOT}" "${REAL_NODE_RUN}/containerd/state" "${CONTAINERD_SOCKET}" \
    "${REAL_NODE_DIR}/cni" "${REAL_NODE_PAUSE_IMAGE}"
}

render_cni_config() {
  cat <<EOF
{
  "cniVersion": "0.4.0",
  "name": "fto-pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "${REAL_NODE_BRIDGE}",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "${REAL_NODE_POD_CIDR}"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "${REAL_NODE_RUN}/cni-ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
EOF
}

render_kubelet_config() {
  local kubelet_port="$1" healthz_port="$2"
  cat <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: ${REAL_NODE_IP}
port: ${kubelet_port}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: ${healthz_port}
# The API server calls in with the cluster's admin client certificate.
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: ${CLUSTER_DIR}/pki/ca.crt}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://${CONTAINERD_SOCKET}
# This machine: cgroup v1 (hybrid), no systemd, swap not checked, no CAP_SYS_RESOURCE (the
# kubelet cannot lower its own OOM score).
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
cgroupsPerQOS: false
enforceNodeAllocatable: []
oomScoreAdj: 0
# No eviction and no image garbage collection: the imported images are the only copies.
evictionHard: {memory.available: "0%", nodefs.available: "0%", imagefs.available: "0%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
podCIDR: ${REAL_NODE_POD_CIDR}
clusterDNS: [${REAL_NODE_DNS_IP}]
clusterDomain: cluster.local
# Pods get the cluster DNS only, not this machine's resolver and search domains.
resolvConf: ${REAL_NODE_DIR}/resolv.conf
volumePluginDir: ${KUBELET_ROOT}/volume-plugins
registerWithTaints:
- {key: finetune.dev/real-node, value: "true", effect: NoSchedule}
serializeImagePulls: false
EOF
}

render_kube_proxy_config() {
  local healthz_port="$1" metrics_port="$2"
  cat <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: ${KUBECONFIG_PATH}}
hostnameOverride: ${REAL_NODE_NAME}
mode: iptables
clusterCIDR: ${REAL_NODE_POD_CIDR}
healthzBindAddress: 127.0.0.1:${healthz_port}
metricsBindAddress: 127.0.0.1:${metrics_port}
nodePortAddresses: [${REAL_NODE_IP}/32]
# Masquerade Service traffic, so a pod reaching a pod on the same bridge through a ClusterIP gets
# the reply back through this host's conntrack.
iptables: {masqueradeAll: true, localhostNodePorts: false}
# Leave the kernel's conntrack settings alone (setting them needs privileges this machine lacks).
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
oomScoreAdj: 0
EOF
}

render_corefile() {
  local health_port="$1" ready_port="$2"
  cat <<EOF
.:53 {
    bind ${REAL_NODE_IP}
    errors
    health 127.0.0.1:${health_port}
    ready 127.0.0.1:${ready_port}
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig ${KUBECONFIG_PATH}
        pods insecure
        ttl 5
    }
    cache 5
}
EOF
}

# The Service pods use as their resolver, and its endpoint: CoreDNS on this machine.
render_dns_service() {
  cat <<EOF
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns, kubernetes.io/name: CoreDNS}
spec:
  clusterIP: ${REAL_NODE_DNS_IP}
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 53}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-local
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: finetune-dev-cluster}
addressType: IPv4
endpoints:
- addresses: [${REAL_NODE_IP}]
  conditions: {ready: true}
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
EOF
}

# -- processes --------------------------------------------------------------------------------

start_node_process() {
  local name="$1"; shift
  mkdir -p "${REAL_NODE_DIR}/pids" "${CLUSTER_DIR}/logs"
  nohup "$@" >> "${CLUSTER_DIR}/logs/${name}.log" 2>&1 < /dev/null &
  echo $! > "${REAL_NODE_DIR}/pids/${name}.pid"
}

wait_for() {
  local what="$1" seconds="$2" log_name="$3"; shift 3
  local waited
  for ((waited = 0; waited < seconds * 5; waited++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [[ -n "${log_name}" ]] && ! real_node_pid "${log_name}" >/dev/null; then
      log "${what}: ${log_name} exited; its log follows"
      tail -n "${FTO_LOG_LINES:-100}" "${CLUSTER_DIR}/logs/${log_name}.log" >&2 || true
      return 1
    fi
    sleep 0.2
  done
  log "${what}: not ready after ${seconds}s; the ${log_name} log follows"
  tail -n "${FTO_LOG_LINES:-100}" "${CLUSTER_DIR}/logs/${log_name}.log" >&2 || true
  return 1
}

stop_node_process() {
  local name="$1" pid waited
  pid="$(real_node_pid "${name}")" || { rm -f "${REAL_NODE_DIR}/pids/${name}.pid"; return 0; }
  kill "${pid}" 2>/dev/null || true
  for ((waited = 0; waited < 100; waited++)); do
    kill -0 "${pid}" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "${pid}" 2>/dev/null || true
  rm -f "${REAL_NODE_DIR}/pids/${name}.pid"
}

# The pause image every pod sandbox runs: busybox-static's sleep, in an image with nothing
# else, built here and imported (no registry holds one for this machine). Its busybox also makes
# it a shell for debugging (command: [/bin/busybox, sh, -c, ...]).
ensure_pause_image() {
  if ctr_node images ls -q | grep -qx "${REAL_NODE_PAUSE_IMAGE}"; then return 0; fi
  local build_dir="${REAL_NODE_DIR}/pause"
  mkdir -p "${build_dir}"
  cp /bin/busybox "${build_dir}/busybox"
  cat > "${build_dir}/Containerfile" <<'EOF'
FROM scratch
COPY busybox /bin/busybox
ENTRYPOINT ["/bin/busybox", "sleep", "2147483647"]
EOF
  podman build --quiet -t "${REAL_NODE_PAUSE_IMAGE}" "${build_dir}" >/dev/null
  podman save --format oci-archive -o "${build_dir}/pause.tar" "${REAL_NODE_PAUSE_IMAGE}" >/dev/null
  ctr_node images import "${build_dir}/pause.tar" >/dev/null
  rm -rf "${build_dir}"
}

# Imports an image into the node: an archive file (podman save --format oci-archive), or an
# image of podman's store by name, saved to a scratch archive unless the node already holds that
# name imported from the same podman image ID. (The node's own image ID, the config digest that
# pods report, differs from podman's when saving converts the image to the OCI format, so
# the podman ID is kept as a label of the node's image.) containerd keeps its images under
# ${FTO_CACHE}/containerd: a later cluster finds them imported.
load_image() {
  local image="$1" image_id archive
  [[ -S "${CONTAINERD_SOCKET}" ]] || { log "no real node is running"; return 1; }
  if [[ -f "${image}" ]]; then
    log "importing ${image}"
    ctr_node images import "${image}" >/dev/null
    return
  fi
  image_id="$(podman image inspect --format '{{.Id}}' "${image}")" || return 1
  if ctr_node images ls "name==${image}" 2>/dev/null | grep -q "${PODMAN_ID_LABEL}=${image_id}"; then
    log "${image} (podman ${image_id:0:12}) is in the node already"
    return 0
  fi
  local previous_id
  previous_id="$(node_image_id "${image}" 2>/dev/null)" || previous_id=""
  archive="${REAL_NODE_RUN}/import-$$.tar"
  log "importing ${image} (podman ${image_id:0:12}) into the node"
  podman save --quiet --format oci-archive -o "${archive}" "${image}" >/dev/null \
    && ctr_node images import "${archive}" >/dev/null \
    && ctr_node images label "${image}" "${PODMAN_ID_LABEL}=${image_id}" >/dev/null
  local status=$?
  rm -f "${archive}"
  # The image this name pointed at before (a trainer image is gigabytes): its last reference
  # goes, and containerd's garbage collector frees its layers unless a container uses them.
  if ((status == 0)) && [[ -n "${previous_id}" && "${previous_id}" != "$(node_image_id "${image}")" ]]; then
    ctr_node images rm "${previous_id}" >/dev/null 2>&1 || true
  fi
  return "${status}"
}

# Drops the node's images that no name points at any more (the CRI plugin keeps an ID-named
# reference for each image: left over when a name moved to a newer image).
prune_node_images() {
  local name current_ids=" "
  for name in $(ctr_node images ls -q | grep -v '^sha256:'); do
    current_ids+="$(node_image_id "${name}" 2>/dev/null) "
  done
  for name in $(ctr_node images ls -q | grep '^sha256:'); do
    [[ "${current_ids}" == *" ${name} "* ]] || ctr_node images rm "${name}" >/dev/null 2>&1 || true
  done
}

# The image ID (config digest) the node reports for the image named $1, as in a pod's
# status.containerStatuses[].imageID.
node_image_id() {
  local manifest
  manifest="$(ctr_node images ls "name==$1" | awk 'NR == 2 {print $3}')"
  [[ -n "${manifest}" ]] || { log "the node has no image $1"; return 1; }
  ctr_node content get "${manifest}" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["config"]["digest"])'
}

check_real_node_prerequisites() {
  local missing=() tool
  for tool in containerd ctr runc podman ip iptables busybox kubelet kube-proxy coredns; do
    command -v "${tool}" >/dev/null || missing+=("${tool}")
  done
  [[ -x /usr/lib/cni/bridge ]] || missing+=("/usr/lib/cni/bridge (containernetworking-plugins)")
  if [[ ${#missing[@]} -gt 0 ]]; then
    log "the real node needs: ${missing[*]}"
    log "apt-get install containerd runc podman containernetworking-plugins busybox-static iptables iproute2"
    return 1
  fi
  [[ "$(id -u)" == 0 ]] || { log "the real node needs root"; return 1; }
}

start_real_node() {
  check_real_node_prerequisites || return 1
  mkdir -p "${REAL_NODE_RUN}"
  if [[ -f "${REAL_NODE_RUN}/owner" && "$(<"${REAL_NODE_RUN}/owner")" != "${CLUSTER_NAME}" ]]; then
    local owner
    owner="$(<"${REAL_NODE_RUN}/owner")"
    if [[ -d "${KWOK_WORKDIR}/clusters/${owner}/node/pids" ]]; then
      log "the real node belongs to cluster ${owner}: FTO_CLUSTER_NAME=${owner} hack/dev-cluster down first"
      return 1
    fi
  fi
  echo "${CLUSTER_NAME}" > "${REAL_NODE_RUN}/owner"
  if real_node_pid kubelet >/dev/null; then
    log "real node ${REAL_NODE_NAME} is running"
    return 0
  fi
  log "starting real node ${REAL_NODE_NAME} (${REAL_NODE_IP}): containerd, kubelet, kube-proxy, CoreDNS"
  mkdir -p "${REAL_NODE_DIR}/cni" "${REAL_NODE_RUN}/containerd" "${KUBELET_ROOT}" "${CONTAINERD_ROOT}"
  # The node's address, reachable from the pods (through their bridge's gateway) and this host.
  if ! ip -4 addr show dev lo | grep -q "inet ${REAL_NODE_IP}/32"; then
    ip addr add "${REAL_NODE_IP}/32" dev lo
  fi
  # Pods reach ClusterIPs through this host; a Service backed by a pod is forwarded back out.
  echo 1 > /proc/sys/net/ipv4/ip_forward

  render_containerd_config > "${REAL_NODE_DIR}/containerd.toml"
  render_cni_config > "${REAL_NODE_DIR}/cni/10-fto-pods.conflist"
  : > "${REAL_NODE_DIR}/resolv.conf"
  start_node_process containerd containerd --config "${REAL_NODE_DIR}/containerd.toml"
  wait_for "containerd" 30 containerd ctr_node version || return 1
  ensure_pause_image || { log "could not build the pause image"; return 1; }
  prune_node_images

  local kubelet_port kubelet_healthz proxy_healthz proxy_metrics dns_health dns_ready
  kubelet_port="$(free_port)"; kubelet_healthz="$(free_port)"
  proxy_healthz="$(free_port)"; proxy_metrics="$(free_port)"
  dns_health="$(free_port)"; dns_ready="$(free_port)"
  render_kubelet_config "${kubelet_port}" "${kubelet_healthz}" > "${REAL_NODE_DIR}/kubelet.yaml"
  render_kube_proxy_config "${proxy_healthz}" "${proxy_metrics}" > "${REAL_NODE_DIR}/kube-proxy.yaml"
  render_corefile "${dns_health}" "${dns_ready}" > "${REAL_NODE_DIR}/Corefile"

  start_node_process kubelet "$(command -v kubelet)" --config "${REAL_NODE_DIR}/kubelet.yaml" \
    --kubeconfig "${KUBECONFIG_PATH}" --root-dir "${KUBELET_ROOT}" --cert-dir "${KUBELET_ROOT}/pki" \
    --hostname-override "${REAL_NODE_NAME}" --node-ip "${REAL_NODE_IP}" \
    --node-labels "${REAL_NODE_LABELS}"
  start_node_process kube-proxy "$(command -v kube-proxy)" --config "${REAL_NODE_DIR}/kube-proxy.yaml"
  kubectl_cluster apply -f - >/dev/null <<<"$(render_dns_service)"
  start_node_process coredns "$(command -v coredns)" -conf "${REAL_NODE_DIR}/Corefile"

  wait_for "kubelet" 60 kubelet curl -sf "http://127.0.0.1:${kubelet_healthz}/healthz" || return 1
  wait_for "kube-proxy" 60 kube-proxy curl -sf "http://127.0.0.1:${proxy_healthz}/healthz" || return 1
  wait_for "CoreDNS" 60 coredns curl -sf "http://127.0.0.1:${dns_ready}/ready" || return 1
  wait_for "node ${REAL_NODE_NAME} Ready" 120 kubelet \
    kubectl_cluster wait --for=condition=Ready "node/${REAL_NODE_NAME}" --timeout=1s || return 1
  log "real node ${REAL_NODE_NAME} is Ready"
}

# Everything start_real_node made, in reverse: pods first (so CNI tears their network down),
# then the processes, mounts, network namespaces, links and iptables chains.
stop_real_node() {
  [[ -d "${REAL_NODE_DIR}" || -f "${REAL_NODE_RUN}/owner" ]] || return 0
  if [[ -f "${REAL_NODE_RUN}/owner" && "$(<"${REAL_NODE_RUN}/owner")" != "${CLUSTER_NAME}" ]]; then
    return 0
  fi
  log "stopping real node ${REAL_NODE_NAME}"
  if real_node_pid kubelet >/dev/null && api_is_healthy; then
    kubectl_cluster cordon "${REAL_NODE_NAME}" >/dev/null 2>&1 || true
    kubectl_cluster delete pods --all-namespaces --field-selector "spec.nodeName=${REAL_NODE_NAME}" \
      --grace-period=1 --wait=false >/dev/null 2>&1 || true
    local waited
    for ((waited = 0; waited < 60; waited++)); do
      [[ -z "$(kubectl_cluster get pods -A --field-selector "spec.nodeName=${REAL_NODE_NAME}" -o name 2>/dev/null)" ]] && break
      sleep 1
    done
  fi
  stop_node_process coredns
  stop_node_process kube-proxy
  stop_node_process kubelet
  # Sandboxes the kubelet did not stop: stopped through containerd's CRI plugin would need a
  # CRI client; their tasks are killed here and their network namespaces removed below.
  if real_node_pid containerd >/dev/null; then
    local container
    for container in $(ctr_node tasks ls -q 2>/dev/null); do
      ctr_node tasks kill -s SIGKILL "${container}" >/dev/null 2>&1 || true
    done
    sleep 0.5
    for container in $(ctr_node containers ls -q 2>/dev/null); do
      ctr_node tasks delete -f "${container}" >/dev/null 2>&1 || true
      ctr_node containers delete "${container}" >/dev/null 2>&1 || true
    done
  fi
  stop_node_process containerd
  # containerd's shims outlive it by design: each one serving this node's socket is ours.
  local cmdline
  for cmdline in /proc/[0-9]*/cmdline; do
    if tr '\0' ' ' < "${cmdline}" 2>/dev/null | grep -q -- "containerd-shim-runc-v2 .*-address ${CONTAINERD_SOCKET}"; then
      cmdline="${cmdline#/proc/}"
      kill -9 "${cmdline%/cmdline}" 2>/dev/null || true
    fi
  done
  # Mounts under the node's run folder (sandbox /dev/shm, rootfs overlays, the kubelet's
  # secret and projected volumes), deepest first.
  local mount_point
  while read -r mount_point; do
    umount -l "${mount_point}" 2>/dev/null || true
  done < <(awk -v prefix="${REAL_NODE_RUN}/" 'index($5, prefix) == 1 {print $5}' /proc/self/mountinfo | sort -r)
  # Network namespaces made by containerd's CRI plugin for this node's pods.
  local netns
  for netns in $(ip netns list 2>/dev/null | awk '$1 ~ /^cni-/ {print $1}'); do
    ip netns delete "${netns}" 2>/dev/null || true
  done
  ip link delete "${REAL_NODE_BRIDGE}" 2>/dev/null || true
  ip addr del "${REAL_NODE_IP}/32" dev lo 2>/dev/null || true
  # The kubelet's device manager always makes this folder, whatever its root dir.
  rm -f /var/lib/kubelet/device-plugins/kubelet.sock
  rmdir /var/lib/kubelet/device-plugins /var/lib/kubelet 2>/dev/null || true
  # kube-proxy removes its own chains (KUBE-SERVICES, KUBE-POSTROUTING, ...); the kubelet's
  # and any left over (KUBE-FIREWALL, KUBE-KUBELET-CANARY, CNI-HOSTPORT-*) are removed after.
  kube-proxy --cleanup >/dev/null 2>&1 || true
  remove_node_iptables_chains
  rm -rf "${REAL_NODE_RUN}" "${REAL_NODE_DIR}"
}

# Deletes every rule that jumps to a KUBE-* or CNI-* chain, then those chains: iptables on this
# machine has no other user of these names (one real node at a time).
remove_node_iptables_chains() {
  local table chain rule
  for table in filter nat mangle; do
    while read -r rule; do
      # shellcheck disable=SC2086 # the rule is a list of arguments as iptables-save wrote it
      eval "iptables -t ${table} -D ${rule#-A }" 2>/dev/null || true
    done < <(iptables-save -t "${table}" 2>/dev/null | grep -E '^-A ' | grep -E -- '-j (KUBE|CNI)-' | grep -vE '^-A (KUBE|CNI)-')
    for chain in $(iptables-save -t "${table}" 2>/dev/null | awk '/^:(KUBE|CNI)-/ {print substr($1, 2)}'); do
      iptables -t "${table}" -F "${chain}" 2>/dev/null || true
    done
    for chain in $(iptables-save -t "${table}" 2>/dev/null | awk '/^:(KUBE|CNI)-/ {print substr($1, 2)}'); do
      iptables -t "${table}" -X "${chain}" 2>/dev/null || true
    done
  done
}
