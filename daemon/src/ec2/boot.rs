//! The ec2 provider's boot test: an instance of the registered AMI, watched until it shows
//! that it booted, and terminated whatever happens.
//!
//! 1. The AMI is described (it must be `available`); the firmware EC2 boots it with follows
//!    from its boot mode ([`firmware_of`]), and the instance type from its architecture
//!    (`boot_test_instance_type`, `boot_test_instance_type_arm64`).
//! 2. The network: `boot_test_subnet`, else the builder instance's own subnet; the security
//!    group `boot_test_security_group`, else one per builder, `amidala-boot-test-INSTANCE`
//!    (the builder's instance id), in the subnet's VPC, made on first use without inbound or outbound rules (the test reads
//!    only the serial console, and a user's image is not to reach the fleet's network) and
//!    found again by name and VPC afterwards. One per builder rather than one per test: a group
//!    cannot be deleted while the terminated instance's network interface still holds it
//!    (minutes after the termination), so a group per test would be a second thing to
//!    clean up after every test and after every crash.
//! 3. RunInstances: one instance in that subnet and group, IMDSv2 required, a shutdown from
//!    inside terminating it, no instance profile, a client token derived from the build (a
//!    retried request starts no second instance), the instance and its volumes tagged with
//!    the build, owner and builder (and `amidala:role = boot-test`) on creation, so that recovery
//!    and `amidala gc` find it whatever happens to the daemon.
//! 4. Waits for `running` (DescribeInstances), then polls, together, the status checks
//!    (DescribeInstanceStatus: instance and system status `ok`) and the serial console
//!    (GetConsoleOutput, latest output, base64): new console lines go to the build's log as
//!    `console: …`, read for the boot signal and the signs of a failed boot as the local boot
//!    test reads QEMU's console ([`crate::bootvm::read_sign`]). It passes once the status
//!    checks pass and the console has shown the signal; it fails on a sign of failure,
//!    impaired status checks, an instance that ends, or the time limit, with the console's
//!    last lines.
//! 5. TerminateInstances, always (passed, failed, errors, cancelled: outside the test's own
//!    future), then a bounded wait for `terminated`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use amidala::proto::ErrorCode;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    ArchitectureValues, BootModeValues, Filter, HttpTokensState, ImageState,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, InstanceStateName, InstanceType,
    ResourceType, ShutdownBehavior, SummaryStatus, TagSpecification, VolumeState,
};
use tokio::time::Instant;

use super::{cloud, tag_spec, tags_of, wait, Ec2Provider, HOST_TAG};
use crate::bootvm::{clean, read_sign, with_tail, Firmware, Sign, TAIL_LINES};
use crate::error::Failure;
use crate::provider::{BootInstance, BootJob};
use wait::wait_for;

/// The tag that marks what a boot test made (its value: `boot-test`).
pub const ROLE_TAG: &str = "amidala:role";
pub const BOOT_TEST_ROLE: &str = "boot-test";
/// How a boot test's instance's volume is listed among the host's build volumes.
pub const BOOT_VOLUME: &str = "root volume of a boot-test instance";

/// What the network of boot tests is, once looked up.
#[derive(Debug, Clone)]
pub struct BootNetwork {
    pub subnet: String,
    pub group: String,
}

/// The firmware EC2 boots an AMI of `boot_mode` and `arch` with, checked against the firmware a
/// test asks for (`--boot-firmware`): EC2 boots an image only with its own boot mode.
pub fn firmware_of(
    boot_mode: Option<&str>,
    arch: Option<&str>,
    asked: Option<&str>,
) -> Result<Firmware, Failure> {
    let (firmware, why) = match boot_mode {
        Some("legacy-bios") => (Firmware::Bios, "registered with --boot-mode legacy-bios"),
        Some("uefi") => (Firmware::Uefi, "registered with --boot-mode uefi"),
        // Every instance type amidala starts by default (t3, t4g) boots UEFI.
        Some("uefi-preferred") => (Firmware::Uefi, "registered with --boot-mode uefi-preferred"),
        Some(other) => {
            return Err(Failure::invalid(format!(
                "the image's boot mode {other:?} is not one amidala knows"
            )))
        }
        None if arch == Some("arm64") => (
            Firmware::Uefi,
            "registered without a boot mode: EC2 boots arm64 images with UEFI",
        ),
        None => (
            Firmware::Bios,
            "registered without a boot mode: EC2 boots x86_64 images with legacy BIOS",
        ),
    };
    if let Some(list) = asked {
        let asked = Firmware::parse_list(list)
            .map_err(|why| Failure::invalid(format!("--boot-firmware: {why}")))?;
        if asked != [firmware] {
            return Err(Failure::invalid(format!(
                "--boot-firmware {list}: on EC2 an image boots only with the firmware of its \
                 boot mode, here {} ({why}); register it with --boot-mode {} to test that",
                firmware.name(),
                match asked.iter().find(|f| **f != firmware) {
                    Some(Firmware::Uefi) => "uefi",
                    _ => "legacy-bios",
                }
            )));
        }
    }
    Ok(firmware)
}

/// The client token of the instance of `job`'s boot test: the same on every retry of the
/// request, at most 64 characters.
fn client_token(job: &str) -> String {
    let mut token = format!("amidala-boot-test-{job}");
    token.truncate(64);
    token
}

/// A name for a security group made of `builder`: what EC2 takes in a name, the rest `-`.
fn group_name(builder: &str) -> String {
    let builder: String = builder
        .chars()
        .take(200)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("amidala-boot-test-{builder}")
}

/// Decodes standard base64 (GetConsoleOutput's encoding), skipping white space.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        if c == b'=' {
            break;
        }
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The serial console as GetConsoleOutput shows it, read poll after poll: each answer holds the
/// whole output (its last 64 KiB), of which only the lines not seen before are new.
#[derive(Debug, Default)]
pub(crate) struct Console {
    /// The complete lines of the last answer.
    seen: String,
    /// The last lines shown, for the error of a failed test.
    pub(crate) tail: VecDeque<String>,
    pub(crate) booted: bool,
    /// A line without its end yet that was shown (a prompt): not shown again.
    partial: Option<String>,
}

impl Console {
    /// Reads one answer: new lines to `log` (as `console: …`), and what they say of the boot.
    pub(crate) fn feed(
        &mut self,
        output: &str,
        marker: Option<&str>,
        log: &(dyn Fn(String) + Sync),
    ) -> Option<Sign> {
        let end = output.rfind('\n').map_or(0, |i| i + 1);
        let (complete, partial) = output.split_at(end);
        // The output's start moves on once it passes 64 KiB: what is new follows the longest
        // end of the last answer that it starts with (all of it, if none).
        let starts = std::iter::once(0).chain(self.seen.match_indices('\n').map(|(i, _)| i + 1));
        let new = starts
            .filter_map(|at| complete.strip_prefix(&self.seen[at..]))
            .next()
            .unwrap_or(complete);
        let mut sign = None;
        let shown = self.partial.take();
        for (n, line) in new.lines().enumerate() {
            let text = clean(line.as_bytes());
            sign = sign.or_else(|| read_sign(&text, marker));
            if n == 0 && shown.as_deref().is_some_and(|s| text.starts_with(s)) {
                continue;
            }
            self.show(text, log);
        }
        // A prompt ends without a newline: shown once it says something.
        if sign.is_none() && !partial.is_empty() {
            let text = clean(partial.as_bytes());
            sign = read_sign(&text, marker);
            if sign.is_some() {
                if shown.as_deref() != Some(text.as_str()) {
                    self.show(text.clone(), log);
                }
                self.partial = Some(text);
            }
        }
        self.seen = complete.to_owned();
        if sign == Some(Sign::Booted) {
            self.booted = true;
        }
        sign
    }

    fn show(&mut self, text: String, log: &(dyn Fn(String) + Sync)) {
        if text.trim().is_empty() {
            return;
        }
        log(format!("console: {text}"));
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(text);
    }
}

/// The poll state of a boot being watched.
#[derive(Debug, Default)]
struct Watch {
    console: Console,
    status_ok: bool,
    /// Whether GetConsoleOutput takes `Latest` (Nitro instances do; others refuse it).
    latest: bool,
}

impl Ec2Provider {
    /// The boot test of `job` (see the module's documentation).
    pub(super) async fn boot_test(&self, job: BootJob<'_>) -> Result<String, Failure> {
        let image = self.available_image(job.image_id).await?;
        let arch = image.architecture().map(ArchitectureValues::as_str);
        let firmware = firmware_of(
            image.boot_mode().map(BootModeValues::as_str),
            arch,
            job.test.firmware.as_deref(),
        )?;
        let instance_type = if arch == Some("arm64") {
            self.boot.instance_type_arm64.clone()
        } else {
            self.boot.instance_type.clone()
        };
        let network = self.boot_network().await?;
        let limit = Duration::from_secs(job.test.timeout.unwrap_or(job.default_timeout));
        let what = format!("ec2 {instance_type}, {}", firmware.name());
        let started = Instant::now();
        let instance = self.launch(&job, &instance_type, &network).await?;
        (job.console)(format!(
            "amidala: boot test ({what}): instance {instance} of {} started in {}",
            job.image_id, network.subnet
        ));
        let watched = tokio::select! {
            watched = wait::cancellable(
                job.cancel.clone(),
                self.watch(&instance, &job, started, limit),
            ) => watched,
            () = job.cancel.cancelled() => Err(Failure::new(ErrorCode::Cancelled, "cancelled")),
        };
        // Always, whatever the test did: the instance runs a user's image and costs money.
        match wait::uncancellable(self.terminate(&instance, true)).await {
            Ok(ended) => (job.console)(format!("amidala: boot test: instance {instance} {ended}")),
            Err(e) => {
                tracing::error!(%instance, error = %e, "terminating a boot test's instance");
                (job.console)(format!(
                    "amidala: warning: could not terminate the boot test's instance {instance} \
                     ({}); amidala gc terminates it",
                    e.message
                ));
            }
        }
        let seconds = watched.map_err(|mut f| {
            if f.code == ErrorCode::BootTestFailed {
                f.message = format!("boot test ({what}) failed: {}", f.message);
            }
            f
        })?;
        (job.console)(format!(
            "amidala: boot test ({what}) passed in {seconds:.1} s"
        ));
        Ok(format!(
            "ec2 {instance_type} {} {seconds:.1}s",
            firmware.name()
        ))
    }

    /// The image, once it is available.
    async fn available_image(&self, id: &str) -> Result<aws_sdk_ec2::types::Image, Failure> {
        let out = self
            .client
            .describe_images()
            .image_ids(id)
            .send()
            .await
            .map_err(cloud("DescribeImages"))?;
        let image = out.images().first().cloned().ok_or_else(|| {
            Failure::new(ErrorCode::NotFound, format!("image {id} does not exist"))
        })?;
        if image.state() != Some(&ImageState::Available) {
            return Err(Failure::invalid(format!(
                "image {id} is {}, not available",
                image.state().map_or("in an unknown state", |s| s.as_str())
            )));
        }
        Ok(image)
    }

    /// The subnet and security group of boot tests, looked up (and the group made) once.
    async fn boot_network(&self) -> Result<BootNetwork, Failure> {
        let mut known = self.boot_net.lock().await;
        if let Some(network) = &*known {
            return Ok(network.clone());
        }
        let (subnet, vpc) = match &self.boot.subnet {
            Some(subnet) => {
                let out = self
                    .client
                    .describe_subnets()
                    .subnet_ids(subnet)
                    .send()
                    .await
                    .map_err(cloud("DescribeSubnets"))?;
                let vpc = out
                    .subnets()
                    .first()
                    .and_then(|s| s.vpc_id())
                    .ok_or_else(|| {
                        Failure::invalid(format!("[ec2] boot_test_subnet {subnet}: no such subnet"))
                    })?;
                (subnet.clone(), vpc.to_owned())
            }
            None => {
                let builder = self.builder_instance().await?;
                match (builder.subnet_id(), builder.vpc_id()) {
                    (Some(subnet), Some(vpc)) => (subnet.to_owned(), vpc.to_owned()),
                    _ => {
                        return Err(Failure::new(
                            ErrorCode::Cloud,
                            format!(
                                "the builder instance {} has no subnet to start boot tests in: \
                                 set boot_test_subnet in the [ec2] section of amidalad.toml",
                                self.instance_id
                            ),
                        ))
                    }
                }
            }
        };
        let group = match &self.boot.security_group {
            Some(group) => group.clone(),
            None => self.host_group(&vpc).await?,
        };
        tracing::info!(%subnet, %group, "boot tests' network");
        let network = BootNetwork { subnet, group };
        *known = Some(network.clone());
        Ok(network)
    }

    /// This builder's security group of boot tests in `vpc`: found by its name, else made
    /// without rules. One found with inbound rules is refused; one found with outbound rules
    /// (its maker stopped before it took them) has them taken first.
    async fn host_group(&self, vpc: &str) -> Result<String, Failure> {
        let name = group_name(&self.instance_id);
        for attempt in 0..2 {
            let out = self
                .client
                .describe_security_groups()
                .filters(Filter::builder().name("group-name").values(&name).build())
                .filters(Filter::builder().name("vpc-id").values(vpc).build())
                .send()
                .await
                .map_err(cloud("DescribeSecurityGroups"))?;
            if let Some(group) = out.security_groups().first() {
                let id = group.group_id().unwrap_or_default().to_owned();
                if !group.ip_permissions().is_empty() {
                    return Err(Failure::new(
                        ErrorCode::Cloud,
                        format!(
                            "security group {id} ({name}) has inbound rules: amidala's boot-test \
                             group must have none (remove them, or name another group in \
                             boot_test_security_group)"
                        ),
                    ));
                }
                // Made by a daemon that stopped (or was refused) before it took the default
                // rule that lets everything out: taken now, before the group is used.
                if self
                    .close_egress(&id, group.ip_permissions_egress().to_vec())
                    .await?
                {
                    tracing::warn!(group = %id, %name, "took the outbound rules of the boot tests' security group");
                }
                return Ok(id);
            }
            if attempt == 1 {
                break;
            }
            let mut tags: BTreeMap<String, String> = [
                (HOST_TAG.to_owned(), self.instance_id.clone()),
                (ROLE_TAG.to_owned(), BOOT_TEST_ROLE.to_owned()),
            ]
            .into();
            tags.insert("Name".into(), name.clone());
            let made = self
                .client
                .create_security_group()
                .group_name(&name)
                .description(
                    "amidala boot tests: no inbound or outbound rules (the test reads the serial \
                     console only)",
                )
                .vpc_id(vpc)
                .tag_specifications(tag_spec(ResourceType::SecurityGroup, &tags))
                .send()
                .await;
            let id = match made {
                Ok(out) => out.group_id().unwrap_or_default().to_owned(),
                // Made meanwhile (by another daemon of this builder): found next time round.
                Err(e) if e.code() == Some("InvalidGroup.Duplicate") => continue,
                Err(e) => return Err(cloud("CreateSecurityGroup")(e)),
            };
            // A new group lets everything out: nothing of the test needs the network.
            let out = self
                .client
                .describe_security_groups()
                .group_ids(&id)
                .send()
                .await
                .map_err(cloud("DescribeSecurityGroups"))?;
            let egress: Vec<_> = out
                .security_groups()
                .iter()
                .flat_map(|g| g.ip_permissions_egress())
                .cloned()
                .collect();
            self.close_egress(&id, egress).await?;
            tracing::info!(group = %id, %name, vpc, "made the security group of boot tests");
            return Ok(id);
        }
        Err(Failure::new(
            ErrorCode::Cloud,
            format!("security group {name} was made and then not found"),
        ))
    }

    /// Revokes the group's outbound rules `egress`; returns whether it had any.
    async fn close_egress(
        &self,
        id: &str,
        egress: Vec<aws_sdk_ec2::types::IpPermission>,
    ) -> Result<bool, Failure> {
        if egress.is_empty() {
            return Ok(false);
        }
        self.client
            .revoke_security_group_egress()
            .group_id(id)
            .set_ip_permissions(Some(egress))
            .send()
            .await
            .map_err(cloud("RevokeSecurityGroupEgress"))?;
        Ok(true)
    }

    /// RunInstances of the test's image; returns the instance id.
    async fn launch(
        &self,
        job: &BootJob<'_>,
        instance_type: &str,
        network: &BootNetwork,
    ) -> Result<String, Failure> {
        let mut tags = self.resource_tags(job.job_id, job.owner);
        tags.insert(ROLE_TAG.into(), BOOT_TEST_ROLE.into());
        tags.insert("amidala:image".into(), job.image_id.to_owned());
        tags.insert("Name".into(), format!("amidala boot test {}", job.job_id));
        let specs: Vec<TagSpecification> = [ResourceType::Instance, ResourceType::Volume]
            .into_iter()
            .map(|kind| tag_spec(kind, &tags))
            .collect();
        let out = self
            .client
            .run_instances()
            .image_id(job.image_id)
            .instance_type(InstanceType::from(instance_type))
            .min_count(1)
            .max_count(1)
            .subnet_id(&network.subnet)
            .security_group_ids(&network.group)
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .client_token(client_token(job.job_id))
            .set_tag_specifications(Some(specs))
            .send()
            .await
            .map_err(cloud("RunInstances"))?;
        out.instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(str::to_owned)
            .ok_or_else(|| Failure::new(ErrorCode::Cloud, "RunInstances started no instance"))
    }

    /// The instance's state and why it changed last; `None` for an instance EC2 does not know
    /// (not yet, just after RunInstances, or no longer).
    async fn instance_state(
        &self,
        id: &str,
    ) -> Result<Option<(InstanceStateName, String)>, Failure> {
        let out = match self
            .client
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => return Ok(None),
            Err(e) => return Err(cloud("DescribeInstances")(e)),
        };
        let instance = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(id));
        Ok(instance.and_then(|i| {
            let state = i.state()?.name()?.clone();
            let reason = i
                .state_reason()
                .and_then(|r| r.message())
                .or(i.state_transition_reason())
                .unwrap_or_default()
                .to_owned();
            Some((state, reason))
        }))
    }

    /// Waits for `running`, then for the status checks and the boot signal. Returns the
    /// seconds from the launch to both.
    async fn watch(
        &self,
        id: &str,
        job: &BootJob<'_>,
        started: Instant,
        limit: Duration,
    ) -> Result<f64, Failure> {
        let deadline = started + limit;
        let left = || deadline.saturating_duration_since(Instant::now());
        let state = Mutex::new(Watch {
            latest: true,
            ..Watch::default()
        });
        let failed = |why: &str, state: &Mutex<Watch>| {
            let watch = state.lock().unwrap_or_else(|e| e.into_inner());
            Failure::new(
                ErrorCode::BootTestFailed,
                with_tail(why, &watch.console.tail),
            )
        };
        let timed_out = |f: Failure| {
            if f.code == ErrorCode::Timeout {
                let secs = limit.as_secs();
                failed(&format!("no boot signal within {secs} s"), &state)
            } else {
                f
            }
        };
        wait_for(&format!("instance {id} to be running"), left(), || async {
            match self.instance_state(id).await? {
                None | Some((InstanceStateName::Pending, _)) => Ok(None),
                Some((InstanceStateName::Running, _)) => Ok(Some(())),
                Some((other, reason)) => Err(Failure::new(
                    ErrorCode::BootTestFailed,
                    format!(
                        "the instance is {} before it ran{}",
                        other.as_str(),
                        if reason.is_empty() {
                            String::new()
                        } else {
                            format!(" ({reason})")
                        }
                    ),
                )),
            }
        })
        .await
        .map_err(&timed_out)?;
        let what = format!("instance {id} to pass its status checks and show the boot signal");
        wait_for(&what, left(), || async {
            let status_ok = state.lock().unwrap_or_else(|e| e.into_inner()).status_ok;
            if !status_ok {
                match self.status_checks(id).await? {
                    Checks::Ok => state.lock().unwrap_or_else(|e| e.into_inner()).status_ok = true,
                    Checks::Impaired(which) => {
                        let output = self.console_output(id, &state).await?;
                        self.read_console(output, job, &state);
                        return Err(failed(&format!("its {which} failed"), &state));
                    }
                    Checks::Pending => {}
                    Checks::Ended(name) => {
                        return Err(failed(
                            &format!("the instance is {name} before the guest booted"),
                            &state,
                        ))
                    }
                }
            }
            let booted = state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .console
                .booted;
            if !booted {
                let output = self.console_output(id, &state).await?;
                if let Some(Sign::Failed(why)) = self.read_console(output, job, &state) {
                    return Err(failed(why, &state));
                }
            }
            let watch = state.lock().unwrap_or_else(|e| e.into_inner());
            Ok((watch.status_ok && watch.console.booted).then(|| started.elapsed().as_secs_f64()))
        })
        .await
        .map_err(&timed_out)
    }

    fn read_console(
        &self,
        output: Option<String>,
        job: &BootJob<'_>,
        state: &Mutex<Watch>,
    ) -> Option<Sign> {
        let output = output?;
        let mut watch = state.lock().unwrap_or_else(|e| e.into_inner());
        watch
            .console
            .feed(&output, job.test.marker.as_deref(), job.console)
    }

    /// The instance's status checks.
    async fn status_checks(&self, id: &str) -> Result<Checks, Failure> {
        let out = self
            .client
            .describe_instance_status()
            .instance_ids(id)
            .include_all_instances(true)
            .send()
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => return Ok(Checks::Pending),
            Err(e) => return Err(cloud("DescribeInstanceStatus")(e)),
        };
        let Some(status) = out.instance_statuses().first() else {
            return Ok(Checks::Pending);
        };
        match status.instance_state().and_then(|s| s.name()) {
            Some(InstanceStateName::Running) | None => {}
            Some(InstanceStateName::Pending) => return Ok(Checks::Pending),
            Some(other) => return Ok(Checks::Ended(other.as_str().to_owned())),
        }
        let of = |s: Option<&aws_sdk_ec2::types::InstanceStatusSummary>| {
            s.and_then(|s| s.status()).cloned()
        };
        let (instance, system) = (of(status.instance_status()), of(status.system_status()));
        Ok(match (instance, system) {
            (_, Some(SummaryStatus::Impaired)) => Checks::Impaired("system status check"),
            (Some(SummaryStatus::Impaired), _) => Checks::Impaired("instance status check"),
            (Some(SummaryStatus::Ok), Some(SummaryStatus::Ok)) => Checks::Ok,
            _ => Checks::Pending,
        })
    }

    /// The console's output (decoded), if it has any yet.
    async fn console_output(
        &self,
        id: &str,
        state: &Mutex<Watch>,
    ) -> Result<Option<String>, Failure> {
        let latest = state.lock().unwrap_or_else(|e| e.into_inner()).latest;
        let mut call = self.client.get_console_output().instance_id(id);
        if latest {
            call = call.latest(true);
        }
        let out = match call.send().await {
            Ok(out) => out,
            // Instances of the Xen hypervisor keep no latest output: asked without, next time.
            Err(e)
                if latest
                    && matches!(
                        e.code(),
                        Some(
                            "UnsupportedOperation"
                                | "InvalidParameterCombination"
                                | "InvalidParameterValue"
                        )
                    ) =>
            {
                tracing::info!(instance = id, code = ?e.code(), "the instance has no latest console output: reading the buffered one");
                state.lock().unwrap_or_else(|e| e.into_inner()).latest = false;
                return Ok(None);
            }
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => return Ok(None),
            Err(e) => return Err(cloud("GetConsoleOutput")(e)),
        };
        let Some(encoded) = out.output() else {
            return Ok(None);
        };
        let bytes = base64_decode(encoded).ok_or_else(|| {
            Failure::new(
                ErrorCode::Cloud,
                "GetConsoleOutput answered output that is not base64",
            )
        })?;
        Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// TerminateInstances and a bounded wait for `terminated`. An instance EC2 does not know is
    /// gone, unless it was `just_launched` (then it may not be visible yet: asked again for a
    /// while). Returns what became of it.
    pub(super) async fn terminate(
        &self,
        id: &str,
        just_launched: bool,
    ) -> Result<&'static str, Failure> {
        // How long a just launched instance may be unknown to TerminateInstances (EC2's
        // eventual consistency) before it is taken for gone.
        let visible = if just_launched {
            Self::timeout(self.timeouts.consistency)
        } else {
            Duration::ZERO
        };
        let sent = wait_for(
            &format!("instance {id} to be known to TerminateInstances"),
            visible,
            || async {
                match self
                    .client
                    .terminate_instances()
                    .instance_ids(id)
                    .send()
                    .await
                {
                    Ok(_) => Ok(Some(true)),
                    Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => {
                        Ok((!just_launched).then_some(false))
                    }
                    Err(e) => Err(cloud("TerminateInstances")(e)),
                }
            },
        )
        .await;
        match sent {
            Ok(true) => {}
            Ok(false) => return Ok("was gone already"),
            Err(f) if f.code == ErrorCode::Timeout => return Ok("was never found (gone already)"),
            Err(f) => return Err(f),
        }
        let ended = wait_for(
            &format!("instance {id} to terminate"),
            Self::timeout(self.timeouts.instance_terminated),
            || async {
                Ok(match self.instance_state(id).await? {
                    None | Some((InstanceStateName::Terminated, _)) => Some(()),
                    _ => None,
                })
            },
        )
        .await;
        match ended {
            Ok(()) => Ok("terminated"),
            Err(f) if f.code == ErrorCode::Timeout => {
                tracing::warn!(
                    instance = id,
                    "still shutting down after the wait; EC2 finishes terminating it"
                );
                Ok("is shutting down (TerminateInstances accepted; not waited for longer)")
            }
            Err(f) => Err(f),
        }
    }

    /// Removes the volume of a boot test's instance: its instance terminated (gc terminates
    /// instances before it removes volumes), EC2 deletes it (DeleteOnTermination, as amidala
    /// registers images); one left `available` is deleted.
    pub(super) async fn reclaim_boot_volume(&self, id: &str) -> Result<(), Failure> {
        let gone = wait_for(
            &format!("volume {id} of a boot test's instance to be released"),
            Self::timeout(self.timeouts.detach),
            || async {
                let out = match self.client.describe_volumes().volume_ids(id).send().await {
                    Ok(out) => out,
                    Err(e) if e.code() == Some("InvalidVolume.NotFound") => return Ok(Some(true)),
                    Err(e) => return Err(cloud("DescribeVolumes")(e)),
                };
                Ok(match out.volumes().first().and_then(|v| v.state()) {
                    None | Some(VolumeState::Deleted) => Some(true),
                    Some(VolumeState::Available) => Some(false),
                    _ => None,
                })
            },
        )
        .await?;
        if gone {
            return Ok(());
        }
        match self.client.delete_volume().volume_id(id).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("InvalidVolume.NotFound") => Ok(()),
            Err(e) => Err(cloud("DeleteVolume")(e)),
        }
    }

    /// Boot tests' instances of this builder that are not terminated.
    pub(super) async fn host_boot_instances(&self) -> Result<Vec<BootInstance>, Failure> {
        let mut found: Vec<BootInstance> = Vec::new();
        for (host, by_host_name) in self.host_tag_values() {
            let mut pages = self
                .client
                .describe_instances()
                .filters(
                    Filter::builder()
                        .name(format!("tag:{HOST_TAG}"))
                        .values(host)
                        .build(),
                )
                .filters(
                    Filter::builder()
                        .name(format!("tag:{ROLE_TAG}"))
                        .values(BOOT_TEST_ROLE)
                        .build(),
                )
                .filters(
                    Filter::builder()
                        .name("instance-state-name")
                        .values("pending")
                        .values("running")
                        .values("stopping")
                        .values("stopped")
                        .values("shutting-down")
                        .build(),
                )
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                for i in page
                    .map_err(cloud("DescribeInstances"))?
                    .reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                {
                    let state = i
                        .state()
                        .and_then(|s| s.name())
                        .map_or("unknown", |s| s.as_str());
                    // Filters are alternatives on some emulators: checked again.
                    let tags = tags_of(i.tags());
                    let id = i.instance_id().unwrap_or_default();
                    if state == "terminated"
                        || tags.get(HOST_TAG).map(String::as_str) != Some(host)
                        || tags.get(ROLE_TAG).map(String::as_str) != Some(BOOT_TEST_ROLE)
                        || found.iter().any(|f| f.id == id)
                    {
                        continue;
                    }
                    found.push(BootInstance {
                        id: id.to_owned(),
                        build: tags.get("amidala:build").cloned(),
                        state: format!("boot-test instance, {state}"),
                        by_host_name,
                    });
                }
            }
        }
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }
}

/// What the status checks say.
enum Checks {
    Ok,
    Pending,
    Impaired(&'static str),
    /// The instance is no longer running: its state.
    Ended(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[test]
    fn base64_decodes() {
        assert_eq!(base64_decode("aGVsbG8gd29ybGQ=").unwrap(), b"hello world");
        assert_eq!(base64_decode("aGk=\n").unwrap(), b"hi");
        assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
        assert!(base64_decode("a$b").is_none());
    }

    #[test]
    fn firmware_follows_the_boot_mode() {
        assert_eq!(firmware_of(None, None, None).unwrap(), Firmware::Bios);
        assert_eq!(
            firmware_of(None, Some("arm64"), None).unwrap(),
            Firmware::Uefi
        );
        assert_eq!(
            firmware_of(Some("uefi"), None, Some("uefi")).unwrap(),
            Firmware::Uefi
        );
        assert_eq!(
            firmware_of(Some("legacy-bios"), None, Some("bios")).unwrap(),
            Firmware::Bios
        );
        let e = firmware_of(Some("legacy-bios"), None, Some("uefi")).unwrap_err();
        assert!(e.message.contains("--boot-mode uefi"), "{}", e.message);
        let e = firmware_of(Some("uefi"), None, Some("bios+uefi")).unwrap_err();
        assert!(
            e.message.contains("--boot-mode legacy-bios"),
            "{}",
            e.message
        );
        assert!(firmware_of(None, None, Some("coreboot")).is_err());
    }

    #[test]
    fn names_and_tokens_are_what_ec2_takes() {
        assert_eq!(
            group_name("build-01.example"),
            "amidala-boot-test-build-01.example"
        );
        assert_eq!(group_name("a b/c"), "amidala-boot-test-a-b-c");
        let token = client_token("bld-0123456789abcdef0");
        assert_eq!(token, "amidala-boot-test-bld-0123456789abcdef0");
        assert!(client_token(&"x".repeat(100)).len() <= 64);
    }

    #[test]
    fn console_lines_are_logged_once_and_read_for_signs() {
        let logged = StdMutex::new(Vec::new());
        let log = |l: String| logged.lock().unwrap().push(l);
        let mut console = Console::default();
        assert_eq!(console.feed("", None, &log), None);
        assert_eq!(
            console.feed("Linux version 6.1\r\nstarting", None, &log),
            None
        );
        assert_eq!(
            console.feed(
                "Linux version 6.1\r\nstarting\nWelcome\n\ndebian login: ",
                None,
                &log
            ),
            Some(Sign::Booted)
        );
        assert!(console.booted);
        // Read again (the status checks are not done yet): the prompt is not shown twice.
        let again = "Linux version 6.1\r\nstarting\nWelcome\n\ndebian login: ";
        assert_eq!(console.feed(again, None, &log), Some(Sign::Booted));
        assert_eq!(
            console.feed(&format!("{again}\n"), None, &log),
            Some(Sign::Booted)
        );
        assert_eq!(
            *logged.lock().unwrap(),
            [
                "console: Linux version 6.1",
                "console: starting",
                "console: Welcome",
                "console: debian login: "
            ]
        );
        // The output's start moved on: only what follows the last lines seen is new.
        logged.lock().unwrap().clear();
        let mut console = Console::default();
        console.feed("a\nb\nc\nd\n", None, &log);
        console.feed("c\nd\ne\n", None, &log);
        assert_eq!(
            *logged.lock().unwrap(),
            [
                "console: a",
                "console: b",
                "console: c",
                "console: d",
                "console: e"
            ]
        );
        let sign = console.feed(
            "c\nd\ne\n[ 1.0] Kernel panic - not syncing: VFS\n",
            None,
            &log,
        );
        assert_eq!(sign, Some(Sign::Failed("the kernel panicked")));
        assert_eq!(
            console.tail.back().unwrap(),
            "[ 1.0] Kernel panic - not syncing: VFS"
        );
        // A marker instead of the login prompt.
        let mut console = Console::default();
        assert_eq!(console.feed("debian login: \n", Some("READY"), &log), None);
        assert_eq!(
            console.feed("debian login: \nREADY\n", Some("READY"), &log),
            Some(Sign::Booted)
        );
    }
}
