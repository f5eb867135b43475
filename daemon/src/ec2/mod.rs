//! The ec2 provider: EBS snapshots in, AMIs out, through the EC2 API (aws-sdk-ec2).
//!
//! Its control plane is the EC2 API; its data plane, how a volume becomes a block device on
//! this host, is either `ebs` (AttachVolume, then the NVMe, Xen or SCSI node) or `loop`: files
//! under the state directory keyed by EC2 ids, attached as loop devices, so that every EC2 call
//! of a build is made for real (against an emulator such as moto) on a host without EBS.
//!
//! Every resource is tagged when it is made (`amidala:build`, `amidala:owner`, `amidala:host`:
//! this builder's instance id, see [`HOST_TAG`]),
//! every state change is awaited with [`wait::wait_for`], and a phase that fails part way
//! undoes what it made before returning. EC2 may not know an id for a while after it made it:
//! see [`consistency`].

pub mod boot;
pub mod consistency;
pub mod devices;
pub mod wait;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use amidala::proto::{validate_id, BuildSpec, ErrorCode, ImageInfo, SnapshotInfo, Source};
use anyhow::{anyhow, Context};
use async_trait::async_trait;
use aws_config::{retry::RetryConfig, BehaviorVersion, Region};
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, Filter, ImageState,
    ImdsSupportValues, LaunchPermission, LaunchPermissionModifications, ResourceType,
    SnapshotState, Tag, TagSpecification, VolumeAttachmentState, VolumeState, VolumeType,
};
use chrono::{DateTime, Utc};

use crate::catalog::{rfc3339, ImageRecord, SnapshotRecord};
use crate::config::{DataPlane, Ec2Config, Ec2Timeouts};
use crate::disk;
use crate::error::{blocking, Failure};
use crate::provider::{
    copy_to_new, grow, no_snapshot_tagged, not_yours, remove_if_present, Attachment, BootInstance,
    BootJob, BuildVolume, ImageMeta, Keep, Provider, SnapshotMeta, Viewer, Volume,
    FAILED_BUILD_TAG, NO_OWNER,
};
use consistency::{is_not_found, Made};
use devices::{DeviceAllocator, DeviceLease};
use wait::wait_for;

const GIB: u64 = 1 << 30;

/// The tag naming the builder that made a resource: its instance id. Host names are not unique
/// in a fleet (one image for every builder, overlapping VPC address ranges), so a builder that
/// collected by host name would take another's live volumes. An amidala before issue 16 put the
/// host name there: such resources are this builder's only if their build is in its catalog
/// ([`BuildVolume::by_host_name`]).
pub const HOST_TAG: &str = "amidala:host";

/// The size in GiB of an EBS volume made from a snapshot of `snapshot_size` bytes with the
/// requested `size`: whole GiB, at least the snapshot's and at least one.
fn volume_gib(snapshot_size: u64, size: Option<u64>) -> u64 {
    let snapshot_gib = snapshot_size.div_ceil(GIB).max(1);
    size.map_or(snapshot_gib, |s| s.div_ceil(GIB).max(snapshot_gib))
}

/// Turns an SDK error into a failure naming the call, with EC2's code and message.
fn cloud<E>(call: &'static str) -> impl FnOnce(aws_sdk_ec2::error::SdkError<E>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    move |e| {
        let detail = match (e.code(), e.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_owned(),
            _ => aws_sdk_ec2::error::DisplayErrorContext(&e).to_string(),
        };
        let code = if e.code() == Some("InvalidSnapshot.NotFound") {
            ErrorCode::NotFound
        } else {
            ErrorCode::Cloud
        };
        Failure::new(code, format!("{call}: {detail}"))
    }
}

fn tags_of(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_owned(),
                t.value().unwrap_or_default().to_owned(),
            ))
        })
        .collect()
}

fn tag_spec(kind: ResourceType, tags: &BTreeMap<String, String>) -> TagSpecification {
    let mut spec = TagSpecification::builder().resource_type(kind);
    for (k, v) in tags {
        spec = spec.tags(Tag::builder().key(k).value(v).build());
    }
    spec.build()
}

fn to_chrono(t: Option<&aws_sdk_ec2::primitives::DateTime>) -> DateTime<Utc> {
    t.and_then(|t| DateTime::from_timestamp(t.secs(), t.subsec_nanos()))
        .unwrap_or_default()
}

/// The newest of `snapshots`: latest StartTime, ties broken by the larger id.
pub fn newest(snapshots: &[aws_sdk_ec2::types::Snapshot]) -> Option<&aws_sdk_ec2::types::Snapshot> {
    snapshots.iter().max_by(|a, b| {
        let key = |s: &aws_sdk_ec2::types::Snapshot| {
            (
                s.start_time().map(|t| (t.secs(), t.subsec_nanos())),
                s.snapshot_id().map(str::to_owned),
            )
        };
        key(a).cmp(&key(b))
    })
}

/// The ec2 provider.
#[derive(Debug)]
pub struct Ec2Provider {
    client: aws_sdk_ec2::Client,
    sdk_config: aws_config::SdkConfig,
    region: String,
    instance_id: String,
    availability_zone: String,
    volume_type: String,
    root_device_name: String,
    ena_support: bool,
    require_imdsv2: bool,
    data_plane: DataPlane,
    /// Content of the loop data plane: `snapshots/` and `volumes/`, files named by EC2 ids.
    loop_dir: PathBuf,
    devices: Arc<DeviceAllocator>,
    timeouts: Ec2Timeouts,
    /// The volumes, snapshots and images this daemon made lately (eventual consistency).
    made: Made,
    /// This host's name, which older amidalas put in [`HOST_TAG`] (empty if unknown).
    host_name: String,
    boot: BootSettings,
    /// The subnet and security group of boot tests, once looked up.
    boot_net: tokio::sync::Mutex<Option<boot::BootNetwork>>,
}

/// How boot tests' instances are started (`boot_test_*` in `[ec2]`).
#[derive(Debug)]
struct BootSettings {
    instance_type: String,
    instance_type_arm64: String,
    subnet: Option<String>,
    security_group: Option<String>,
}

/// What an ec2 attachment holds until its detach has finished.
#[derive(Debug)]
struct Held {
    lease: DeviceLease,
    node: Option<PathBuf>,
}

/// An EC2 client whose requests are counted ([`wait::counted`]).
fn ec2_client(config: &aws_config::SdkConfig) -> aws_sdk_ec2::Client {
    aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::from(config)
            .interceptor(wait::CallCounter)
            .build(),
    )
}

impl Ec2Provider {
    /// Connects: region, credentials (the SDK's default chain: environment, profile, instance
    /// profile through IMDSv2), and this builder's instance id and availability zone.
    pub async fn new(config: &Ec2Config, state_dir: &Path) -> anyhow::Result<Ec2Provider> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).retry_config(
            RetryConfig::adaptive()
                .with_max_attempts(10)
                .with_initial_backoff(Duration::from_millis(100))
                .with_max_backoff(Duration::from_secs(5)),
        );
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk_config = loader.load().await;
        let region = sdk_config.region().map(|r| r.to_string()).ok_or_else(|| {
            anyhow!(
                "no AWS region: set region in the [ec2] section of amidalad.toml (or AWS_REGION)"
            )
        })?;
        let (instance_id, availability_zone) = match (
            &config.instance_id,
            &config.availability_zone,
        ) {
            (Some(id), Some(az)) => (id.clone(), az.clone()),
            (id, az) => {
                let imds = aws_config::imds::Client::builder()
                    .max_attempts(1)
                    .connect_timeout(Duration::from_secs(1))
                    .read_timeout(Duration::from_secs(1))
                    .build();
                let read = |path: &'static str| {
                    let imds = imds.clone();
                    async move {
                        imds.get(path).await.map(|v| v.as_ref().to_owned()).map_err(|e| {
                            anyhow!(
                                "cannot read {path} from the instance metadata service ({e}); this does not look like an EC2 instance: set instance_id and availability_zone in the [ec2] section of amidalad.toml"
                            )
                        })
                    }
                };
                let id = match id {
                    Some(id) => id.clone(),
                    None => read("/latest/meta-data/instance-id").await?,
                };
                let az = match az {
                    Some(az) => az.clone(),
                    None => read("/latest/meta-data/placement/availability-zone").await?,
                };
                (id, az)
            }
        };
        let data_plane = config.data_plane.unwrap_or(DataPlane::Ebs);
        let loop_dir = state_dir.join("ec2-loop");
        if data_plane == DataPlane::Loop {
            for sub in ["snapshots", "volumes"] {
                std::fs::create_dir_all(loop_dir.join(sub))
                    .with_context(|| format!("creating {}", loop_dir.join(sub).display()))?;
            }
        }
        let provider = Ec2Provider {
            client: ec2_client(&sdk_config),
            sdk_config,
            region,
            instance_id,
            availability_zone,
            volume_type: config.volume_type.clone().unwrap_or_else(|| "gp3".into()),
            root_device_name: config
                .root_device_name
                .clone()
                .unwrap_or_else(|| "/dev/xvda".into()),
            ena_support: config.ena_support.unwrap_or(true),
            require_imdsv2: config.require_imdsv2.unwrap_or(true),
            data_plane,
            loop_dir,
            devices: Arc::new(DeviceAllocator::new(
                config
                    .device_names
                    .clone()
                    .unwrap_or_else(devices::default_device_names),
            )),
            timeouts: config.timeouts.clone(),
            made: Made::new(Duration::from_secs(config.timeouts.consistency)),
            host_name: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            boot: BootSettings {
                instance_type: config
                    .boot_test_instance_type
                    .clone()
                    .unwrap_or_else(|| "t3.micro".into()),
                instance_type_arm64: config
                    .boot_test_instance_type_arm64
                    .clone()
                    .unwrap_or_else(|| "t4g.micro".into()),
                subnet: config.boot_test_subnet.clone(),
                security_group: config.boot_test_security_group.clone(),
            },
            boot_net: tokio::sync::Mutex::new(None),
        };
        // Fail at start, not in the first build, if the API or the instance is not reachable.
        provider
            .instance_mappings()
            .await
            .map_err(|e| anyhow!("checking instance {}: {}", provider.instance_id, e.message))?;
        tracing::info!(region = %provider.region, instance = %provider.instance_id, az = %provider.availability_zone, data_plane = ?provider.data_plane, "ec2 provider ready");
        Ok(provider)
    }

    fn loop_file(&self, kind: &str, id: &str) -> PathBuf {
        self.loop_dir.join(kind).join(format!("{id}.img"))
    }

    fn timeout(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// Device names the instance's block device mappings use.
    async fn instance_mappings(&self) -> Result<Vec<String>, Failure> {
        Ok(self
            .builder_instance()
            .await?
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.device_name().map(str::to_owned))
            .collect())
    }

    /// This builder's instance, as DescribeInstances says.
    async fn builder_instance(&self) -> Result<aws_sdk_ec2::types::Instance, Failure> {
        let out = self
            .client
            .describe_instances()
            .instance_ids(&self.instance_id)
            .send()
            .await
            .map_err(cloud("DescribeInstances"))?;
        let instance = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(self.instance_id.as_str()))
            .ok_or_else(|| {
                Failure::new(
                    ErrorCode::Cloud,
                    format!("instance {} not found", self.instance_id),
                )
            })?;
        Ok(instance.clone())
    }

    /// One snapshot, if EC2 knows it.
    async fn describe_snapshot(
        &self,
        snapshot_id: &str,
    ) -> Result<Option<aws_sdk_ec2::types::Snapshot>, Failure> {
        let out = match self
            .client
            .describe_snapshots()
            .snapshot_ids(snapshot_id)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if is_not_found(e.code()) => return Ok(None),
            Err(e) => return Err(cloud("DescribeSnapshots")(e)),
        };
        let found = out.snapshots().first().cloned();
        if found.is_some() {
            self.made.seen(snapshot_id);
        }
        Ok(found)
    }

    /// The volume's state and its attachment to this instance; `None` if EC2 does not know it.
    async fn volume_state(
        &self,
        volume_id: &str,
    ) -> Result<Option<(Option<VolumeState>, Option<VolumeAttachmentState>)>, Failure> {
        let out = match self
            .client
            .describe_volumes()
            .volume_ids(volume_id)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if is_not_found(e.code()) => return Ok(None),
            Err(e) => return Err(cloud("DescribeVolumes")(e)),
        };
        let Some(volume) = out.volumes().first() else {
            return Ok(None);
        };
        self.made.seen(volume_id);
        let attachment = volume
            .attachments()
            .iter()
            .find(|a| a.instance_id() == Some(self.instance_id.as_str()))
            .and_then(|a| a.state().cloned());
        Ok(Some((volume.state().cloned(), attachment)))
    }

    /// [`volume_state`](Self::volume_state) in a wait: a volume EC2 does not know is "not yet"
    /// if this daemon made it lately (`Ok(None)`), else an error.
    async fn polled_volume_state(
        &self,
        volume_id: &str,
    ) -> Result<Option<(Option<VolumeState>, Option<VolumeAttachmentState>)>, Failure> {
        match self.volume_state(volume_id).await? {
            Some(state) => Ok(Some(state)),
            None if self.made.not_yet(volume_id, false) => Ok(None),
            None => Err(Failure::new(
                ErrorCode::Cloud,
                format!("volume {volume_id} has disappeared"),
            )),
        }
    }

    async fn wait_volume_available(&self, volume_id: &str) -> Result<(), Failure> {
        wait_for(
            &format!("volume {volume_id} to become available"),
            Self::timeout(self.timeouts.volume_available),
            || async {
                match self.polled_volume_state(volume_id).await? {
                    Some((Some(VolumeState::Available), None)) => Ok(Some(())),
                    Some((Some(VolumeState::Error), _)) => Err(Failure::new(
                        ErrorCode::Cloud,
                        format!("volume {volume_id} is in state error"),
                    )),
                    _ => Ok(None),
                }
            },
        )
        .await
    }

    async fn wait_snapshot_completed(
        &self,
        snapshot_id: &str,
    ) -> Result<aws_sdk_ec2::types::Snapshot, Failure> {
        wait_for(
            &format!("snapshot {snapshot_id} to complete"),
            Self::timeout(self.timeouts.snapshot),
            || async {
                let snapshot = match self.describe_snapshot(snapshot_id).await? {
                    Some(snapshot) => snapshot,
                    None if self.made.not_yet(snapshot_id, false) => return Ok(None),
                    None => {
                        return Err(Failure::new(
                            ErrorCode::Cloud,
                            format!("snapshot {snapshot_id} has disappeared"),
                        ))
                    }
                };
                match snapshot.state() {
                    Some(SnapshotState::Completed) => Ok(Some(snapshot)),
                    Some(SnapshotState::Error) => Err(Failure::new(
                        ErrorCode::Cloud,
                        format!(
                            "snapshot {snapshot_id} failed: {}",
                            snapshot.state_message().unwrap_or("state error")
                        ),
                    )),
                    _ => Ok(None),
                }
            },
        )
        .await
    }

    /// CreateVolume, tagged, and waits until it is available; a volume that does not become
    /// available is deleted.
    async fn new_volume(
        &self,
        snapshot: Option<&str>,
        size_gib: i32,
        tags: &BTreeMap<String, String>,
    ) -> Result<String, Failure> {
        let mut call = self
            .client
            .create_volume()
            .availability_zone(&self.availability_zone)
            .volume_type(VolumeType::from(self.volume_type.as_str()))
            .size(size_gib)
            .tag_specifications(tag_spec(ResourceType::Volume, tags));
        if let Some(snapshot) = snapshot {
            call = call.snapshot_id(snapshot);
        }
        let volume_id = call
            .send()
            .await
            .map_err(cloud("CreateVolume"))?
            .volume_id()
            .unwrap_or_default()
            .to_owned();
        if volume_id.is_empty() {
            return Err(Failure::new(
                ErrorCode::Cloud,
                "CreateVolume answered without a volume id",
            ));
        }
        self.made.made(&volume_id);
        if let Err(e) = self.wait_volume_available(&volume_id).await {
            self.delete_volume_id(&volume_id).await;
            return Err(e);
        }
        Ok(volume_id)
    }

    /// DeleteVolume, logging rather than failing: used while undoing.
    async fn delete_volume_id(&self, volume_id: &str) {
        if let Err(e) = self.delete_volume_now(volume_id).await {
            tracing::error!(volume = volume_id, error = %e, "could not delete a volume; amidala gc will find it by its tags");
        }
    }

    /// DeleteVolume (a volume EC2 no longer knows is done, see [`consistency`]), and its file.
    async fn delete_volume_now(&self, volume_id: &str) -> Result<(), Failure> {
        self.delete_made(volume_id, "DeleteVolume", || {
            self.client.delete_volume().volume_id(volume_id).send()
        })
        .await?;
        if self.data_plane == DataPlane::Loop {
            let path = self.loop_file("volumes", volume_id);
            blocking(move || remove_if_present(&path)).await?;
        }
        Ok(())
    }

    /// Sends `call`, an EC2 call naming `id`, again while EC2 answers NotFound for an id this
    /// daemon made lately (see [`consistency`]); after that a NotFound is an error.
    async fn call_made<T, E, F, Fut>(
        &self,
        id: &str,
        name: &'static str,
        call: F,
    ) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, aws_sdk_ec2::error::SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        self.send_made(id, name, false, call)
            .await?
            .ok_or_else(|| Failure::new(ErrorCode::Internal, format!("{name} of {id}: no answer")))
    }

    /// A delete through [`send_made`](Self::send_made): NotFound of an id EC2 was seen to know,
    /// or no longer within the window, means it is gone (done). Never cancelled: it undoes.
    async fn delete_made<T, E, F, Fut>(
        &self,
        id: &str,
        name: &'static str,
        call: F,
    ) -> Result<(), Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, aws_sdk_ec2::error::SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        if wait::uncancellable(self.send_made(id, name, true, call))
            .await?
            .is_none()
        {
            tracing::info!(
                id,
                call = name,
                "EC2 does not know it (any more): taken as deleted"
            );
        }
        self.made.forget(id);
        Ok(())
    }

    /// Sends `call` until its answer is not a NotFound that [`Made::not_yet`] takes for "not
    /// yet". `Ok(None)`: NotFound that means gone (only when `deleting`).
    async fn send_made<T, E, F, Fut>(
        &self,
        id: &str,
        name: &'static str,
        deleting: bool,
        mut call: F,
    ) -> Result<Option<T>, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, aws_sdk_ec2::error::SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        // A second past the window: the last try comes after it.
        let window = self.made.not_yet_for(id, deleting) + Duration::from_secs(1);
        wait_for(&format!("EC2 to know {id} ({name})"), window, || {
            let sent = call();
            async move {
                match sent.await {
                    Ok(out) => {
                        self.made.seen(id);
                        Ok(Some(Some(out)))
                    }
                    Err(e) if is_not_found(e.code()) && self.made.not_yet(id, deleting) => {
                        tracing::debug!(id, call = name, "not known to EC2 yet");
                        Ok(None)
                    }
                    Err(e) if is_not_found(e.code()) && deleting => Ok(Some(None)),
                    Err(e) => Err(cloud(name)(e)),
                }
            }
        })
        .await
    }

    /// Attaches `volume_id` at a free device name and waits for it: the block device node
    /// (`ebs`) or the volume's file (`loop`). Undoes itself on failure.
    async fn attach_volume(&self, volume_id: &str) -> Result<(PathBuf, Held), Failure> {
        let mapped = self.instance_mappings().await?;
        let lease = self
            .devices
            .allocate(&mapped, |n| Path::new(n).exists())
            .ok_or_else(|| Failure::new(ErrorCode::Cloud, "no free device name to attach a volume at (all of ec2.device_names are in use)"))?;
        self.client
            .attach_volume()
            .volume_id(volume_id)
            .instance_id(&self.instance_id)
            .device(&lease.name)
            .send()
            .await
            .map_err(cloud("AttachVolume"))?;
        let held = Held { lease, node: None };
        match self.finish_attach(volume_id, &held.lease.name).await {
            Ok(path) => Ok((
                path.clone(),
                Held {
                    node: (self.data_plane == DataPlane::Ebs).then_some(path),
                    ..held
                },
            )),
            Err(e) => {
                if let Err(undo) = self.detach_volume(volume_id, None).await {
                    tracing::error!(volume = volume_id, error = %undo, "undoing a failed attach");
                }
                drop(held);
                Err(e)
            }
        }
    }

    async fn finish_attach(&self, volume_id: &str, device_name: &str) -> Result<PathBuf, Failure> {
        wait_for(
            &format!("volume {volume_id} to attach"),
            Self::timeout(self.timeouts.attach),
            || async {
                Ok(matches!(
                    self.polled_volume_state(volume_id).await?,
                    Some((_, Some(VolumeAttachmentState::Attached)))
                )
                .then_some(()))
            },
        )
        .await?;
        match self.data_plane {
            DataPlane::Loop => Ok(self.loop_file("volumes", volume_id)),
            DataPlane::Ebs => {
                wait_for(
                    &format!("the block device of volume {volume_id} ({device_name}) to appear"),
                    Self::timeout(self.timeouts.device),
                    || async {
                        Ok(devices::find_device(
                            Path::new("/sys/block"),
                            Path::new("/dev"),
                            volume_id,
                            device_name,
                        ))
                    },
                )
                .await
            }
        }
    }

    /// DetachVolume (always naming the instance: never a forced or ambiguous detach) and waits
    /// until the volume is available and its node is gone.
    /// Detaches and waits for it, whatever was cancelled: this undoes and tears down.
    async fn detach_volume(&self, volume_id: &str, node: Option<&Path>) -> Result<(), Failure> {
        wait::uncancellable(self.detach_volume_now(volume_id, node)).await
    }

    async fn detach_volume_now(&self, volume_id: &str, node: Option<&Path>) -> Result<(), Failure> {
        let sent = self
            .client
            .detach_volume()
            .volume_id(volume_id)
            .instance_id(&self.instance_id)
            .send()
            .await;
        match sent {
            Ok(_) => {}
            // A detach already under way (one sent before a crash lands late, or EC2 is
            // already detaching): wait for it like for ours.
            Err(e)
                if matches!(
                    e.code(),
                    Some("IncorrectState" | "InvalidAttachment.NotFound")
                ) =>
            {
                tracing::info!(volume = volume_id, code = ?e.code(), "the volume is already detaching or detached");
            }
            Err(e) => return Err(cloud("DetachVolume")(e)),
        }
        self.wait_volume_available(volume_id)
            .await
            .map_err(|mut f| {
                if f.code == ErrorCode::Timeout {
                    f.message = format!("{} (detaching)", f.message);
                }
                f
            })?;
        if let Some(node) = node {
            let node = node.to_owned();
            wait_for(
                &format!("{} to go away", node.display()),
                Self::timeout(self.timeouts.device),
                || {
                    let gone = !node.exists();
                    async move { Ok(gone.then_some(())) }
                },
            )
            .await?;
        }
        Ok(())
    }

    /// CreateSnapshot with tags on create, waits for it, and (loop plane) stores the volume's
    /// content under the snapshot's id.
    async fn snapshot_volume(
        &self,
        volume_id: &str,
        meta: &SnapshotMeta,
    ) -> Result<SnapshotRecord, Failure> {
        let out = self
            .client
            .create_snapshot()
            .volume_id(volume_id)
            .description(&meta.description)
            .tag_specifications(tag_spec(ResourceType::Snapshot, &meta.tags))
            .send()
            .await
            .map_err(cloud("CreateSnapshot"))?;
        let snapshot_id = out.snapshot_id().unwrap_or_default().to_owned();
        if snapshot_id.is_empty() {
            return Err(Failure::new(
                ErrorCode::Cloud,
                "CreateSnapshot answered without a snapshot id",
            ));
        }
        self.made.made(&snapshot_id);
        if self.data_plane == DataPlane::Loop {
            // EBS takes the point-in-time copy at CreateSnapshot; so does the loop plane.
            let (src, dst) = (
                self.loop_file("volumes", volume_id),
                self.loop_file("snapshots", &snapshot_id),
            );
            blocking(move || {
                let file = File::open(&src)
                    .map_err(|e| Failure::io(format!("opening {}", src.display()), e))?;
                copy_to_new(&file, &dst, 0o600, Keep::Durable)
                    .map_err(|e| Failure::io("storing the snapshot's content", e))?;
                Ok(())
            })
            .await?;
        }
        match self.wait_snapshot_completed(&snapshot_id).await {
            Ok(snapshot) => Ok(self.record_of(&snapshot)),
            Err(mut f) => {
                // It may complete later: marked so that no build takes it for a source.
                if let Some(build) = &meta.build_id {
                    let tags = [(FAILED_BUILD_TAG.to_owned(), build.clone())].into();
                    let tagged = wait::uncancellable(self.tag_snapshot(&snapshot_id, &tags));
                    if let Err(e) = tagged.await {
                        tracing::error!(snapshot = %snapshot_id, error = %e, "tagging the snapshot of a failed build");
                    }
                }
                f.message = format!(
                    "{} (snapshot {snapshot_id} was started; it is kept, tagged {FAILED_BUILD_TAG})",
                    f.message
                );
                Err(f)
            }
        }
    }

    fn record_of(&self, s: &aws_sdk_ec2::types::Snapshot) -> SnapshotRecord {
        let tags = tags_of(s.tags());
        SnapshotRecord {
            id: s.snapshot_id().unwrap_or_default().to_owned(),
            created: to_chrono(s.start_time()),
            size: s.volume_size().map_or(0, |g| g as u64 * GIB),
            // A snapshot made outside amidala belongs to no user of it: builds start from it by
            // tag only once an admin has published it.
            owner_uid: amidala::proto::owner_uid(&tags).unwrap_or(NO_OWNER),
            build_id: tags.get("amidala:build").cloned(),
            source_snapshot: tags.get("amidala:source-snapshot").cloned(),
            tags,
        }
    }

    /// Adds `tags` to a volume, snapshot or image (sent again while EC2 does not know an id
    /// this daemon just made).
    async fn tag_resource(&self, id: &str, tags: &BTreeMap<String, String>) -> Result<(), Failure> {
        let tags: Vec<Tag> = tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        self.call_made(id, "CreateTags", || {
            self.client
                .create_tags()
                .resources(id)
                .set_tags(Some(tags.clone()))
                .send()
        })
        .await?;
        Ok(())
    }

    fn resource_tags(&self, build_or_job: &str, owner: &str) -> BTreeMap<String, String> {
        [
            ("amidala:build".to_owned(), build_or_job.to_owned()),
            (amidala::proto::OWNER_TAG.to_owned(), owner.to_owned()),
            (HOST_TAG.to_owned(), self.instance_id.clone()),
        ]
        .into()
    }

    /// The values of [`HOST_TAG`] that may be this builder's, each with whether it is the host
    /// name an older amidala used (its resources need another proof of being this builder's).
    fn host_tag_values(&self) -> Vec<(&str, bool)> {
        let mut values = vec![(self.instance_id.as_str(), false)];
        if !self.host_name.is_empty() && self.host_name != self.instance_id {
            values.push((self.host_name.as_str(), true));
        }
        values
    }

    /// Shares the image with `share_with` and copies it (tagged `tags`) to `copy_to`.
    async fn share_and_copy(
        &self,
        image_id: &str,
        name: &str,
        description: &str,
        copy_to: &[String],
        share_with: &[String],
        tags: &BTreeMap<String, String>,
    ) -> Result<(), Failure> {
        if !share_with.is_empty() {
            let mut permissions = LaunchPermissionModifications::builder();
            for account in share_with {
                permissions = permissions.add(LaunchPermission::builder().user_id(account).build());
            }
            self.client
                .modify_image_attribute()
                .image_id(image_id)
                .launch_permission(permissions.build())
                .send()
                .await
                .map_err(cloud("ModifyImageAttribute"))?;
        }
        let copies = futures::future::join_all(
            copy_to
                .iter()
                .map(|region| self.copy_image(image_id, name, description, region, tags)),
        )
        .await;
        for (region, copy) in copy_to.iter().zip(copies) {
            let copy = copy.map_err(|mut f| {
                f.message = format!("copying {image_id} to {region}: {}", f.message);
                f
            })?;
            tracing::info!(image = %image_id, %region, copy = %copy, "image copied");
        }
        Ok(())
    }

    /// Copies the image to `region` and tags the copy.
    async fn copy_image(
        &self,
        image_id: &str,
        name: &str,
        description: &str,
        region: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<String, Failure> {
        let config = self
            .sdk_config
            .to_builder()
            .region(Region::new(region.to_owned()))
            .build();
        let client = ec2_client(&config);
        // Tagged on creation: no CreateTags on an id EC2 may not know yet.
        let copy = client
            .copy_image()
            .source_image_id(image_id)
            .source_region(&self.region)
            .name(name)
            .description(description)
            .tag_specifications(tag_spec(ResourceType::Image, tags))
            .send()
            .await
            .map_err(cloud("CopyImage"))?;
        Ok(copy.image_id().unwrap_or_default().to_owned())
    }
}

#[async_trait]
impl Provider for Ec2Provider {
    fn name(&self) -> &'static str {
        "ec2"
    }

    fn check_options(&self, spec: &BuildSpec) -> Result<(), Failure> {
        // The AMI boots with the boot mode it is registered with: a firmware it will not be
        // registered for is refused now, not after the build.
        if let Some(test) = &spec.boot_test {
            boot::firmware_of(
                spec.boot_mode.as_deref(),
                spec.arch.as_deref(),
                test.firmware.as_deref(),
            )?;
        }
        Ok(())
    }

    fn volume_size(&self, snapshot_size: u64, size: Option<u64>) -> u64 {
        volume_gib(snapshot_size, size) * GIB
    }

    async fn resolve(&self, source: &Source, viewer: Viewer) -> Result<SnapshotRecord, Failure> {
        match source {
            Source::Snapshot(id) => {
                validate_id("snap", id)?;
                let snapshot = self
                    .describe_snapshot(id)
                    .await?
                    .filter(|s| {
                        let record = self.record_of(s);
                        viewer.may_use(record.owner_uid, &record.tags)
                    })
                    .ok_or_else(|| not_yours("snapshot", id))?;
                if snapshot.state() != Some(&SnapshotState::Completed) {
                    return Err(Failure::invalid(format!(
                        "snapshot {id} is {}, not completed",
                        snapshot
                            .state()
                            .map_or("in an unknown state", |s| s.as_str())
                    )));
                }
                Ok(self.record_of(&snapshot))
            }
            Source::Tag(tag) => {
                let mut found = Vec::new();
                let mut pages = self
                    .client
                    .describe_snapshots()
                    .owner_ids("self")
                    .filters(
                        Filter::builder()
                            .name(format!("tag:{}", tag.key))
                            .values(&tag.value)
                            .build(),
                    )
                    .filters(Filter::builder().name("status").values("completed").build())
                    .into_paginator()
                    .send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(cloud("DescribeSnapshots"))?;
                    found.extend(
                        page.snapshots()
                            .iter()
                            .filter(|s| s.state() == Some(&SnapshotState::Completed))
                            .filter(|s| {
                                let record = self.record_of(s);
                                viewer.resolves_to(record.owner_uid, &record.tags)
                            })
                            .cloned(),
                    );
                }
                newest(&found).map(|s| self.record_of(s)).ok_or_else(|| {
                    no_snapshot_tagged(tag, &format!(" (completed, in {})", self.region))
                })
            }
        }
    }

    async fn create_volume(
        &self,
        snapshot: &SnapshotRecord,
        size: Option<u64>,
        build_id: &str,
        owner: &str,
    ) -> Result<Volume, Failure> {
        let size_gib = volume_gib(snapshot.size, size);
        let size_gib = i32::try_from(size_gib)
            .map_err(|_| Failure::invalid(format!("volume size {size_gib} GiB is too large")))?;
        if self.data_plane == DataPlane::Loop && !self.loop_file("snapshots", &snapshot.id).exists()
        {
            return Err(Failure::invalid(format!(
                "snapshot {} has no content in the loop data plane (only snapshots made by this daemon with data_plane = \"loop\" do)",
                snapshot.id
            )));
        }
        let volume_id = self
            .new_volume(
                Some(&snapshot.id),
                size_gib,
                &self.resource_tags(build_id, owner),
            )
            .await?;
        if self.data_plane == DataPlane::Loop {
            let (src, dst) = (
                self.loop_file("snapshots", &snapshot.id),
                self.loop_file("volumes", &volume_id),
            );
            let copied = blocking(move || {
                let file = File::open(&src)
                    .map_err(|e| Failure::io(format!("opening {}", src.display()), e))?;
                copy_to_new(&file, &dst, 0o600, Keep::Durable)
                    .map_err(|e| Failure::io("making the volume's content", e))?;
                grow(&dst, Some(size_gib as u64 * GIB))
            })
            .await;
            if let Err(e) = copied {
                self.delete_volume_id(&volume_id).await;
                return Err(e);
            }
        }
        Ok(Volume { id: volume_id })
    }

    async fn attach(&self, volume: &Volume, partition: Option<u32>) -> Result<Attachment, Failure> {
        let (path, held) = self.attach_volume(&volume.id).await?;
        let node = held.node.clone();
        match blocking(move || Attachment::root_of(&path, partition)).await {
            Ok(mut attachment) => {
                attachment.extra = Some(Box::new(held));
                Ok(attachment)
            }
            Err(e) => {
                if let Err(undo) = self.detach_volume(&volume.id, node.as_deref()).await {
                    tracing::error!(volume = %volume.id, error = %undo, "undoing a failed attach");
                }
                Err(e)
            }
        }
    }

    async fn detach(&self, volume: &Volume, attachment: Attachment) -> Result<(), Failure> {
        let extra = blocking(move || attachment.release_loop()).await?;
        let held = extra.and_then(|e| e.downcast::<Held>().ok());
        let node = held.as_ref().and_then(|h| h.node.clone());
        let result = self.detach_volume(&volume.id, node.as_deref()).await;
        // The device name is free again only now that the detach has finished.
        drop(held);
        result
    }

    async fn snapshot(
        &self,
        volume: &Volume,
        meta: SnapshotMeta,
    ) -> Result<SnapshotRecord, Failure> {
        self.snapshot_volume(&volume.id, &meta).await
    }

    async fn register(
        &self,
        snapshot: &SnapshotRecord,
        meta: ImageMeta,
    ) -> Result<ImageRecord, Failure> {
        let arch = meta.architecture.as_deref().unwrap_or("x86_64");
        let mut call = self
            .client
            .register_image()
            .name(&meta.name)
            .description(&meta.description)
            .architecture(ArchitectureValues::from(arch))
            .root_device_name(&self.root_device_name)
            .block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(&self.root_device_name)
                    .ebs(
                        EbsBlockDevice::builder()
                            .snapshot_id(&snapshot.id)
                            .volume_type(VolumeType::from(self.volume_type.as_str()))
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            )
            .virtualization_type("hvm")
            .ena_support(self.ena_support);
        if let Some(mode) = &meta.boot_mode {
            call = call.boot_mode(BootModeValues::from(mode.as_str()));
        }
        if self.require_imdsv2 {
            call = call.imds_support(ImdsSupportValues::V20);
        }
        let mut tags = meta.tags.clone();
        tags.insert("amidala:snapshot".into(), snapshot.id.clone());
        // Tagged on creation: no CreateTags on an id EC2 may not know yet.
        let image_id = call
            .tag_specifications(tag_spec(ResourceType::Image, &tags))
            .send()
            .await
            .map_err(cloud("RegisterImage"))?
            .image_id()
            .unwrap_or_default()
            .to_owned();
        if image_id.is_empty() {
            return Err(Failure::new(
                ErrorCode::Cloud,
                "RegisterImage answered without an image id",
            ));
        }
        self.made.made(&image_id);
        let available = wait_for(
            &format!("image {image_id} to become available"),
            Self::timeout(self.timeouts.image),
            || async {
                let out = match self
                    .client
                    .describe_images()
                    .image_ids(&image_id)
                    .send()
                    .await
                {
                    Err(e) if is_not_found(e.code()) && self.made.not_yet(&image_id, false) => {
                        return Ok(None)
                    }
                    out => out.map_err(cloud("DescribeImages"))?,
                };
                let state = out.images().first().and_then(|i| i.state());
                if state.is_some() {
                    self.made.seen(&image_id);
                }
                match state {
                    Some(ImageState::Available) => Ok(Some(())),
                    Some(ImageState::Failed | ImageState::Invalid | ImageState::Error) => {
                        Err(Failure::new(
                            ErrorCode::Cloud,
                            format!("image {image_id} failed to register"),
                        ))
                    }
                    _ => Ok(None),
                }
            },
        )
        .await;
        if let Err(f) = available {
            // Undone: an image that may yet become available, of a build that failed.
            if let Err(e) = self.deregister_image(&image_id).await {
                tracing::error!(image = %image_id, error = %e, "undoing a failed registration");
            }
            return Err(f);
        }
        self.share_and_copy(
            &image_id,
            &meta.name,
            &meta.description,
            &meta.copy_to,
            &meta.share_with,
            &tags,
        )
        .await?;
        Ok(ImageRecord {
            id: image_id,
            name: meta.name,
            created: Utc::now(),
            tags,
            snapshot_id: snapshot.id.clone(),
            build_id: meta.build_id,
            owner_uid: meta.owner_uid,
        })
    }

    async fn delete_volume(&self, volume: Volume) -> Result<(), Failure> {
        self.delete_volume_now(&volume.id).await
    }

    async fn import_image(
        &self,
        staged: PathBuf,
        meta: SnapshotMeta,
    ) -> Result<SnapshotRecord, Failure> {
        let result = self.import_staged(&staged, meta).await;
        let _ = std::fs::remove_file(&staged);
        result
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, Failure> {
        let mut out: Vec<SnapshotInfo> = Vec::new();
        // amidala's own snapshots, and those made outside it that an admin published (two
        // queries: one filter's values are alternatives on EC2, not on every emulator).
        for key in [amidala::proto::OWNER_TAG, amidala::proto::PUBLISHED_TAG] {
            let mut pages = self
                .client
                .describe_snapshots()
                .owner_ids("self")
                .filters(Filter::builder().name("tag-key").values(key).build())
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                for s in page.map_err(cloud("DescribeSnapshots"))?.snapshots() {
                    let record = self.record_of(s);
                    if out.iter().any(|o| o.id == record.id) {
                        continue;
                    }
                    out.push(SnapshotInfo {
                        path: self
                            .snapshot_path(&record.id)
                            .map(|p| p.display().to_string()),
                        id: record.id,
                        created: rfc3339(&record.created),
                        size: record.size,
                        tags: record.tags,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>, Failure> {
        let out = self
            .client
            .describe_images()
            .owners("self")
            .filters(
                Filter::builder()
                    .name("tag-key")
                    .values("amidala:build")
                    .build(),
            )
            .send()
            .await
            .map_err(cloud("DescribeImages"))?;
        let mut images: Vec<ImageInfo> = out
            .images()
            .iter()
            .map(|i| {
                let tags = tags_of(i.tags());
                ImageInfo {
                    id: i.image_id().unwrap_or_default().to_owned(),
                    name: i.name().unwrap_or_default().to_owned(),
                    created: i.creation_date().unwrap_or_default().to_owned(),
                    snapshot_id: tags.get("amidala:snapshot").cloned().unwrap_or_default(),
                    build_id: tags.get("amidala:build").cloned(),
                    tags,
                }
            })
            .collect();
        images.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        Ok(images)
    }

    async fn image_named(&self, name: &str) -> Result<Option<String>, Failure> {
        // Any of the account's images in the region, amidala's or not: RegisterImage refuses
        // a name one of them has.
        let out = self
            .client
            .describe_images()
            .owners("self")
            .filters(Filter::builder().name("name").values(name).build())
            .send()
            .await
            .map_err(cloud("DescribeImages"))?;
        Ok(out
            .images()
            .iter()
            .find_map(|i| i.image_id().map(str::to_owned)))
    }

    fn snapshot_path(&self, snapshot_id: &str) -> Option<PathBuf> {
        (self.data_plane == DataPlane::Loop).then(|| self.loop_file("snapshots", snapshot_id))
    }

    async fn build_volumes(&self) -> Result<Vec<BuildVolume>, Failure> {
        // Files of the loop plane first: each file's volume was made before it, so a file
        // read now whose volume is not listed next has lost its volume.
        let files = if self.data_plane == DataPlane::Loop {
            let dir = self.loop_dir.join("volumes");
            blocking(move || {
                let entries = std::fs::read_dir(&dir)
                    .map_err(|e| Failure::io(format!("reading {}", dir.display()), e))?;
                Ok(entries
                    .filter_map(|e| {
                        e.ok()?
                            .file_name()
                            .to_str()?
                            .strip_suffix(".img")
                            .map(str::to_owned)
                    })
                    .collect::<Vec<_>>())
            })
            .await?
        } else {
            Vec::new()
        };
        let mut found: Vec<BuildVolume> = Vec::new();
        // One query per value: one filter's values are alternatives on EC2, not on every
        // emulator.
        for (host, by_host_name) in self.host_tag_values() {
            let mut pages = self
                .client
                .describe_volumes()
                .filters(
                    Filter::builder()
                        .name(format!("tag:{HOST_TAG}"))
                        .values(host)
                        .build(),
                )
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                for v in page.map_err(cloud("DescribeVolumes"))?.volumes() {
                    let tags = tags_of(v.tags());
                    let id = v.volume_id().unwrap_or_default();
                    if tags.get(HOST_TAG).map(String::as_str) != Some(host)
                        || found.iter().any(|f| f.id == id)
                    {
                        continue;
                    }
                    // Made lately (before a restart, say): EC2 may still answer NotFound for it.
                    if let Some(made) = v.create_time() {
                        let age = Utc::now() - to_chrono(Some(made));
                        self.made.made_ago(id, age.to_std().unwrap_or_default());
                    }
                    let state = v.state().map_or("unknown", |s| s.as_str());
                    found.push(BuildVolume {
                        id: id.to_owned(),
                        build: tags.get("amidala:build").cloned(),
                        // A boot test's instance's own: it goes with the instance.
                        state: if tags.get(boot::ROLE_TAG).map(String::as_str)
                            == Some(boot::BOOT_TEST_ROLE)
                        {
                            format!("{} ({state})", boot::BOOT_VOLUME)
                        } else {
                            state.to_owned()
                        },
                        by_host_name,
                    });
                }
            }
        }
        for id in files {
            if !found.iter().any(|v| v.id == id) {
                found.push(BuildVolume {
                    id,
                    build: None,
                    state: "file without a volume".into(),
                    by_host_name: false,
                });
            }
        }
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }

    async fn reclaim_volume(&self, volume: &BuildVolume) -> Result<(), Failure> {
        if volume.state.starts_with(boot::BOOT_VOLUME) {
            return self.reclaim_boot_volume(&volume.id).await;
        }
        if volume.state != "file without a volume" {
            // One EC2 no longer knows is deleted below as one that is gone.
            match self.volume_state(&volume.id).await? {
                Some((_, Some(_))) => self.detach_volume(&volume.id, None).await?,
                Some((Some(VolumeState::Creating), None)) => {
                    self.wait_volume_available(&volume.id).await?
                }
                _ => {}
            }
        }
        self.delete_volume_now(&volume.id).await
    }

    async fn adopt_volume(
        &self,
        volume: Volume,
        build_id: &str,
        owner: &str,
    ) -> Result<Volume, Failure> {
        self.tag_resource(&volume.id, &self.resource_tags(build_id, owner))
            .await?;
        Ok(volume)
    }

    async fn tag_snapshot(&self, id: &str, tags: &BTreeMap<String, String>) -> Result<(), Failure> {
        self.tag_resource(id, tags).await
    }

    async fn untag_snapshot(&self, id: &str, key: &str) -> Result<(), Failure> {
        self.call_made(id, "DeleteTags", || {
            self.client
                .delete_tags()
                .resources(id)
                .tags(Tag::builder().key(key).build())
                .send()
        })
        .await?;
        Ok(())
    }

    async fn tag_image(&self, id: &str, tags: &BTreeMap<String, String>) -> Result<(), Failure> {
        self.tag_resource(id, tags).await
    }

    async fn deregister_image(&self, id: &str) -> Result<(), Failure> {
        self.delete_made(id, "DeregisterImage", || {
            self.client.deregister_image().image_id(id).send()
        })
        .await
    }

    fn boots_images(&self) -> bool {
        true
    }

    async fn boot_image(&self, job: BootJob<'_>) -> Result<String, Failure> {
        self.boot_test(job).await
    }

    async fn publish_image(
        &self,
        image: &ImageRecord,
        description: &str,
        copy_to: &[String],
        share_with: &[String],
    ) -> Result<(), Failure> {
        self.share_and_copy(
            &image.id,
            &image.name,
            description,
            copy_to,
            share_with,
            &image.tags,
        )
        .await
    }

    async fn boot_instances(&self) -> Result<Vec<BootInstance>, Failure> {
        self.host_boot_instances().await
    }

    async fn reclaim_instance(&self, instance: &BootInstance) -> Result<(), Failure> {
        self.terminate(&instance.id, false).await.map(drop)
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), Failure> {
        self.delete_made(id, "DeleteSnapshot", || {
            self.client.delete_snapshot().snapshot_id(id).send()
        })
        .await?;
        if self.data_plane == DataPlane::Loop {
            let path = self.loop_file("snapshots", id);
            blocking(move || remove_if_present(&path)).await?;
        }
        Ok(())
    }
}

impl Ec2Provider {
    /// `base import` on EC2: an empty volume of the image's size, attached, the image written
    /// to it, detached, snapshotted, deleted.
    async fn import_staged(
        &self,
        staged: &Path,
        meta: SnapshotMeta,
    ) -> Result<SnapshotRecord, Failure> {
        let len = std::fs::metadata(staged)
            .map_err(|e| Failure::io("reading the staged image", e))?
            .len();
        let size_gib = i32::try_from(len.div_ceil(GIB).max(1))
            .map_err(|_| Failure::invalid("the image is too large"))?;
        let job = crate::ids::new_id("import");
        let owner = meta.tags.get("amidala:owner").cloned().unwrap_or_default();
        let volume_id = self
            .new_volume(None, size_gib, &self.resource_tags(&job, &owner))
            .await?;
        let result = async {
            let (target, held) = self.attach_volume(&volume_id).await?;
            let (src, dst) = (staged.to_owned(), target.clone());
            let loop_plane = self.data_plane == DataPlane::Loop;
            let written = blocking(move || {
                let file =
                    File::open(&src).map_err(|e| Failure::io("opening the staged image", e))?;
                if loop_plane {
                    copy_to_new(&file, &dst, 0o600, Keep::Durable)
                        .map_err(|e| Failure::io("writing the volume", e))?;
                    grow(&dst, Some(size_gib as u64 * GIB))
                } else {
                    // A new EBS volume reads as zeros: only the data regions need writing.
                    let out = OpenOptions::new()
                        .write(true)
                        .open(&dst)
                        .map_err(|e| Failure::io(format!("opening {}", dst.display()), e))?;
                    disk::copy_data(&file, &out)
                        .map_err(|e| Failure::io(format!("writing {}", dst.display()), e))
                }
            })
            .await;
            let detached = self.detach_volume(&volume_id, held.node.as_deref()).await;
            drop(held);
            written?;
            detached?;
            self.snapshot_volume(&volume_id, &meta).await
        }
        .await;
        self.delete_volume_id(&volume_id).await;
        result
    }
}
