//! A CRI client (the `k8s-cri` crate's `runtime.v1`, tonic over containerd's unix socket), with
//! helpers shaped like the kubelet's calls: pods on the node's network (no CNI here), one call
//! per CRI method, and waiting for a container to exit.
//!
//! ```no_run
//! # async fn demo(socket: &std::path::Path) -> anyhow::Result<()> {
//! use nixenv_testkit::cri::{ContainerSpec, Cri, PodSpec};
//! let mut cri = Cri::connect(socket).await?;
//! let pod = PodSpec::new("demo").handler("nixenv").annotation("nix.dev/environment", "acme/echoserver");
//! let pod_id = cri.run_pod(&pod).await?;
//! let spec = ContainerSpec::new("echoserver", "empty:latest").command(&["echoserver"]).env("PORT", "8080");
//! let id = cri.create_container(&pod_id, &pod, &spec).await?;
//! cri.start_container(&id).await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{self as cri, ContainerState};
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1 as api;

fn image_spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

/// The card's pod: handler `nixenv`, annotation `nix.dev/environment: acme/echoserver`.
pub fn card_pod() -> PodSpec {
    PodSpec::new("echoserver")
        .handler("nixenv")
        .annotation("nix.dev/environment", "acme/echoserver")
}

/// The card's container: `image: empty:latest`, `command: [echoserver]`, listening on `port`.
pub fn card_container(port: u16) -> ContainerSpec {
    ContainerSpec::new("echoserver", "empty:latest")
        .command(&["echoserver"])
        .env("PORT", &port.to_string())
}

/// A pod sandbox to run: name, annotations, runtime handler, log directory.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Pod name (metadata).
    pub name: String,
    /// Pod uid (metadata); unique per spec by default.
    pub uid: String,
    /// Kubernetes namespace (metadata).
    pub namespace: String,
    /// Pod annotations (`nix.dev/environment`, …).
    pub annotations: HashMap<String, String>,
    /// The runtime handler (RuntimeClass handler), empty for the default.
    pub handler: String,
    /// Where container logs go (the kubelet's `/var/log/pods/…`); `None`: no logs.
    pub log_directory: Option<PathBuf>,
    /// The node's PID namespace for the pod and its containers (`hostPID: true`).
    pub host_pid: bool,
    /// A user namespace for the pod (`hostUsers: false`): container ids from 0 are host ids
    /// from `.0`, `.1` of them (uids and gids alike).
    pub user_namespace: Option<(u32, u32)>,
}

impl PodSpec {
    /// A pod on the node's network with a fresh uid.
    pub fn new(name: &str) -> PodSpec {
        PodSpec {
            name: name.to_owned(),
            uid: format!("uid-{}-{:x}", name, rand::random::<u64>()),
            namespace: "default".to_owned(),
            annotations: HashMap::new(),
            handler: String::new(),
            log_directory: None,
            host_pid: false,
            user_namespace: None,
        }
    }

    /// Adds a pod annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Selects the runtime handler.
    pub fn handler(mut self, handler: &str) -> Self {
        self.handler = handler.to_owned();
        self
    }

    /// Runs the pod in the node's PID namespace (`hostPID: true`).
    pub fn host_pid(mut self) -> Self {
        self.host_pid = true;
        self
    }

    /// Gives the pod its own user namespace (`hostUsers: false`, CRI `userns_options` mode
    /// POD) mapping container ids 0.. to host ids `host_id`.., `length` of them, and its own
    /// network namespace (Kubernetes allows no user namespace with the node's network; the
    /// runtime then needs a CNI network: [`crate::cni::LoopbackNetwork`]).
    pub fn user_namespace(mut self, host_id: u32, length: u32) -> Self {
        self.user_namespace = Some((host_id, length));
        self
    }

    /// Sets the pod log directory.
    pub fn log_directory(mut self, dir: &Path) -> Self {
        self.log_directory = Some(dir.to_owned());
        self
    }

    /// The namespaces of the pod and its containers (the kubelet gives both the same).
    pub fn namespace_options(&self) -> cri::NamespaceOption {
        let userns_options = self.user_namespace.map(|(host_id, length)| {
            let ids = vec![cri::IdMapping {
                host_id,
                container_id: 0,
                length,
            }];
            cri::UserNamespace {
                mode: cri::NamespaceMode::Pod as i32,
                uids: ids.clone(),
                gids: ids,
            }
        });
        cri::NamespaceOption {
            network: if userns_options.is_some() {
                cri::NamespaceMode::Pod as i32
            } else {
                cri::NamespaceMode::Node as i32
            },
            userns_options,
            pid: if self.host_pid {
                cri::NamespaceMode::Node as i32
            } else {
                cri::NamespaceMode::Container as i32
            },
            ipc: cri::NamespaceMode::Pod as i32,
            ..Default::default()
        }
    }

    /// The CRI sandbox config (host network, as without CNI).
    pub fn config(&self) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            hostname: String::new(),
            log_directory: self
                .log_directory
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            annotations: self.annotations.clone(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(self.namespace_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// A container to create in a pod.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// Container name (metadata).
    pub name: String,
    /// Restart count (metadata `attempt`).
    pub attempt: u32,
    /// Image reference (`empty:latest`, `docker.io/nixenv/busybox:test`).
    pub image: String,
    /// `command` (entrypoint override).
    pub command: Vec<String>,
    /// `args`.
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Log path relative to the pod's log directory.
    pub log_path: Option<String>,
    /// Allocate a terminal.
    pub tty: bool,
    /// Keep stdin open.
    pub stdin: bool,
    /// Container annotations.
    pub annotations: HashMap<String, String>,
}

impl ContainerSpec {
    /// A container named `name` running `image`.
    pub fn new(name: &str, image: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.to_owned(),
            image: image.to_owned(),
            ..Default::default()
        }
    }

    /// Sets the command.
    pub fn command(mut self, cmd: &[&str]) -> Self {
        self.command = cmd.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Sets the args.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Sets the log path (relative to the pod log directory).
    pub fn log_path(mut self, path: &str) -> Self {
        self.log_path = Some(path.to_owned());
        self
    }

    /// Sets the restart attempt.
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    /// Allocates a terminal.
    pub fn tty(mut self, tty: bool) -> Self {
        self.tty = tty;
        self
    }

    /// The CRI container config.
    pub fn config(&self) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: self.name.clone(),
                attempt: self.attempt,
            }),
            image: Some(cri::ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            command: self.command.clone(),
            args: self.args.clone(),
            envs: self
                .env
                .iter()
                .map(|(k, v)| cri::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            log_path: self.log_path.clone().unwrap_or_default(),
            tty: self.tty,
            stdin: self.stdin,
            annotations: self.annotations.clone(),
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        }
    }
}

/// A CRI client for one containerd socket.
#[derive(Debug, Clone)]
pub struct Cri {
    /// The runtime service.
    pub runtime: RuntimeServiceClient<Channel>,
    /// The image service.
    pub images: ImageServiceClient<Channel>,
}

impl Cri {
    /// Connects to the CRI gRPC server on a unix socket.
    pub async fn connect(socket: &Path) -> anyhow::Result<Cri> {
        let path = socket.to_owned();
        let channel = Endpoint::try_from("http://[::]:50051")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await?;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// `Version`: the runtime's name and version.
    pub async fn version(&mut self) -> anyhow::Result<cri::VersionResponse> {
        Ok(self
            .runtime
            .version(cri::VersionRequest::default())
            .await?
            .into_inner())
    }

    /// `RunPodSandbox`; returns the sandbox id.
    pub async fn run_pod(&mut self, pod: &PodSpec) -> Result<String, tonic::Status> {
        let resp = self
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod.config()),
                runtime_handler: pod.handler.clone(),
            })
            .await?;
        Ok(resp.into_inner().pod_sandbox_id)
    }

    /// `StopPodSandbox`.
    pub async fn stop_pod(&mut self, pod_id: &str) -> Result<(), tonic::Status> {
        self.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod_id.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// `RemovePodSandbox` (removes its containers too).
    pub async fn remove_pod(&mut self, pod_id: &str) -> Result<(), tonic::Status> {
        self.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod_id.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// Stop then remove a pod, as the kubelet does when a pod is deleted.
    pub async fn delete_pod(&mut self, pod_id: &str) -> Result<(), tonic::Status> {
        self.stop_pod(pod_id).await?;
        self.remove_pod(pod_id).await
    }

    /// `PodSandboxStatus`.
    pub async fn pod_status(
        &mut self,
        pod_id: &str,
    ) -> Result<cri::PodSandboxStatus, tonic::Status> {
        let resp = self
            .runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod_id.to_owned(),
                verbose: false,
            })
            .await?;
        resp.into_inner()
            .status
            .ok_or_else(|| tonic::Status::not_found("no status"))
    }

    /// `PullImage` of `image` (as a kubelet with pull policy `Always`); the image's id.
    pub async fn pull_image(&mut self, image: &str) -> Result<String, tonic::Status> {
        let req = cri::PullImageRequest {
            image: Some(image_spec(image)),
            ..Default::default()
        };
        Ok(self.images.pull_image(req).await?.into_inner().image_ref)
    }

    /// `ImageStatus` of `image`: `None` when the runtime does not have it.
    pub async fn image_status(&mut self, image: &str) -> Result<Option<cri::Image>, tonic::Status> {
        let req = cri::ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        };
        Ok(self.images.image_status(req).await?.into_inner().image)
    }

    /// `CreateContainer`; the error is the runtime's (e.g. nixenv's one-line error).
    pub async fn create_container(
        &mut self,
        pod_id: &str,
        pod: &PodSpec,
        spec: &ContainerSpec,
    ) -> Result<String, tonic::Status> {
        let mut config = spec.config();
        if pod.host_pid || pod.user_namespace.is_some() {
            if let Some(linux) = config.linux.as_mut() {
                linux.security_context = Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(pod.namespace_options()),
                    ..Default::default()
                });
            }
        }
        let resp = self
            .runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.to_owned(),
                config: Some(config),
                sandbox_config: Some(pod.config()),
            })
            .await?;
        Ok(resp.into_inner().container_id)
    }

    /// `CreateContainer` then `StartContainer`, as a test that needs the container running does:
    /// panics on either failure with the runtime's message and `log()` (the containerd log).
    pub async fn create_and_start(
        &mut self,
        pod_id: &str,
        pod: &PodSpec,
        spec: &ContainerSpec,
        log: impl Fn() -> String,
    ) -> String {
        let id = match self.create_container(pod_id, pod, spec).await {
            Ok(id) => id,
            Err(e) => panic!("create: {}\n{}", e.message(), log()),
        };
        if let Err(e) = self.start_container(&id).await {
            panic!("start: {}\n{}", e.message(), log());
        }
        id
    }

    /// `StartContainer`.
    pub async fn start_container(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// `StopContainer` with a grace period in seconds.
    pub async fn stop_container(
        &mut self,
        id: &str,
        timeout_secs: i64,
    ) -> Result<(), tonic::Status> {
        self.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: id.to_owned(),
                timeout: timeout_secs,
            })
            .await?;
        Ok(())
    }

    /// `RemoveContainer`.
    pub async fn remove_container(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// `ContainerStatus`.
    pub async fn container_status(
        &mut self,
        id: &str,
    ) -> Result<cri::ContainerStatus, tonic::Status> {
        let resp = self
            .runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            })
            .await?;
        resp.into_inner()
            .status
            .ok_or_else(|| tonic::Status::not_found("no status"))
    }

    /// `ContainerStats`.
    pub async fn container_stats(
        &mut self,
        id: &str,
    ) -> Result<cri::ContainerStats, tonic::Status> {
        let resp = self
            .runtime
            .container_stats(cri::ContainerStatsRequest {
                container_id: id.to_owned(),
            })
            .await?;
        resp.into_inner()
            .stats
            .ok_or_else(|| tonic::Status::not_found("no stats"))
    }

    /// `UpdateContainerResources` (an in-place pod resize): the container's new Linux limits.
    pub async fn update_container_resources(
        &mut self,
        id: &str,
        linux: cri::LinuxContainerResources,
    ) -> Result<(), tonic::Status> {
        self.runtime
            .update_container_resources(cri::UpdateContainerResourcesRequest {
                container_id: id.to_owned(),
                linux: Some(linux),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Polls `ContainerStatus` until the container has exited (or `timeout`).
    pub async fn wait_exited(
        &mut self,
        id: &str,
        timeout: Duration,
    ) -> anyhow::Result<cri::ContainerStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.container_status(id).await?;
            if st.state == ContainerState::ContainerExited as i32 {
                return Ok(st);
            }
            if Instant::now() > deadline {
                anyhow::bail!("container {id} still {:?} after {timeout:?}", st.state);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `ExecSync`: runs `cmd` in the container without a terminal; stdout, stderr, exit code.
    pub async fn exec_sync(
        &mut self,
        id: &str,
        cmd: &[&str],
        timeout_secs: i64,
    ) -> Result<cri::ExecSyncResponse, tonic::Status> {
        let resp = self
            .runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.to_owned(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout_secs,
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// StartContainer as a kubelet whose request times out after `patience` makes it: whether
    /// it gave up (the start goes on in the runtime).
    pub async fn start_given_up(&self, id: &str, patience: Duration) -> bool {
        let mut cri = self.clone();
        let id = id.to_owned();
        tokio::time::timeout(patience, async move { cri.start_container(&id).await })
            .await
            .is_err()
    }

    /// [`Cri::exec_sync`] of a command that must succeed (10 s): its stdout. Panics with its
    /// output otherwise.
    pub async fn exec_ok(&mut self, id: &str, cmd: &[&str]) -> String {
        let r = self
            .exec_sync(id, cmd, 10)
            .await
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {}", e.message()));
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        assert_eq!(
            r.exit_code,
            0,
            "{cmd:?}: {out} {}",
            String::from_utf8_lossy(&r.stderr)
        );
        out
    }

    /// `Exec`: prepares a streaming exec and returns the streaming server URL (the kubelet
    /// then speaks SPDY to it; tests drive terminal execs with `ctr tasks exec --tty` instead).
    pub async fn exec(
        &mut self,
        id: &str,
        cmd: &[&str],
        tty: bool,
        stdin: bool,
    ) -> Result<String, tonic::Status> {
        let resp = self
            .runtime
            .exec(cri::ExecRequest {
                container_id: id.to_owned(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                tty,
                stdin,
                stdout: true,
                stderr: !tty,
            })
            .await?;
        Ok(resp.into_inner().url)
    }

    /// `ListContainers` of a pod (all states).
    pub async fn list_containers(
        &mut self,
        pod_id: &str,
    ) -> Result<Vec<cri::Container>, tonic::Status> {
        let resp = self
            .runtime
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    pod_sandbox_id: pod_id.to_owned(),
                    ..Default::default()
                }),
            })
            .await?;
        Ok(resp.into_inner().containers)
    }
}
