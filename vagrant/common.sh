# Shared steps of the Vagrant provisioners (sourced; run as root inside the VM).
# shellcheck shell=bash
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SRC=/nixenv
DEMO=/var/lib/nixenv-demo
DEMO_PORT=8099

log() { echo "==> $*"; }

apt_install() { apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }

# Adds an upstream apt repository given by its base URL (flat `/` distribution, Release.key).
add_repo() {
  local name=$1 url=$2
  [ -n "$url" ] || { echo "set the apt repository URL for $name (see vagrant/Vagrantfile)" >&2; exit 1; }
  install -d -m 0755 /etc/apt/keyrings
  curl -fsSL "$url/Release.key" | gpg --batch --yes --dearmor -o "/etc/apt/keyrings/$name.gpg"
  echo "deb [signed-by=/etc/apt/keyrings/$name.gpg] $url /" >"/etc/apt/sources.list.d/$name.list"
}

node_prereqs() {
  log "node prerequisites"
  swapoff -a
  sed -i '/\sswap\s/ s/^/#/' /etc/fstab
  printf 'overlay\nbr_netfilter\n' >/etc/modules-load.d/k8s.conf
  modprobe overlay
  modprobe br_netfilter
  printf 'net.ipv4.ip_forward = 1\nnet.bridge.bridge-nf-call-iptables = 1\nnet.bridge.bridge-nf-call-ip6tables = 1\n' \
    >/etc/sysctl.d/k8s.conf
  sysctl --system >/dev/null
  apt-get update -qq
  apt_install ca-certificates curl gpg jq python3 runc containernetworking-plugins \
    nix-bin busybox-static patchelf gcc libc6-dev
  # Debian installs the CNI plugins in /usr/lib/cni; runtimes look in /opt/cni/bin.
  install -d /opt/cni/bin
  for p in /usr/lib/cni/*; do ln -sf "$p" /opt/cni/bin/; done
  install -d /etc/cni/net.d
  cat >/etc/cni/net.d/10-bridge.conflist <<'JSON'
{
  "cniVersion": "1.0.0",
  "name": "nixenv-demo",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
}

kubernetes_packages() {
  log "kubeadm, kubelet, kubectl"
  add_repo kubernetes "${NIXENV_K8S_APT:-}"
  apt-get update -qq
  apt_install kubelet kubeadm kubectl
  apt-mark hold kubelet kubeadm kubectl >/dev/null
}

# The nixenv package built on the host (packaging/build).
install_nixenv() {
  log "nixenv package"
  local deb
  deb=$(ls -t /nixenv-packages/nixenv_*.deb 2>/dev/null | head -n1)
  [ -n "$deb" ] || { echo "no nixenv_*.deb in the packages folder: run packaging/build first" >&2; exit 1; }
  dpkg -i "$deb" || apt-get -f install -y -qq
}

# Builds the fixture environment (acme/echoserver) with Nix, serves its signed cache and catalog
# on 127.0.0.1:$DEMO_PORT and points nixenv at them.
demo_environment() {
  log "demo environment acme/echoserver (built with Nix, served on 127.0.0.1:$DEMO_PORT)"
  sh "$SRC/tests/fixtures/build.sh" "$DEMO" >/dev/null
  local manifest=$DEMO/fixtures.json catalog cache key
  catalog=$(jq -r .catalog "$manifest")
  cache=$(jq -r .caches.xz "$manifest")
  key=$(jq -r .keys.trusted.public "$manifest")
  systemd-run --unit nixenv-demo-http --collect -p Restart=always \
    python3 -m http.server "$DEMO_PORT" --bind 127.0.0.1 --directory "$DEMO" >/dev/null 2>&1 ||
    systemctl restart nixenv-demo-http || true
  cat >/etc/nixenv/config.toml <<TOML
# Written by the Vagrant provisioner: the demo environment served from $DEMO.
catalog = "http://127.0.0.1:$DEMO_PORT/${catalog#"$DEMO"/}"
substituters = ["http://127.0.0.1:$DEMO_PORT/${cache#"$DEMO"/}"]
trusted-public-keys = ["$key"]
TOML
}

# kubeadm init on this node, then the RuntimeClass and the echoserver pod.
cluster() {
  local cri_socket=$1
  log "kubeadm init ($cri_socket)"
  if [ ! -f /etc/kubernetes/admin.conf ]; then
    kubeadm init --cri-socket "$cri_socket" --pod-network-cidr 10.244.0.0/16 \
      --ignore-preflight-errors NumCPU,Mem >/var/log/kubeadm-init.log
  fi
  export KUBECONFIG=/etc/kubernetes/admin.conf
  for home in /root /home/vagrant; do
    [ -d "$home" ] || continue
    install -d -m 0700 "$home/.kube"
    cp /etc/kubernetes/admin.conf "$home/.kube/config"
    chown -R "$(stat -c %u:%g "$home")" "$home/.kube"
  done
  kubectl wait --for=condition=Ready "node/$(hostname)" --timeout=5m
  kubectl taint nodes --all node-role.kubernetes.io/control-plane- 2>/dev/null || true
  kubectl label node "$(hostname)" nix.dev/enabled=true --overwrite
  log "RuntimeClass nixenv and the echoserver pod"
  kubectl apply -f "$SRC/runtimeclass/runtimeclass.yaml"
  kubectl delete pod echoserver --ignore-not-found
  kubectl apply -f "$SRC/runtimeclass/pod.yaml"
  kubectl wait --for=condition=Ready pod/echoserver --timeout=10m || {
    kubectl describe pod echoserver
    exit 1
  }
  local ip port
  ip=$(kubectl get pod echoserver -o jsonpath='{.status.podIP}')
  port=$(kubectl get pod echoserver -o jsonpath='{.spec.containers[0].ports[0].containerPort}')
  log "echoserver answers on $ip:${port:-8080}:"
  curl -fsS "http://$ip:${port:-8080}/" | jq .
}
