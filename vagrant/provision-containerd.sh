#!/usr/bin/env bash
# Vagrant provisioner: kubeadm on containerd (Debian's 1.6) with containerd-shim-nixenv-v2.
source /nixenv/vagrant/common.sh

node_prereqs
log "containerd"
apt_install containerd
if [ ! -s /etc/containerd/config.toml ] || ! grep -q SystemdCgroup /etc/containerd/config.toml; then
  # kubeadm configures the kubelet for the systemd cgroup driver: make runc match.
  containerd config default | sed 's/SystemdCgroup = false/SystemdCgroup = true/' >/etc/containerd/config.toml
fi
systemctl restart containerd
kubernetes_packages
install_nixenv                     # adds the nixenv runtime, imports empty:latest
demo_environment
systemctl restart containerd       # load the nixenv runtime
nixenv doctor
cluster unix:///run/containerd/containerd.sock
