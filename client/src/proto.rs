//! The wire protocol between `amidala` and `amidalad`.
//!
//! A connection carries frames in both directions: a `u32` big-endian length followed by that
//! many bytes of JSON. Frames larger than [`MAX_FRAME`] are refused before their body is read.
//! Every type rejects unknown fields, so a typo or a newer peer is an error, not a silent no-op.
//!
//! A conversation starts with [`Request::Hello`] answered by [`Response::Hello`]; then any
//! number of requests follow, each answered by one response, except `build`, `base import`,
//! `logs` and `boot-test`, which are answered by a stream of events ending in a terminal event,
//! and `run`, after whose [`Response::Running`] console bytes flow both ways
//! ([`Response::Console`], [`Request::Input`]) until [`Response::RunEnded`], which ends the
//! connection.
//!
//! File descriptors travel with a frame by `SCM_RIGHTS`: the build request carries the
//! workspace directory, the import request the source, each opened by the client itself.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Version of this protocol; both ends must speak the same one.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest frame body either end accepts, in bytes.
pub const MAX_FRAME: usize = 1 << 20;

/// Most tags on one resource (EC2's own limit).
pub const MAX_TAGS: usize = 50;
/// Longest tag key, in characters (EC2's own limit).
pub const MAX_TAG_KEY: usize = 128;
/// Longest tag value, in characters (EC2's own limit).
pub const MAX_TAG_VALUE: usize = 256;
/// Tag keys with this prefix are written by amidala itself (provenance) and refused from users.
pub const RESERVED_TAG_PREFIX: &str = "amidala:";
/// Most arguments of a provisioner command, and longest total length of them.
pub const MAX_COMMAND_ARGS: usize = 4096;
/// Longest total length of a provisioner command, in bytes.
pub const MAX_COMMAND_BYTES: usize = 256 * 1024;

/// A request from the client.
// Requests are decoded, handled and dropped one at a time; boxing variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// First frame of every connection.
    Hello { protocol: u32, client: String },
    /// Start a build; the workspace directory fd travels with this frame.
    Build(BuildSpec),
    /// Make a base snapshot; the source fd (directory or file) travels with this frame.
    ImportBase(ImportSpec),
    /// All builds the caller may see.
    List,
    /// One build.
    Status { id: String },
    /// A build's log; with `follow`, until the build ends.
    Logs { id: String, follow: bool },
    /// Cancel a build and wait for its teardown.
    Cancel { id: String },
    /// Registered images.
    Images,
    /// Snapshots.
    Snapshots,
    /// Loaded provisioner plugins.
    Plugins,
    /// Versions of the daemon and its protocol.
    Version,
    /// Find what builds left behind and no live build holds; remove it unless `dry_run`.
    Gc { dry_run: bool },
    /// Check a build as [`Request::Build`] would and say what it would do, making nothing and
    /// starting nothing (`amidala validate`); answered by [`Response::Plan`].
    Validate(BuildSpec),
    /// Publish a snapshot for every member's builds (or take it back), admins only; answered
    /// by [`Response::Snapshot`].
    Publish { snapshot: String, published: bool },
    /// Delete an image (and its snapshot, unless another image uses it), a snapshot no image
    /// uses, or a finished build's record and log; the owner's or an admin's. Answered by
    /// [`Response::Deleted`].
    Delete { id: String },
    /// The disk image of a snapshot (or of an image's snapshot), for the client to copy:
    /// answered by [`Response::Export`] with a read-only descriptor of it.
    Export { id: String },
    /// Boot an image (or a snapshot) of the caller's, admins' anyone's, as a build's boot test
    /// does (`amidala boot-test`): log lines (the console) follow, then
    /// [`Response::BootTested`]. The local provider only.
    BootTest { id: String, test: BootTestSpec },
    /// Boot an image (or a snapshot) of the caller's, admins' anyone's, with its serial console
    /// connected to the client (`amidala run`), with `firmware` (`bios` or `uefi`; default:
    /// the first the image was made for): answered by [`Response::Running`], then
    /// [`Response::Console`] (and log lines of the daemon's) until [`Response::RunEnded`];
    /// the client sends [`Request::Input`] meanwhile. The connection ends with the run. The
    /// local provider only.
    Run {
        id: String,
        #[serde(default)]
        firmware: Option<String>,
    },
    /// Bytes typed on the console of a run (only after [`Response::Running`]).
    Input { data: Vec<u8> },
}

/// The tag holding the user name of a snapshot's or image's owner.
pub const OWNER_TAG: &str = "amidala:owner";
/// The tag holding the uid of a snapshot's or image's owner.
pub const OWNER_UID_TAG: &str = "amidala:owner-uid";
/// The tag an admin's publication sets on a snapshot (its value: `true`).
pub const PUBLISHED_TAG: &str = "amidala:published";

/// Where a build starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// The newest snapshot carrying this tag.
    Tag(Tag),
    /// This snapshot.
    Snapshot(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Tag(tag) => write!(f, "newest snapshot tagged {tag}"),
            Source::Snapshot(id) => write!(f, "snapshot {id}"),
        }
    }
}

/// What a build should do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    pub source: Source,
    /// Provisioner plugin name, e.g. `shell`.
    pub provisioner: String,
    /// The command given after `--`.
    pub command: Vec<String>,
    /// Provisioner options (`--opt KEY=VALUE`).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Image name; defaults to `amidala-<build id>`.
    pub name: Option<String>,
    /// Tags for the image.
    #[serde(default)]
    pub image_tags: Vec<Tag>,
    /// Tags for the output snapshot (what a later `--from` matches).
    #[serde(default)]
    pub snapshot_tags: Vec<Tag>,
    /// Partition number (1-based) holding the root filesystem.
    pub partition: Option<u32>,
    /// Mount the workspace read-write instead of read-only.
    #[serde(default)]
    pub workspace_rw: bool,
    /// Volume size in bytes; the volume is the larger of this and the snapshot.
    #[serde(default)]
    pub size: Option<u64>,
    /// Image architecture (`i386`, `x86_64`, `arm64`); read from the image's /bin/sh if absent.
    #[serde(default)]
    pub arch: Option<String>,
    /// Boot mode of the image (`legacy-bios`, `uefi`, `uefi-preferred`).
    #[serde(default)]
    pub boot_mode: Option<String>,
    /// Regions to copy the image to (ec2).
    #[serde(default)]
    pub copy_to: Vec<String>,
    /// Accounts to share the image with (ec2).
    #[serde(default)]
    pub share_with: Vec<String>,
    /// The provisioner's network: `host` (the default), `no-metadata` (the host's, without
    /// the instance metadata service) or `none` (loopback only).
    #[serde(default)]
    pub network: Option<String>,
    /// Let the build go on when the connection that started it closes (otherwise, a closed
    /// connection cancels it).
    #[serde(default)]
    pub detach: bool,
    /// Seconds the provisioner may run; past them it is stopped and the build fails.
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Package caches of the daemon's `[caches]` to mount into the image, by name. Left out
    /// when empty, so a daemon that predates caches takes the request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caches: Vec<String>,
    /// Boot the new image before it is registered, and fail the build if it does not boot.
    /// Left out when `None`, so a daemon that predates boot tests takes the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_test: Option<BootTestSpec>,
}

/// How to boot-test an image (`--boot-test`, `amidala boot-test`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootTestSpec {
    /// `bios`, `uefi` or `bios+uefi`; default: what the image was made for (its
    /// [`BOOT_TAG`]).
    #[serde(default)]
    pub firmware: Option<String>,
    /// Text on the serial console that shows the guest booted; default: a login prompt.
    #[serde(default)]
    pub marker: Option<String>,
    /// Seconds each boot may take; default: the daemon's `[boot_test] timeout`.
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// The tag of an image whose boot test passed (`passed`), and the one saying with which
/// firmware, accelerator and in how long.
pub const BOOT_TEST_TAG: &str = "amidala:boot-test";
pub const BOOT_TEST_DETAIL_TAG: &str = "amidala:boot-test-detail";

/// Most `--cache` names one build may ask for.
pub const MAX_CACHES: usize = 8;

/// Checks a cache name: 1 to 32 of `a-z 0-9 - _`.
pub fn validate_cache_name(name: &str) -> Result<(), ValidationError> {
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ValidationError(format!(
            "cache name {name:?} is not 1 to 32 of a-z, 0-9, - and _"
        )))
    }
}

/// The longest `--timeout`: a week.
pub const MAX_TIMEOUT: u64 = 7 * 24 * 3600;

/// Parses a duration such as `90`, `90s`, `15m` or `2h` into seconds.
pub fn parse_duration(s: &str) -> Result<u64, ValidationError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        ValidationError(format!(
            "duration {s:?} is not a number with an optional unit"
        ))
    })?;
    let scale = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        other => {
            return Err(ValidationError(format!(
                "duration {s:?} has an unknown unit {other:?} (use s, m, h or d)"
            )))
        }
    };
    n.checked_mul(scale)
        .filter(|v| (1..=MAX_TIMEOUT).contains(v))
        .ok_or_else(|| ValidationError(format!("duration {s:?} is not between 1s and 7d")))
}

/// The networks a provisioner may be given.
pub const NETWORKS: [&str; 3] = ["host", "no-metadata", "none"];

/// Architectures an image may have, as EC2 names them.
pub const ARCHITECTURES: [&str; 3] = ["i386", "x86_64", "arm64"];
/// Boot modes an image may have, as EC2 names them.
pub const BOOT_MODES: [&str; 3] = ["legacy-bios", "uefi", "uefi-preferred"];

/// Checks the parts of a build spec that need no daemon state.
pub fn validate_build_options(spec: &BuildSpec) -> Result<(), ValidationError> {
    if let Some(arch) = &spec.arch {
        if !ARCHITECTURES.contains(&arch.as_str()) {
            return Err(ValidationError(format!(
                "--arch {arch:?} is not one of {}",
                ARCHITECTURES.join(", ")
            )));
        }
    }
    if let Some(t) = spec.timeout {
        if !(1..=MAX_TIMEOUT).contains(&t) {
            return Err(ValidationError(format!(
                "--timeout {t}s is not between 1s and 7d"
            )));
        }
    }
    if let Some(network) = &spec.network {
        if !NETWORKS.contains(&network.as_str()) {
            return Err(ValidationError(format!(
                "--network {network:?} is not one of {}",
                NETWORKS.join(", ")
            )));
        }
    }
    if let Some(mode) = &spec.boot_mode {
        if !BOOT_MODES.contains(&mode.as_str()) {
            return Err(ValidationError(format!(
                "--boot-mode {mode:?} is not one of {}",
                BOOT_MODES.join(", ")
            )));
        }
    }
    for region in &spec.copy_to {
        validate_region(region)?;
    }
    for account in &spec.share_with {
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ValidationError(format!(
                "--share-with {account:?} is not a 12-digit AWS account id"
            )));
        }
    }
    if spec.caches.len() > MAX_CACHES {
        return Err(ValidationError(format!(
            "at most {MAX_CACHES} --cache names"
        )));
    }
    for (i, name) in spec.caches.iter().enumerate() {
        validate_cache_name(name)?;
        if spec.caches[..i].contains(name) {
            return Err(ValidationError(format!("--cache {name} is given twice")));
        }
    }
    if spec.copy_to.len() > 32 || spec.share_with.len() > 100 {
        return Err(ValidationError(
            "at most 32 --copy-to regions and 100 --share-with accounts".into(),
        ));
    }
    Ok(())
}

/// Checks that `region` looks like an AWS region name (`eu-west-1`, `us-gov-east-1`).
pub fn validate_region(region: &str) -> Result<(), ValidationError> {
    let parts: Vec<&str> = region.split('-').collect();
    let ok = parts.len() >= 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        && parts
            .last()
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(ValidationError(format!(
            "{region:?} is not an AWS region name"
        )))
    }
}

/// Expands an image name template: `{date}` (YYYY-MM-DD), `{time}` (HHMMSS, UTC) and
/// `{build}` (the build id). Other braces are an error.
pub fn expand_image_name(
    template: &str,
    build_id: &str,
    date: &str,
    time: &str,
) -> Result<String, ValidationError> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').ok_or_else(|| {
            ValidationError(format!("image name {template:?} has an unclosed {{"))
        })?;
        match &rest[open + 1..open + close] {
            "date" => out.push_str(date),
            "time" => out.push_str(time),
            "build" => out.push_str(build_id),
            other => {
                return Err(ValidationError(format!(
                "image name {template:?} uses {{{other}}}; known are {{date}}, {{time}}, {{build}}"
            )))
            }
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    validate_image_name(&out)?;
    Ok(out)
}

/// What `amidala base import` should do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportSpec {
    /// Tags of the new snapshot; defaults to `amidala=base` when empty.
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// Size of the snapshot in bytes; defaults to what the content needs.
    pub size: Option<u64>,
    /// Publish it at once for every member's builds (admins only).
    #[serde(default)]
    pub publish: bool,
    /// The name the user gave the source, for messages only (the daemon never opens it).
    pub source_name: String,
    /// A directory or tarball made a bootable disk (GPT, GRUB for BIOS and UEFI): `Some(true)`
    /// always (the tree must hold a kernel and an initramfs), `Some(false)` never, `None` if
    /// the tree holds a kernel and an initramfs. Left out when `None`, so a daemon that
    /// predates bootable disks takes the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<bool>,
}

/// The tag of a snapshot and an image saying how it boots: `bios+uefi`, `bios`, `uefi`, or
/// `none` (a tree without a kernel, or a disk without a boot loader amidala can see).
pub const BOOT_TAG: &str = "amidala:boot";

/// The tag of a bootable snapshot and image saying for which machine it boots: `x86_64` or
/// `arm64` (told by its kernel when a tree is imported). A disk without it boots on x86-64.
pub const BOOT_ARCH_TAG: &str = "amidala:boot-arch";

/// A `key=value` tag.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tag {
    pub key: String,
    pub value: String,
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

impl std::str::FromStr for Tag {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| ValidationError(format!("tag {s:?} is not of the form KEY=VALUE")))?;
        let tag = Tag {
            key: key.to_owned(),
            value: value.to_owned(),
        };
        tag.validate()?;
        Ok(tag)
    }
}

impl Tag {
    /// Checks the tag against EC2's rules, so a tag accepted locally is accepted by EC2 too.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let key_len = self.key.chars().count();
        if key_len == 0 || key_len > MAX_TAG_KEY {
            return Err(ValidationError(format!(
                "tag key {:?} must be 1 to {MAX_TAG_KEY} characters",
                self.key
            )));
        }
        if self.value.chars().count() > MAX_TAG_VALUE {
            return Err(ValidationError(format!(
                "value of tag {:?} is longer than {MAX_TAG_VALUE} characters",
                self.key
            )));
        }
        if self.key.to_ascii_lowercase().starts_with("aws:") {
            return Err(ValidationError(format!(
                "tag key {:?} uses the reserved prefix aws:",
                self.key
            )));
        }
        if self
            .key
            .chars()
            .chain(self.value.chars())
            .any(char::is_control)
        {
            return Err(ValidationError(format!(
                "tag {:?} contains a control character",
                self.key
            )));
        }
        Ok(())
    }
}

/// Checks a list of tags given by a user: each valid, no reserved prefix, no key twice.
pub fn validate_user_tags(what: &str, tags: &[Tag]) -> Result<(), ValidationError> {
    if tags.len() > MAX_TAGS {
        return Err(ValidationError(format!(
            "{} {what} given, at most {MAX_TAGS} are allowed",
            tags.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for tag in tags {
        tag.validate()?;
        if tag.key.starts_with(RESERVED_TAG_PREFIX) {
            return Err(ValidationError(format!(
                "tag key {:?} uses the prefix {RESERVED_TAG_PREFIX}, which amidala reserves for its own tags",
                tag.key
            )));
        }
        if !seen.insert(tag.key.as_str()) {
            return Err(ValidationError(format!(
                "tag key {:?} given twice",
                tag.key
            )));
        }
    }
    Ok(())
}

/// Longest source name of an import, in bytes.
pub const MAX_SOURCE_NAME: usize = 4096;

/// Checks the name an import's source is shown by: it reaches messages and the daemon's log,
/// so it may not hold control characters (a newline would forge a log line).
pub fn validate_source_name(name: &str) -> Result<(), ValidationError> {
    if name.is_empty() || name.len() > MAX_SOURCE_NAME {
        return Err(ValidationError(format!(
            "the source name must be 1 to {MAX_SOURCE_NAME} bytes long"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(ValidationError(format!(
            "the source name {name:?} contains a control character; rename it or import it \
             through a symbolic link with a plain name"
        )));
    }
    Ok(())
}

/// Checks an image name against EC2's rules: 3 to 128 characters of letters, digits and
/// `( ) [ ] space . / - ' @ _`.
pub fn validate_image_name(name: &str) -> Result<(), ValidationError> {
    let len = name.chars().count();
    if !(3..=128).contains(&len) {
        return Err(ValidationError(format!(
            "image name {name:?} must be 3 to 128 characters long"
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(*c)))
    {
        return Err(ValidationError(format!(
            "image name {name:?} contains {bad:?}; allowed are letters, digits and ()[] ./-'@_"
        )));
    }
    Ok(())
}

/// Checks that `id` looks like an amidala resource id: `prefix-` and 17 lowercase hex digits,
/// or 8 (EC2's ids from before 2016, which older snapshots and images still carry).
pub fn validate_id(prefix: &str, id: &str) -> Result<(), ValidationError> {
    let ok = id
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| {
            (hex.len() == 17 || hex.len() == 8)
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(ValidationError(format!(
            "{id:?} is not a valid id (expected {prefix}- and 17 or 8 lowercase hexadecimal \
             digits)"
        )))
    }
}

/// Parses a size such as `512M`, `2G`, `2GiB` or `1073741824` (binary units).
pub fn parse_size(s: &str) -> Result<u64, ValidationError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        ValidationError(format!("size {s:?} is not a number with an optional unit"))
    })?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(ValidationError(format!(
                "size {s:?} has an unknown unit {other:?} (use K, M, G or T)"
            )))
        }
    };
    n.checked_mul(1u64 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| ValidationError(format!("size {s:?} is zero or too large")))
}

/// Input that breaks a rule; the message names what and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(pub String);

/// The phases of a build, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Queued,
    Resolve,
    Volume,
    Attach,
    Mount,
    Provision,
    Unmount,
    Detach,
    Snapshot,
    /// The new image booted in a VM before it is registered (`--boot-test`).
    BootTest,
    Register,
    Cleanup,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Resolve => "resolve",
            Phase::Volume => "volume",
            Phase::Attach => "attach",
            Phase::Mount => "mount",
            Phase::Provision => "provision",
            Phase::Unmount => "unmount",
            Phase::Detach => "detach",
            Phase::Snapshot => "snapshot",
            Phase::BootTest => "boot_test",
            Phase::Register => "register",
            Phase::Cleanup => "cleanup",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Stable error codes; clients may match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A frame could not be decoded (bad length, bad JSON, unknown field).
    BadFrame,
    /// A frame was larger than [`MAX_FRAME`].
    FrameTooLarge,
    /// The first frame was not a hello, or a request came out of order.
    BadRequest,
    /// The peers speak different protocol versions.
    ProtocolMismatch,
    /// A request field broke a rule.
    InvalidArgument,
    /// A named build, snapshot or image does not exist.
    NotFound,
    /// No snapshot matches the requested tag.
    NoSnapshot,
    /// No provisioner plugin of that name is loaded.
    UnknownProvisioner,
    /// The caller may not do this.
    PermissionDenied,
    /// The daemon is shutting down and takes no new work.
    ShuttingDown,
    /// The provisioner ran and failed.
    ProvisionerFailed,
    /// The build was cancelled.
    Cancelled,
    /// A system call, a tool or a file operation failed.
    Io,
    /// A wait passed its deadline.
    Timeout,
    /// A bound on builds, connections or the queue was reached.
    LimitExceeded,
    /// The cloud API refused or failed a call.
    Cloud,
    /// The new image did not boot in its boot test.
    BootTestFailed,
    /// A bug in amidala.
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::ProtocolMismatch => "protocol_mismatch",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NoSnapshot => "no_snapshot",
            ErrorCode::UnknownProvisioner => "unknown_provisioner",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::ProvisionerFailed => "provisioner_failed",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Io => "io",
            ErrorCode::Timeout => "timeout",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Cloud => "cloud",
            ErrorCode::BootTestFailed => "boot_test_failed",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{message}")]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

/// Why a build failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildFailure {
    pub build_id: String,
    /// The phase that failed.
    pub phase: Phase,
    pub code: ErrorCode,
    pub message: String,
    /// The provisioner's exit status, when it ran and exited non-zero.
    pub exit_status: Option<i32>,
}

/// What a successful build made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildResult {
    pub build_id: String,
    pub image_id: String,
    pub snapshot_id: String,
    /// The snapshot's raw disk image (local provider).
    pub snapshot_path: Option<String>,
}

/// Where a build is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl BuildState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BuildState::Succeeded | BuildState::Failed | BuildState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Running => "running",
            BuildState::Succeeded => "succeeded",
            BuildState::Failed => "failed",
            BuildState::Cancelled => "cancelled",
        }
    }
}

/// A build as `list` and `status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildInfo {
    pub id: String,
    pub state: BuildState,
    /// Current phase while running; the failed phase when failed.
    pub phase: Option<Phase>,
    pub owner_uid: u32,
    pub provisioner: String,
    pub command: Vec<String>,
    /// What was asked for (`--from` or `--source`).
    pub source: Source,
    /// The snapshot the build started from, once resolved.
    pub source_snapshot: Option<String>,
    /// RFC 3339 times.
    pub created: String,
    pub finished: Option<String>,
    pub image_id: Option<String>,
    pub snapshot_id: Option<String>,
    pub error: Option<BuildFailure>,
}

/// A snapshot as `snapshots` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    pub id: String,
    pub tags: BTreeMap<String, String>,
    pub created: String,
    pub size: u64,
    /// The raw disk image file (local provider), readable by root (`amidala export` copies it).
    pub path: Option<String>,
}

impl SnapshotInfo {
    /// The user name of its owner, as its tags say.
    pub fn owner(&self) -> Option<&str> {
        self.tags.get(OWNER_TAG).map(String::as_str)
    }

    /// Whether an admin published it for every member's builds.
    pub fn published(&self) -> bool {
        is_published(&self.tags)
    }

    /// Whose it is, for messages: "alice's", "root's, published".
    pub fn whose(&self) -> String {
        whose(&self.tags)
    }
}

/// Whether a snapshot's `tags` say an admin published it.
pub fn is_published(tags: &BTreeMap<String, String>) -> bool {
    tags.get(PUBLISHED_TAG).is_some_and(|v| v == "true")
}

/// The owner's uid a snapshot's or image's `tags` name.
pub fn owner_uid(tags: &BTreeMap<String, String>) -> Option<u32> {
    tags.get(OWNER_UID_TAG).and_then(|u| u.parse().ok())
}

/// Whose a snapshot with `tags` is, for messages: "alice's", "root's, published".
pub fn whose(tags: &BTreeMap<String, String>) -> String {
    let owner = tags
        .get(OWNER_TAG)
        .map_or("an unknown user", String::as_str);
    if is_published(tags) {
        format!("{owner}'s, published")
    } else {
        format!("{owner}'s")
    }
}

/// An image as `images` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInfo {
    pub id: String,
    pub name: String,
    pub tags: BTreeMap<String, String>,
    pub created: String,
    pub snapshot_id: String,
    pub build_id: Option<String>,
}

/// A loaded provisioner plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    pub path: String,
    /// The options it takes (`--opt KEY=VALUE`).
    #[serde(default)]
    pub options: Vec<PluginOption>,
}

/// One option of a provisioner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginOption {
    /// The key; a name ending in `*` is a prefix (`env.*`).
    pub name: String,
    pub description: String,
    pub required: bool,
}

/// A frame from the daemon.
// Responses are built, sent and dropped one at a time; boxing variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Hello {
        protocol: u32,
        daemon: String,
    },
    Error(ErrorReply),
    /// A build was accepted (queued); events follow.
    Accepted {
        build_id: String,
    },
    /// A build entered a phase.
    Phase {
        phase: Phase,
    },
    /// A line of output (the provisioner's, or the daemon's about this build or import).
    Log {
        line: String,
    },
    /// Terminal: the build succeeded.
    Finished(BuildResult),
    /// Terminal: the build failed.
    Failed(BuildFailure),
    /// Terminal: an import made this snapshot.
    Imported(SnapshotInfo),
    /// Terminal: end of a log that is not a build's event stream.
    LogEnd,
    Builds(Vec<BuildInfo>),
    Build(BuildInfo),
    Images(Vec<ImageInfo>),
    Snapshots(Vec<SnapshotInfo>),
    Plugins(Vec<PluginInfo>),
    Version {
        daemon: String,
        protocol: u32,
        provider: String,
    },
    /// What gc found (and, unless it was a dry run, removed).
    Collected {
        dry_run: bool,
        items: Vec<GcItem>,
    },
    /// What a build would do (the answer to [`Request::Validate`]).
    Plan(BuildPlan),
    /// A snapshot as it is now (the answer to [`Request::Publish`]).
    Snapshot(SnapshotInfo),
    /// What a [`Request::Delete`] removed: image and snapshot ids.
    Deleted {
        ids: Vec<String>,
    },
    /// The snapshot whose disk image travels with this frame as a read-only descriptor.
    Export(SnapshotInfo),
    /// Terminal: the image or snapshot `id` booted; `detail` as the
    /// [`BOOT_TEST_DETAIL_TAG`] says it (firmware, seconds, accelerator).
    BootTested {
        id: String,
        detail: String,
    },
    /// A run's VM is starting with this firmware: console frames follow.
    Running {
        id: String,
        firmware: String,
    },
    /// Bytes the guest wrote on its serial console.
    Console {
        data: Vec<u8>,
    },
    /// Terminal: a run ended, and why (the guest powered off, the time limit passed...).
    RunEnded {
        why: String,
    },
}

/// What a build of a checked spec would do, as `amidala validate` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildPlan {
    /// The spec as the daemon would run it (the network as its policy decides).
    pub spec: BuildSpec,
    /// `local` or `ec2`.
    pub provider: String,
    /// The snapshot the build would start from, were it started now.
    pub source_snapshot: SnapshotInfo,
    /// The image's name, with `{build}` replaced by `example_build_id`.
    pub image_name: String,
    /// An id of the kind the build would get (each build gets a new one).
    pub example_build_id: String,
    /// The volume's size in bytes: the larger of the requested size and the snapshot's.
    pub volume_size: u64,
    /// The version of the provisioner plugin that would run.
    pub provisioner_version: String,
}

/// One thing gc found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcItem {
    /// `cgroup`, `mount`, `loop-device`, `volume`, `snapshot` or `file`.
    pub kind: String,
    /// Its id or path.
    pub id: String,
    /// The build it belonged to, where known.
    pub build: Option<String>,
    /// Why it is garbage, or its state.
    pub detail: String,
    /// Whether it was removed.
    pub removed: bool,
    /// Why removing it failed.
    pub error: Option<String>,
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME} bytes")]
    TooLarge(usize),
    #[error("connection closed in the middle of a frame ({0} bytes pending)")]
    Truncated(usize),
    #[error("malformed frame: {0}")]
    Json(#[from] serde_json::Error),
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge(_) => ErrorCode::FrameTooLarge,
            FrameError::Truncated(_) | FrameError::Json(_) => ErrorCode::BadFrame,
        }
    }
}

/// Encodes `value` as one frame: length prefix and JSON body.
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    serde_json::to_writer(&mut out, value)?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    out[..4].copy_from_slice(
        &u32::try_from(len)
            .expect("bounded by MAX_FRAME")
            .to_be_bytes(),
    );
    Ok(out)
}

/// Splits a byte stream into frames. Feed it what arrives with [`push`](Self::push), take
/// frames with [`next_frame`](Self::next_frame). An oversized length is refused as soon as
/// its prefix is seen, before any of the body is buffered.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet returned as a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame body, if one has fully arrived.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(prefix) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(prefix.try_into().expect("four bytes")) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(body))
    }

    /// Call at end of stream: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated(self.buf.len()))
        }
    }
}

/// Decodes one frame body.
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(k: &str, v: &str) -> Tag {
        Tag {
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn frames_round_trip_in_pieces() {
        let req = Request::Build(BuildSpec {
            source: Source::Tag(tag("amidala", "base")),
            provisioner: "shell".into(),
            command: vec!["/bin/sh".into(), "-c".into(), "true".into()],
            options: BTreeMap::new(),
            name: None,
            image_tags: vec![],
            snapshot_tags: vec![tag("amidala", "system")],
            partition: Some(2),
            workspace_rw: false,
            size: None,
            arch: None,
            boot_mode: None,
            copy_to: vec![],
            share_with: vec![],
            network: None,
            detach: false,
            timeout: None,
            caches: vec!["apt".into()],
            boot_test: Some(BootTestSpec {
                firmware: Some("uefi".into()),
                ..BootTestSpec::default()
            }),
        });
        let mut bytes = encode_frame(&req).unwrap();
        bytes.extend(encode_frame(&Request::List).unwrap());
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for chunk in bytes.chunks(3) {
            dec.push(chunk);
            while let Some(body) = dec.next_frame().unwrap() {
                got.push(decode::<Request>(&body).unwrap());
            }
        }
        dec.finish().unwrap();
        assert_eq!(got, vec![req, Request::List]);
    }

    #[test]
    fn oversized_length_is_refused_before_the_body() {
        let mut dec = FrameDecoder::new();
        dec.push(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert!(matches!(dec.next_frame(), Err(FrameError::TooLarge(n)) if n == MAX_FRAME + 1));
        assert_eq!(
            FrameError::TooLarge(0).code(),
            ErrorCode::FrameTooLarge,
            "wire code of an oversized frame"
        );
    }

    #[test]
    fn a_frame_at_the_limit_is_accepted() {
        let mut dec = FrameDecoder::new();
        dec.push(&(MAX_FRAME as u32).to_be_bytes());
        dec.push(&vec![b' '; MAX_FRAME]);
        assert_eq!(dec.next_frame().unwrap().unwrap().len(), MAX_FRAME);
    }

    #[test]
    fn truncated_stream_is_an_error() {
        let mut dec = FrameDecoder::new();
        let bytes = encode_frame(&Request::List).unwrap();
        dec.push(&bytes[..bytes.len() - 1]);
        assert!(dec.next_frame().unwrap().is_none());
        assert!(matches!(dec.finish(), Err(FrameError::Truncated(_))));
    }

    #[test]
    fn unknown_fields_and_variants_are_rejected() {
        let err = decode::<Request>(br#"{"status":{"id":"bld-1","extra":1}}"#).unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
        assert!(decode::<Request>(br#"{"reboot":null}"#).is_err());
        assert!(decode::<Request>(b"not json").is_err());
        assert_eq!(decode::<Request>(br#""list""#).unwrap(), Request::List);
    }

    #[test]
    fn tags_follow_ec2_rules() {
        assert_eq!("a=b=c".parse::<Tag>().unwrap(), tag("a", "b=c"));
        assert_eq!("a=".parse::<Tag>().unwrap(), tag("a", ""));
        assert!("novalue".parse::<Tag>().is_err());
        assert!("=x".parse::<Tag>().is_err());
        assert!("aws:x=1".parse::<Tag>().is_err());
        assert!(format!("{}=1", "k".repeat(129)).parse::<Tag>().is_err());
        assert!(format!("k={}", "v".repeat(257)).parse::<Tag>().is_err());
        assert!(validate_user_tags("tags", &[tag("amidala:build", "x")]).is_err());
        assert!(validate_user_tags("tags", &[tag("a", "1"), tag("a", "2")]).is_err());
        let many: Vec<Tag> = (0..51).map(|i| tag(&format!("k{i}"), "v")).collect();
        assert!(validate_user_tags("tags", &many).is_err());
        assert!(validate_user_tags("tags", &many[..50]).is_ok());
    }

    #[test]
    fn image_names_follow_ec2_rules() {
        assert!(validate_image_name("web (2026-11-25) v1.2_x@y/z'q[1]").is_ok());
        assert!(validate_image_name("ab").is_err());
        assert!(validate_image_name(&"a".repeat(129)).is_err());
        assert!(validate_image_name("semi;colon").is_err());
    }

    #[test]
    fn name_templates_expand_and_are_checked() {
        let id = "bld-0123456789abcdef0";
        assert_eq!(
            expand_image_name("app {date} {time} ({build})", id, "2026-11-25", "031500").unwrap(),
            "app 2026-11-25 031500 (bld-0123456789abcdef0)"
        );
        assert!(expand_image_name("app {nope}", id, "d", "t")
            .unwrap_err()
            .0
            .contains("{nope}"));
        assert!(expand_image_name("app {date", id, "d", "t").is_err());
        assert!(
            expand_image_name("{date};", id, "2026-11-25", "t").is_err(),
            "expanded name checked"
        );
    }

    #[test]
    fn build_options_are_checked() {
        let spec = |f: &dyn Fn(&mut BuildSpec)| {
            let mut s = BuildSpec {
                source: Source::Snapshot("snap-0".into()),
                provisioner: "shell".into(),
                command: vec![],
                options: BTreeMap::new(),
                name: None,
                image_tags: vec![],
                snapshot_tags: vec![],
                partition: None,
                workspace_rw: false,
                size: None,
                arch: None,
                boot_mode: None,
                copy_to: vec![],
                share_with: vec![],
                network: None,
                detach: false,
                timeout: None,
                caches: vec![],
                boot_test: None,
            };
            f(&mut s);
            validate_build_options(&s)
        };
        assert!(spec(&|_| {}).is_ok());
        assert!(spec(&|s| s.arch = Some("arm64".into())).is_ok());
        assert!(spec(&|s| s.arch = Some("sparc".into())).is_err());
        assert!(spec(&|s| s.boot_mode = Some("uefi-preferred".into())).is_ok());
        assert!(spec(&|s| s.boot_mode = Some("bios".into())).is_err());
        assert!(spec(&|s| s.copy_to = vec!["eu-west-1".into(), "us-gov-east-1".into()]).is_ok());
        assert!(spec(&|s| s.copy_to = vec!["eu-west".into()]).is_err());
        assert!(spec(&|s| s.copy_to = vec!["EU-west-1".into()]).is_err());
        assert!(spec(&|s| s.share_with = vec!["123456789012".into()]).is_ok());
        assert!(spec(&|s| s.share_with = vec!["12345".into()]).is_err());
        assert!(spec(&|s| s.network = Some("none".into())).is_ok());
        assert!(spec(&|s| s.network = Some("no-metadata".into())).is_ok());
        assert!(spec(&|s| s.network = Some("bridge".into())).is_err());
        assert!(spec(&|s| s.caches = vec!["apt".into(), "pip_3-x".into()]).is_ok());
        assert!(spec(&|s| s.caches = vec!["apt".into(), "apt".into()]).is_err());
        assert!(spec(&|s| s.caches = vec!["../etc".into()]).is_err());
        assert!(spec(&|s| s.caches = vec![String::new()]).is_err());
        assert!(spec(&|s| s.caches = (0..9).map(|i| format!("c{i}")).collect()).is_err());
        assert!(spec(&|s| s.timeout = Some(0)).is_err());
        assert!(spec(&|s| s.timeout = Some(MAX_TIMEOUT + 1)).is_err());
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("15m").unwrap(), 900);
        assert_eq!(parse_duration("2h").unwrap(), 7200);
        assert!(parse_duration("8d").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 fortnights")
            .unwrap_err()
            .0
            .contains("unknown unit"));
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("snap", "snap-0123456789abcdef0").is_ok());
        assert!(validate_id("snap", "snap-0123456789abcdef").is_err());
        // EC2's short ids of before 2016.
        assert!(validate_id("snap", "snap-1a2b3c4d").is_ok());
        assert!(validate_id("ami", "ami-1a2b3c4").is_err());
        assert!(validate_id("snap", "snap-0123456789ABCDEF0").is_err());
        assert!(validate_id("snap", "vol-0123456789abcdef0").is_err());
        assert!(validate_id("snap", "snap-../../etc/passwd").is_err());
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        assert!(parse_size("0").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
