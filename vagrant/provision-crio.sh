#!/usr/bin/env bash
# Vagrant provisioner: kubeadm on CRI-O with the nixenv-runc runtime handler.
source /nixenv/vagrant/common.sh

node_prereqs
log "CRI-O"
add_repo cri-o "${NIXENV_CRIO_APT:-}"
apt-get update -qq
apt_install cri-o podman
systemctl enable --now crio
kubernetes_packages
install_nixenv                     # 10-nixenv.conf in crio.conf.d, empty:latest into CRI-O's storage
demo_environment
systemctl restart crio             # load the nixenv handler
nixenv doctor
cluster unix:///var/run/crio/crio.sock
