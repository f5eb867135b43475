//! Daemon configuration: command-line flags over a TOML file over built-in defaults.

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
}

/// The configuration in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub provider: ProviderKind,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub plugin_dir: PathBuf,
    pub max_builds: usize,
}

impl Config {
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
        };
        if config.max_builds == 0 {
            bail!("max_builds must be at least 1");
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
    fn bad_files_and_values_are_refused() {
        assert!(toml::from_str::<FileConfig>("sockett = \"/x\"").is_err());
        assert!(toml::from_str::<FileConfig>("provider = \"gcp\"").is_err());
        assert!(Config::merge(&cli(&["--max-builds", "0"]), FileConfig::default()).is_err());
        assert!(Config::merge(&cli(&["--state-dir", "rel"]), FileConfig::default()).is_err());
    }
}
