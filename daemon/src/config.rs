//! Daemon configuration: command-line flags over a TOML file over built-in defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/amidala/amidalad.toml";
pub const DEFAULT_SOCKET: &str = amidala::DEFAULT_SOCKET;
pub const DEFAULT_STATE_DIR: &str = "/var/lib/amidala";
pub const DEFAULT_PLUGIN_DIR: &str = "/usr/lib/amidala/plugins";
pub const DEFAULT_MAX_BUILDS: usize = 4;

/// Which provider makes volumes, snapshots and images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Image files and loop devices under the state directory.
    Local,
    /// EBS volumes and AMIs.
    Ec2,
}

/// `amidalad`: the amidala daemon. Runs as root in the foreground.
#[derive(Debug, Parser)]
#[command(name = "amidalad", version, about)]
pub struct Cli {
    /// Configuration file (default /etc/amidala/amidalad.toml, if it exists).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Provider (default local).
    #[arg(long, value_enum)]
    pub provider: Option<ProviderKind>,
    /// Socket to listen on (default /run/amidala/amidala.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// State directory: catalog, snapshots, volumes, build logs (default /var/lib/amidala).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Directory of provisioner plugins (default /usr/lib/amidala/plugins).
    #[arg(long, value_name = "DIR")]
    pub plugin_dir: Option<PathBuf>,
    /// Builds that run at once; more wait in a queue (default 4).
    #[arg(long, value_name = "N")]
    pub max_builds: Option<usize>,
    /// ec2: the region (default: from the environment, the profile or the instance metadata).
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// ec2: the EC2 API endpoint, for emulators and private endpoints.
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// ec2: this builder's instance id (default: from the instance metadata).
    #[arg(long, value_name = "ID")]
    pub instance_id: Option<String>,
    /// ec2: this builder's availability zone (default: from the instance metadata).
    #[arg(long, value_name = "AZ")]
    pub availability_zone: Option<String>,
    /// ec2: how volumes reach this host: ebs (attached devices) or loop (files, for tests).
    #[arg(long, value_enum)]
    pub data_plane: Option<DataPlane>,
}

/// How the ec2 provider's volumes become block devices on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataPlane {
    /// Real EBS volumes attached to this instance.
    Ebs,
    /// Files under the state directory keyed by EC2 ids, attached as loop devices: every EC2
    /// call is made for real (against an emulator) without EBS. For tests.
    Loop,
}

/// Deadlines of the ec2 provider's waits, in seconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ec2Timeouts {
    pub volume_available: u64,
    pub attach: u64,
    pub device: u64,
    pub detach: u64,
    pub snapshot: u64,
    pub image: u64,
    /// How long a boot test's instance is waited for to be `terminated` once TerminateInstances
    /// was accepted (EC2 finishes it anyway; gc finds one that does not end).
    pub instance_terminated: u64,
    /// How long after amidala made a volume, snapshot, image or instance EC2 may still answer
    /// NotFound for it (eventual consistency): such an answer means "not yet" until then.
    pub consistency: u64,
}

impl Default for Ec2Timeouts {
    fn default() -> Self {
        Ec2Timeouts {
            volume_available: 300,
            attach: 120,
            device: 60,
            detach: 300,
            snapshot: 3600,
            image: 600,
            instance_terminated: 120,
            consistency: 60,
        }
    }
}

/// The `[ec2]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2Config {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub instance_id: Option<String>,
    pub availability_zone: Option<String>,
    /// Volume type of build volumes and image mappings (default gp3).
    pub volume_type: Option<String>,
    /// Device names to attach volumes at (default /dev/sdf to /dev/sdp).
    pub device_names: Option<Vec<String>>,
    pub data_plane: Option<DataPlane>,
    /// Root device name of registered images (default /dev/xvda).
    pub root_device_name: Option<String>,
    /// ENA support on registered images (default true).
    pub ena_support: Option<bool>,
    /// Require IMDSv2 on instances of registered images (default true).
    pub require_imdsv2: Option<bool>,
    /// Instance type of boot tests of x86_64 images (default t3.micro).
    pub boot_test_instance_type: Option<String>,
    /// Instance type of boot tests of arm64 images (default t4g.micro).
    pub boot_test_instance_type_arm64: Option<String>,
    /// Subnet boot tests' instances run in (default: the builder instance's own).
    pub boot_test_subnet: Option<String>,
    /// Security group of boot tests' instances (default: one amidala makes in the subnet's
    /// VPC for this builder, `amidala-boot-test-INSTANCE_ID`, without inbound or outbound
    /// rules).
    pub boot_test_security_group: Option<String>,
    #[serde(default)]
    pub timeouts: Ec2Timeouts,
}

/// The keys of the configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub provider: Option<ProviderKind>,
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub plugin_dir: Option<PathBuf>,
    pub max_builds: Option<usize>,
    #[serde(default)]
    pub ec2: Ec2Config,
    #[serde(default)]
    pub policy: crate::policy::PolicyConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub warm_pool: Vec<crate::pool::PoolConfig>,
    /// Package caches builds may ask for (`--cache NAME`): name → directory in the image.
    #[serde(default)]
    pub caches: BTreeMap<String, String>,
    /// The first of the 65536 host ids an import's sandbox runs as (no host user may have one
    /// of them).
    pub import_id_base: Option<u32>,
    /// The first host id of the ranges of members' builds (see [`crate::idrange`]).
    pub build_id_base: Option<u32>,
    /// How many ranges of 65536 ids there are from `build_id_base`: one per member who builds.
    pub build_id_ranges: Option<u32>,
    /// The `[boot_test]` section: how boot tests run their VMs.
    #[serde(default)]
    pub boot_test: crate::bootvm::Settings,
}

/// The `[limits]` section: bounds on what one client or user may hold.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Seconds a client may take to send a complete request; then it is dropped.
    pub request_timeout: u64,
    /// Builds one user may have queued or running at once.
    pub max_builds_per_user: usize,
    /// Base imports one user may have in flight at once (admins: any number).
    pub max_imports_per_user: usize,
    /// Builds one user may have running at once (the others wait, and builds of users who run
    /// fewer go first); by default half of `max_builds`, at least 1.
    pub max_running_builds_per_user: Option<usize>,
    /// Connections one user may have open at once.
    pub max_connections_per_user: usize,
    /// Connections open at once over all users (admins may exceed it).
    pub max_connections: usize,
    /// Builds that may wait in the queue, over all users, beyond those running.
    pub max_queued_builds: usize,
    /// Space of the state directory's filesystem no import may take, in bytes (`"1G"` or a
    /// number); by default 5 % of the filesystem, at most 1 GiB.
    #[serde(deserialize_with = "size")]
    pub min_free_space: Option<u64>,
    /// Seconds each pass of an import may take.
    pub import_timeout: u64,
    /// Memory one build may use (its processes together), in bytes (`"4G"` or a number).
    #[serde(deserialize_with = "size")]
    pub build_memory: Option<u64>,
    /// Processes and threads one build may have at once.
    pub build_pids: Option<u64>,
    /// Bytes of a build's log (`"64M"` or a number): output beyond it is dropped, with a line
    /// that says so, and the build goes on.
    #[serde(deserialize_with = "size_required")]
    pub build_log: u64,
    /// Seconds a build's provisioner may run when it asks for no `--timeout`.
    pub build_timeout: u64,
    /// The longest `--timeout` members may ask for, in seconds (admins may ask for more).
    pub max_build_timeout: u64,
    /// Bytes of snapshots and running builds' volumes one member may have (`"100G"` or a
    /// number; admins have no quota).
    #[serde(deserialize_with = "size")]
    pub user_quota: Option<u64>,
}

impl Limits {
    /// The builds one user may run at once, with `max_builds` slots.
    pub fn running_builds_per_user(&self, max_builds: usize) -> usize {
        self.max_running_builds_per_user
            .unwrap_or(max_builds / 2)
            .clamp(1, max_builds.max(1))
    }
}

/// A size, as bytes or as a string such as `"1G"`.
fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(Some(n)),
        Size::Text(text) => amidala::proto::parse_size(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

fn size_required<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(size(d)?.unwrap_or_default())
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_timeout: 60,
            max_builds_per_user: 8,
            max_imports_per_user: 2,
            max_running_builds_per_user: None,
            max_connections_per_user: 32,
            max_connections: 512,
            max_queued_builds: 64,
            min_free_space: None,
            import_timeout: 7200,
            build_memory: Some(4 << 30),
            build_pids: Some(4096),
            build_log: 64 << 20,
            build_timeout: 7200,
            max_build_timeout: 86400,
            user_quota: Some(100 << 30),
        }
    }
}

/// The configuration in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub provider: ProviderKind,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub plugin_dir: PathBuf,
    pub max_builds: usize,
    pub ec2: Ec2Config,
    pub policy: crate::policy::PolicyConfig,
    pub limits: Limits,
    pub warm_pool: Vec<crate::pool::PoolConfig>,
    pub caches: BTreeMap<String, String>,
    pub import_id_base: u32,
    pub build_id_base: u32,
    pub build_id_ranges: u32,
    pub boot_test: crate::bootvm::Settings,
}

/// The default first id of an import's sandbox: 0x7FFF0000, below 2^31 (which some tools take
/// for negative) and far above any user's (systemd leaves 0x70000000 to 0x7FFFFFFF unused).
pub const DEFAULT_IMPORT_ID_BASE: u32 = 0x7FFF_0000;

/// The default first id of members' builds' ranges: 0x70000000, above systemd's container
/// ranges (up to 0x6FFFFFFF), with 4094 ranges up to 0x7FFE0000 (systemd's "foreign" range).
pub const DEFAULT_BUILD_ID_BASE: u32 = 0x7000_0000;
pub const DEFAULT_BUILD_ID_RANGES: u32 = 4094;

impl Config {
    /// The host ids of members' builds and of import sandboxes, in that order: no host user
    /// or group may have one.
    pub fn sandbox_ids(&self) -> [std::ops::Range<u64>; 2] {
        let range = u64::from(crate::idrange::RANGE);
        let builds = u64::from(self.build_id_base);
        let imports = u64::from(self.import_id_base);
        [
            builds..builds + u64::from(self.build_id_ranges) * range,
            imports..imports + range,
        ]
    }

    /// Reads the file named by `--config` (which must exist) or the default file (which may
    /// be absent), then lets the flags win.
    pub fn load(cli: &Cli) -> Result<Config> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None if Path::new(DEFAULT_CONFIG).exists() => read_file(Path::new(DEFAULT_CONFIG))?,
            None => FileConfig::default(),
        };
        Config::merge(cli, file)
    }

    pub fn merge(cli: &Cli, file: FileConfig) -> Result<Config> {
        let mut ec2 = file.ec2;
        ec2.region = cli.region.clone().or(ec2.region);
        ec2.endpoint_url = cli.endpoint_url.clone().or(ec2.endpoint_url);
        ec2.instance_id = cli.instance_id.clone().or(ec2.instance_id);
        ec2.availability_zone = cli.availability_zone.clone().or(ec2.availability_zone);
        ec2.data_plane = cli.data_plane.or(ec2.data_plane);
        let config = Config {
            provider: cli
                .provider
                .or(file.provider)
                .unwrap_or(ProviderKind::Local),
            socket: cli
                .socket
                .clone()
                .or(file.socket)
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
            state_dir: cli
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            plugin_dir: cli
                .plugin_dir
                .clone()
                .or(file.plugin_dir)
                .unwrap_or_else(|| DEFAULT_PLUGIN_DIR.into()),
            max_builds: cli
                .max_builds
                .or(file.max_builds)
                .unwrap_or(DEFAULT_MAX_BUILDS),
            ec2,
            policy: file.policy,
            limits: file.limits,
            warm_pool: file.warm_pool,
            caches: file.caches,
            import_id_base: file.import_id_base.unwrap_or(DEFAULT_IMPORT_ID_BASE),
            build_id_base: file.build_id_base.unwrap_or(DEFAULT_BUILD_ID_BASE),
            build_id_ranges: file.build_id_ranges.unwrap_or(DEFAULT_BUILD_ID_RANGES),
            boot_test: file.boot_test,
        };
        let vm = &config.boot_test;
        if vm.memory_mib < 128
            || vm.cpus == 0
            || vm.cpus > 64
            || vm.timeout < 10
            || vm.timeout > vm.max_timeout
            || vm.max_run < 10
        {
            bail!(
                "boot_test: memory_mib must be at least 128, cpus 1 to 64, timeout at least \
                 10 and at most max_timeout, and max_run at least 10"
            );
        }
        if config.import_id_base == 0
            || config
                .import_id_base
                .checked_add(crate::unpack::MAPPED_IDS as u32)
                .is_none()
        {
            bail!("import_id_base must leave room for 65536 ids above it, and not be 0");
        }
        let [builds, imports] = config.sandbox_ids();
        if config.build_id_base == 0
            || config.build_id_ranges == 0
            || builds.end > u64::from(u32::MAX)
            || (builds.start < imports.end && imports.start < builds.end)
        {
            bail!(
                "build_id_base and build_id_ranges must name at least one range of 65536 ids, \
                 not 0, below 2^32 and apart from the import_id_base range"
            );
        }
        if config.max_builds == 0 {
            bail!("max_builds must be at least 1");
        }
        let limits = &config.limits;
        if limits.build_memory.is_some_and(|m| m < 16 << 20)
            || limits.build_pids.is_some_and(|p| p < 16)
        {
            bail!("limits: build_memory must be at least 16M and build_pids at least 16");
        }
        if limits.build_log < 64 << 10 {
            bail!("limits: build_log must be at least 64K");
        }
        if limits.build_timeout == 0 || limits.build_timeout > limits.max_build_timeout {
            bail!("limits: build_timeout must be at least 1 and at most max_build_timeout");
        }
        if limits.max_connections_per_user == 0
            || limits.max_connections_per_user >= limits.max_connections
        {
            bail!(
                "limits: max_connections_per_user ({}) must be at least 1 and less than max_connections ({}), so that no user can hold every connection",
                limits.max_connections_per_user,
                limits.max_connections
            );
        }
        if let Err(e) = config.policy.validate() {
            bail!("{e}");
        }
        if let Err(e) = crate::pool::Pool::new(&config.warm_pool) {
            bail!("{e}");
        }
        // One cache's directory inside another's would be mounted through the first one's
        // host directory, which its builds can change: refused.
        for (a, ta) in &config.caches {
            for (b, tb) in &config.caches {
                if a != b && (tb == ta || tb.starts_with(&format!("{ta}/"))) {
                    bail!("caches: {b} ({tb}) is or is inside {a} ({ta}); cache directories may not nest");
                }
            }
        }
        for (name, target) in &config.caches {
            amidala::proto::validate_cache_name(name)
                .map_err(|e| anyhow::anyhow!("caches: {e}"))?;
            validate_cache_target(target).map_err(|e| anyhow::anyhow!("caches: {name}: {e}"))?;
        }
        for (name, path) in [
            ("socket", &config.socket),
            ("state_dir", &config.state_dir),
            ("plugin_dir", &config.plugin_dir),
        ] {
            if !path.is_absolute() {
                bail!("{name} must be an absolute path, got {}", path.display());
            }
        }
        Ok(config)
    }
}

/// Directories of the image a cache may be mounted on: absolute, plain components, not the
/// root and not where amidala mounts something itself.
pub fn validate_cache_target(target: &str) -> Result<(), String> {
    let rest = target
        .strip_prefix('/')
        .ok_or_else(|| format!("{target:?} is not an absolute path"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    if rest.is_empty()
        || parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err(format!(
            "{target:?} must name a directory below / with plain components (no //, . or ..)"
        ));
    }
    if ["proc", "sys", "dev", "workspace"].contains(&parts[0]) {
        return Err(format!(
            "{target:?} is under /{}, where amidala mounts its own",
            parts[0]
        ));
    }
    if target.len() > 256 {
        return Err(format!("{target:?} is longer than 256 bytes"));
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading configuration {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing configuration {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::parse_from(std::iter::once("amidalad").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_then_file_then_flags() {
        let none = Config::merge(&cli(&[]), FileConfig::default()).unwrap();
        assert_eq!(none.provider, ProviderKind::Local);
        assert_eq!(none.socket, Path::new(DEFAULT_SOCKET));
        assert_eq!(none.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(none.plugin_dir, Path::new(DEFAULT_PLUGIN_DIR));
        assert_eq!(none.max_builds, DEFAULT_MAX_BUILDS);

        let file: FileConfig = toml::from_str(
            "provider = \"ec2\"\nsocket = \"/f/sock\"\nstate_dir = \"/f/state\"\nmax_builds = 2\n",
        )
        .unwrap();
        let merged = Config::merge(
            &cli(&["--socket", "/flag/sock", "--provider", "local"]),
            file,
        )
        .unwrap();
        assert_eq!(merged.provider, ProviderKind::Local, "flag wins");
        assert_eq!(merged.socket, Path::new("/flag/sock"), "flag wins");
        assert_eq!(merged.state_dir, Path::new("/f/state"), "file over default");
        assert_eq!(merged.max_builds, 2);
    }

    #[test]
    fn the_ec2_section_reads_with_defaults_and_flags_win() {
        let file: FileConfig = toml::from_str(
            "provider = \"ec2\"\n[ec2]\nregion = \"eu-west-1\"\ndata_plane = \"loop\"\ndevice_names = [\"/dev/sdg\"]\n[ec2.timeouts]\nattach = 5\n",
        )
        .unwrap();
        let merged = Config::merge(&cli(&["--region", "us-east-2"]), file).unwrap();
        assert_eq!(merged.ec2.region.as_deref(), Some("us-east-2"));
        assert_eq!(merged.ec2.data_plane, Some(DataPlane::Loop));
        assert_eq!(merged.ec2.device_names, Some(vec!["/dev/sdg".to_owned()]));
        assert_eq!(merged.ec2.timeouts.attach, 5);
        assert_eq!(
            merged.ec2.timeouts.snapshot,
            Ec2Timeouts::default().snapshot
        );
        assert!(toml::from_str::<FileConfig>("[ec2]\nregoin = \"x\"").is_err());
    }

    #[test]
    fn the_example_file_documents_real_keys() {
        // Every commented-out setting of the shipped example, switched on, must parse.
        let example = include_str!("../../systemd/amidalad.toml");
        let on: String = example
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest)
                    if !rest.starts_with(' ')
                        && (rest.contains(" = ") || rest.starts_with("[[")) =>
                {
                    rest
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(
            on.lines().filter(|l| l.contains(" = ")).count() >= 20,
            "{on}"
        );
        let file: FileConfig = toml::from_str(&on).unwrap();
        let config = Config::merge(&cli(&[]), file).unwrap();
        assert_eq!(config.provider, ProviderKind::Local);
        assert_eq!(config.ec2.data_plane, Some(DataPlane::Ebs));
        assert_eq!(
            config.ec2.timeouts,
            Ec2Timeouts::default(),
            "the example shows the defaults"
        );
        assert_eq!(
            config.limits,
            Limits::default(),
            "the example shows the defaults"
        );
        assert_eq!(
            config.policy,
            crate::policy::PolicyConfig::default(),
            "the example shows the defaults"
        );
        assert_eq!(config.warm_pool.len(), 1);
        assert_eq!(config.warm_pool[0].volumes, 1);
        assert_eq!(config.warm_pool[0].refresh_secs, 60);
    }

    #[test]
    fn cache_targets_are_plain_directories_of_the_image() {
        assert!(validate_cache_target("/var/cache/apt/archives").is_ok());
        for bad in [
            "var/cache",
            "/",
            "/var//cache",
            "/var/../etc",
            "/proc/x",
            "/workspace",
            "/a/./b",
        ] {
            assert!(validate_cache_target(bad).is_err(), "{bad}");
        }
        let file: FileConfig =
            toml::from_str("[caches]\napt = \"/var/cache/apt/archives\"\n").unwrap();
        assert!(Config::merge(&cli(&[]), file).is_ok());
        let file: FileConfig = toml::from_str("[caches]\nApt = \"/var/cache/apt\"\n").unwrap();
        assert!(Config::merge(&cli(&[]), file).is_err());
        let file: FileConfig = toml::from_str(
            "[caches]\napt = \"/var/cache/apt\"\ndebs = \"/var/cache/apt/archives\"\n",
        )
        .unwrap();
        assert!(Config::merge(&cli(&[]), file).is_err(), "nested caches");
        let file: FileConfig =
            toml::from_str("[caches]\na = \"/var/cache/x\"\nb = \"/var/cache/x\"\n").unwrap();
        assert!(
            Config::merge(&cli(&[]), file).is_err(),
            "the same directory twice"
        );
        let file: FileConfig =
            toml::from_str("[caches]\na = \"/var/cache/x\"\nb = \"/var/cache/xy\"\n").unwrap();
        assert!(Config::merge(&cli(&[]), file).is_ok(), "siblings");
    }

    #[test]
    fn bad_files_and_values_are_refused() {
        assert!(toml::from_str::<FileConfig>("sockett = \"/x\"").is_err());
        assert!(toml::from_str::<FileConfig>("provider = \"gcp\"").is_err());
        assert!(Config::merge(&cli(&["--max-builds", "0"]), FileConfig::default()).is_err());
        assert!(Config::merge(&cli(&["--state-dir", "rel"]), FileConfig::default()).is_err());
    }
}
