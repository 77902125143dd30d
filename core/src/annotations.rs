//! The annotation names nixenv reads from a container's spec: its own (`nix.dev/…`) and the
//! ones containerd's CRI and CRI-O set. A leaf: it imports nothing of the crate.

/// The annotation naming the environment.
pub const ENVIRONMENT_ANNOTATION: &str = "nix.dev/environment";
/// Comma-separated container names left untouched.
pub const SKIP_CONTAINERS_ANNOTATION: &str = "nix.dev/skip-containers";
/// containerd CRI: `sandbox` or `container`.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI-O: `sandbox` or `container`.
pub const CRIO_CONTAINER_TYPE: &str = "io.kubernetes.cri-o.ContainerType";
/// containerd CRI: the container's name in the pod.
pub const CRI_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
/// CRI-O (and the kubelet's labels): the container's name in the pod.
pub const K8S_CONTAINER_NAME: &str = "io.kubernetes.container.name";
