//! Build spec files: `amidala.toml` in the workspace says what `amidala build` with no
//! arguments builds; flags on the command line override it.
//!
//! Every key is checked as the file is read, so that a mistake is reported with its line:
//! unknown keys, values of the wrong type, malformed tags, sizes and durations.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use amidala::proto::{parse_duration, parse_size, validate_user_tags, Tag};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// The spec file `amidala build` reads from the workspace when `--spec` names none.
pub const DEFAULT_SPEC: &str = "amidala.toml";

/// The contents of a spec file. The keys are the long options of `amidala build`, with `_`
/// for `-` (`snapshot_tags`, `copy_to`, ...); what a flag may be given several times for is a
/// list or a table here.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    /// Start from the newest snapshot with this tag, `"K=V"`.
    #[serde(default, deserialize_with = "tag")]
    pub from: Option<Tag>,
    /// Start from this snapshot.
    pub source: Option<String>,
    /// The partition (1-based) that holds the root filesystem.
    pub partition: Option<u32>,
    /// The image name template.
    pub name: Option<String>,
    /// The image's tags, a table of `key = "value"`.
    #[serde(default, deserialize_with = "tags")]
    pub tags: Vec<Tag>,
    /// The output snapshot's tags.
    #[serde(default, deserialize_with = "tags")]
    pub snapshot_tags: Vec<Tag>,
    /// Volume size: bytes, or a string such as `"20G"`.
    #[serde(default, deserialize_with = "size")]
    pub size: Option<u64>,
    pub arch: Option<String>,
    pub boot_mode: Option<String>,
    #[serde(default)]
    pub copy_to: Vec<String>,
    #[serde(default)]
    pub share_with: Vec<String>,
    pub workspace_rw: Option<bool>,
    pub network: Option<String>,
    /// The provisioner's deadline: seconds, or a string such as `"15m"`.
    #[serde(default, deserialize_with = "timeout")]
    pub timeout: Option<u64>,
    /// Package caches of the daemon to mount.
    #[serde(default)]
    pub caches: Vec<String>,
    /// Boot-test the image before it is registered (`--boot-test`), and how.
    pub boot_test: Option<bool>,
    pub boot_firmware: Option<String>,
    pub boot_marker: Option<String>,
    #[serde(default, deserialize_with = "timeout")]
    pub boot_timeout: Option<u64>,
    /// The command to run in the image, a list of strings.
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub provisioner: SpecProvisioner,
}

/// The `[provisioner]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecProvisioner {
    pub name: Option<String>,
    /// `[provisioner.options]`: the provisioner's options; strings, numbers or booleans.
    #[serde(default, deserialize_with = "options")]
    pub options: BTreeMap<String, String>,
}

impl SpecFile {
    /// Reads and checks the spec file at `path`.
    pub fn load(path: &Path) -> anyhow::Result<SpecFile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading the spec file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Parses a spec file's text; an error names the line and column of the mistake.
    pub fn parse(text: &str) -> Result<SpecFile, String> {
        let spec: SpecFile =
            toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
        if spec.from.is_some() && spec.source.is_some() {
            return Err("`from` and `source` both say where to start: keep one".into());
        }
        Ok(spec)
    }
}

/// The spec file a build uses: the one `--spec` names, else `amidala.toml` in `dir` if there is
/// one, else none (`no_spec` ignores the workspace's).
pub fn find(explicit: Option<&Path>, no_spec: bool, dir: &Path) -> Option<PathBuf> {
    match explicit {
        Some(path) => Some(path.to_owned()),
        None if no_spec => None,
        None => {
            let path = dir.join(DEFAULT_SPEC);
            path.is_file().then(|| PathBuf::from(DEFAULT_SPEC))
        }
    }
}

fn tag<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Tag>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(de::Error::custom)
}

fn tags<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Tag>, D::Error> {
    let tags: Vec<Tag> = BTreeMap::<String, String>::deserialize(d)?
        .into_iter()
        .map(|(key, value)| Tag { key, value })
        .collect();
    validate_user_tags("tags", &tags).map_err(de::Error::custom)?;
    Ok(tags)
}

/// A number, or a string a parser understands (`"20G"`, `"15m"`).
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match NumberOrText::deserialize(d)? {
        NumberOrText::Number(n) => Ok(Some(n)),
        NumberOrText::Text(s) => parse_size(&s).map(Some).map_err(de::Error::custom),
    }
}

fn timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match NumberOrText::deserialize(d)? {
        NumberOrText::Number(0) => Err(de::Error::custom("a timeout of 0 seconds")),
        NumberOrText::Number(n) => Ok(Some(n)),
        NumberOrText::Text(s) => parse_duration(&s).map(Some).map_err(de::Error::custom),
    }
}

/// Provisioner options: a table whose values are strings, numbers or booleans, passed on as
/// text (`--opt KEY=VALUE`).
fn options<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let table = BTreeMap::<String, OptionValue>::deserialize(d)?;
    Ok(table.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// One provisioner option's value, as text.
struct OptionValue(String);

impl<'de> Deserialize<'de> for OptionValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Scalar;
        impl Visitor<'_> for Scalar {
            type Value = OptionValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a number or a boolean (a provisioner option)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OptionValue, E> {
                Ok(OptionValue(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<OptionValue, E> {
                Ok(OptionValue(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<OptionValue, E> {
                Ok(OptionValue(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<OptionValue, E> {
                Ok(OptionValue(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<OptionValue, E> {
                Ok(OptionValue(v.to_string()))
            }
        }
        d.deserialize_any(Scalar)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_spec() {
        let spec = SpecFile::parse(
            r#"
from = "amidala=system"
name = "web-{date}-{build}"
size = "20G"
timeout = "15m"
tags = { role = "web", team = "ops" }
snapshot_tags = { amidala = "web" }
copy_to = ["eu-west-1"]
caches = ["apt"]
workspace_rw = true
network = "no-metadata"
command = ["sh", "build.sh"]

[provisioner]
name = "chef"
options = { run_list = "recipe[web]", retries = 3, verbose = true }
"#,
        )
        .unwrap();
        assert_eq!(spec.from.unwrap().to_string(), "amidala=system");
        assert_eq!(spec.size, Some(20 << 30));
        assert_eq!(spec.timeout, Some(900));
        assert_eq!(spec.tags.len(), 2);
        assert_eq!(spec.tags[0].to_string(), "role=web");
        assert_eq!(spec.workspace_rw, Some(true));
        assert_eq!(spec.command.unwrap(), ["sh", "build.sh"]);
        assert_eq!(spec.provisioner.name.as_deref(), Some("chef"));
        assert_eq!(spec.provisioner.options["retries"], "3");
        assert_eq!(spec.provisioner.options["verbose"], "true");
        assert_eq!(SpecFile::parse("size = 1024").unwrap().size, Some(1024));
        assert!(SpecFile::parse("").unwrap().from.is_none());
    }

    /// The line of the mistake, as the error names it.
    fn line_of(text: &str) -> String {
        let err = SpecFile::parse(text).unwrap_err();
        err.lines().next().unwrap_or_default().to_owned() + " / " + &err
    }

    #[test]
    fn mistakes_name_their_line() {
        let text = "name = \"x\"\n\nfrom = \"amidala=base\"\nsnapshot_tag = { a = \"b\" }\n";
        let err = line_of(text);
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("snapshot_tag"), "{err}");
        let err = line_of("[provisioner]\nname = \"shell\"\nopts = {}\n");
        assert!(err.contains("line 3") && err.contains("opts"), "{err}");
        let err = line_of("name = \"x\"\nsize = \"20Q\"\n");
        assert!(err.contains("line 2"), "{err}");
        let err = line_of("\nfrom = \"no-equals-sign\"\n");
        assert!(err.contains("line 2") && err.contains("KEY=VALUE"), "{err}");
        let err = line_of("\n\ntimeout = \"soon\"\n");
        assert!(err.contains("line 3"), "{err}");
        let err = line_of("command = \"sh build.sh\"\n");
        assert!(err.contains("line 1"), "{err}");
        let err = line_of("[provisioner.options]\nx = [1]\n");
        assert!(
            err.contains("line 2") && err.contains("a provisioner option"),
            "{err}"
        );
        let err = line_of("tags = { \"amidala:x\" = \"y\" }\n");
        assert!(err.contains("line 1"), "{err}");
        let err = SpecFile::parse("from = \"a=b\"\nsource = \"snap-1\"\n").unwrap_err();
        assert!(err.contains("keep one"), "{err}");
    }

    #[test]
    fn the_workspace_spec_is_found_unless_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find(None, false, dir.path()), None);
        std::fs::write(dir.path().join(DEFAULT_SPEC), "").unwrap();
        assert_eq!(
            find(None, false, dir.path()),
            Some(PathBuf::from(DEFAULT_SPEC))
        );
        assert_eq!(find(None, true, dir.path()), None);
        let other = Path::new("other.toml");
        assert_eq!(find(Some(other), true, dir.path()), Some(other.to_owned()));
    }
}
