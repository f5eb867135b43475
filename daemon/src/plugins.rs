//! Provisioner plugins: shared libraries loaded from the plugin directory.
//!
//! A library is loaded only if it and its directory are owned by root and not writable by
//! group or others; its entry point must speak our ABI version. The [`Plugin`] owns the
//! `Library`, so the vtable and the strings it points to live exactly as long as the library.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use amidala::proto::{PluginInfo, PluginOption};
use amidala_plugin::{
    host, BuildInfo, EntryFn, PluginError, Vtable, ABI_VERSION, ENTRY_ABI_MISMATCH, ENTRY_OK,
    ENTRY_SYMBOL,
};

/// Why a plugin was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {what}")]
    Untrusted { path: PathBuf, what: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot load: {source}")]
    Library {
        path: PathBuf,
        source: libloading::Error,
    },
    #[error("{path}: plugin speaks ABI version {plugin}, amidalad speaks {host}")]
    AbiMismatch {
        path: PathBuf,
        plugin: u32,
        host: u32,
    },
    #[error("{path}: entry point refused with code {code}")]
    Refused { path: PathBuf, code: i32 },
}

/// A loaded provisioner.
#[derive(Debug)]
pub struct Plugin {
    pub name: String,
    pub version: String,
    pub description: String,
    pub options: Vec<PluginOption>,
    pub path: PathBuf,
    vtable: Vtable,
    // Declared last: dropped after everything that may point into it.
    _library: libloading::Library,
}

// SAFETY: the vtable holds function pointers and pointers to immutable static strings of the
// library; plugins are required (ABI contract) to be callable from any thread.
unsafe impl Send for Plugin {}
// SAFETY: as above; nothing in `Plugin` is mutated after loading.
unsafe impl Sync for Plugin {}

/// Refuses a file or directory that someone other than root could change.
pub fn check_trusted(path: &Path) -> Result<(), LoadError> {
    let meta = fs::metadata(path).map_err(|source| LoadError::Io {
        path: path.to_owned(),
        source,
    })?;
    check_trusted_metadata(path, &meta)
}

/// [`check_trusted`] on the metadata of `path`, as of an open file.
pub fn check_trusted_metadata(path: &Path, meta: &fs::Metadata) -> Result<(), LoadError> {
    if meta.uid() != 0 {
        return Err(LoadError::Untrusted {
            path: path.to_owned(),
            what: format!("owned by uid {}, not root", meta.uid()),
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(LoadError::Untrusted {
            path: path.to_owned(),
            what: format!(
                "writable by group or others (mode {:o})",
                meta.mode() & 0o7777
            ),
        });
    }
    Ok(())
}

impl Plugin {
    /// Loads the plugin at `path` after checking who may have written it.
    pub fn load(path: &Path) -> Result<Plugin, LoadError> {
        if let Some(dir) = path.parent() {
            check_trusted(dir)?;
        }
        check_trusted(path)?;
        // SAFETY: loading runs the library's initialisers. The file is root-owned and not
        // writable by others (checked above), so it is code the administrator installed.
        let library =
            unsafe { libloading::Library::new(path) }.map_err(|source| LoadError::Library {
                path: path.to_owned(),
                source,
            })?;
        // SAFETY: the symbol is declared by the SDK with exactly the `EntryFn` signature.
        let entry: libloading::Symbol<EntryFn> = unsafe { library.get(ENTRY_SYMBOL.as_bytes()) }
            .map_err(|source| LoadError::Library {
                path: path.to_owned(),
                source,
            })?;
        let mut vtable = std::mem::MaybeUninit::<Vtable>::zeroed();
        // SAFETY: `vtable` is valid for writes of a whole `Vtable` of our ABI version.
        let rc = unsafe { entry(ABI_VERSION, vtable.as_mut_ptr()) };
        if rc == ENTRY_ABI_MISMATCH {
            // SAFETY: on a mismatch the plugin writes its version into the first field only;
            // the memory was zeroed, so the read is of an initialised u32.
            let plugin = unsafe { vtable.as_ptr().cast::<u32>().read() };
            return Err(LoadError::AbiMismatch {
                path: path.to_owned(),
                plugin,
                host: ABI_VERSION,
            });
        }
        if rc != ENTRY_OK {
            return Err(LoadError::Refused {
                path: path.to_owned(),
                code: rc,
            });
        }
        // SAFETY: the entry point answered OK, which means it filled the whole vtable.
        let vtable = unsafe { vtable.assume_init() };
        if vtable.abi_version != ABI_VERSION {
            return Err(LoadError::AbiMismatch {
                path: path.to_owned(),
                plugin: vtable.abi_version,
                host: ABI_VERSION,
            });
        }
        // SAFETY: the strings point into `library`, which is loaded.
        let (name, version, description) = unsafe {
            (
                host::vtable_str(vtable.name),
                host::vtable_str(vtable.version),
                host::vtable_str(vtable.description),
            )
        };
        // SAFETY: the vtable was filled by the plugin, whose library is loaded.
        let options = unsafe { host::vtable_options(&vtable) }
            .into_iter()
            .map(|(name, description, required)| PluginOption {
                name,
                description,
                required,
            })
            .collect();
        Ok(Plugin {
            name,
            version,
            description,
            options,
            path: path.to_owned(),
            vtable,
            _library: library,
        })
    }

    pub fn validate(&self, build: &BuildInfo) -> Result<(), PluginError> {
        // SAFETY: the function comes from this plugin's vtable and the library is loaded.
        unsafe { host::call(self.vtable.validate, build) }.map(|_| ())
    }

    pub fn provision(&self, build: &BuildInfo) -> Result<i32, PluginError> {
        // SAFETY: the function comes from this plugin's vtable and the library is loaded.
        unsafe { host::call(self.vtable.provision, build) }
    }

    pub fn info(&self) -> PluginInfo {
        PluginInfo {
            name: self.name.clone(),
            version: self.version.clone(),
            description: self.description.clone(),
            path: self.path.display().to_string(),
            options: self.options.clone(),
        }
    }
}

/// The argument that makes `amidalad` a validator: `amidalad __validate PLUGIN`.
pub const VALIDATOR_ARG: &str = "__validate";
/// How long a plugin may take to validate a build.
pub const VALIDATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What a validator process answers on stdout.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Verdict {
    error: Option<String>,
}

/// Entry point of `amidalad __validate PLUGIN`: reads the build's [`BuildInfo`] as JSON on
/// stdin, loads the plugin, validates, and answers a verdict on stdout. It runs in a process of
/// its own so that a plugin that crashes while validating takes nothing else down.
pub fn validator_main(plugin: &Path) -> ! {
    use std::io::{Read, Write};
    let verdict = (|| {
        let mut input = String::new();
        std::io::stdin()
            .read_to_string(&mut input)
            .map_err(|e| format!("reading the request: {e}"))?;
        let build: BuildInfo =
            serde_json::from_str(&input).map_err(|e| format!("decoding the request: {e}"))?;
        let plugin = Plugin::load(plugin).map_err(|e| e.to_string())?;
        plugin.validate(&build).map_err(|e| e.message)
    })();
    let answer = serde_json::to_string(&Verdict {
        error: verdict.err(),
    })
    .expect("verdicts serialize");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(answer.as_bytes());
    let _ = out.flush();
    std::process::exit(0)
}

impl Plugin {
    /// Validates `build` in a validator process; a crash, a hang or a refusal is an error.
    pub async fn validate_isolated(&self, build: &BuildInfo) -> Result<(), crate::error::Failure> {
        use crate::error::Failure;
        use amidala::proto::ErrorCode;
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(crate::helper::program())
            .arg0("amidalad-validate")
            .arg(VALIDATOR_ARG)
            .arg(&self.path)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Failure::io("starting the validator", e))?;
        let input = serde_json::to_vec(build).expect("build info serializes");
        let mut stdin = child.stdin.take().expect("piped");
        // A plugin that exits before reading is judged by its answer below.
        let _ = stdin.write_all(&input).await;
        drop(stdin);
        let output = tokio::time::timeout(VALIDATE_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| {
                Failure::new(
                    ErrorCode::ProvisionerFailed,
                    format!(
                        "provisioner {} did not validate the build within {}s",
                        self.name,
                        VALIDATE_TIMEOUT.as_secs()
                    ),
                )
            })?
            .map_err(|e| Failure::io("waiting for the validator", e))?;
        match serde_json::from_slice::<Verdict>(&output.stdout) {
            Ok(Verdict { error: None }) if output.status.success() => Ok(()),
            Ok(Verdict {
                error: Some(message),
            }) => Err(Failure::invalid(format!(
                "provisioner {}: {message}",
                self.name
            ))),
            _ => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let last = stderr.lines().last().unwrap_or("").trim();
                Err(Failure::new(
                    ErrorCode::ProvisionerFailed,
                    format!(
                        "provisioner {} crashed while validating the build ({}){}",
                        self.name,
                        output.status,
                        if last.is_empty() {
                            String::new()
                        } else {
                            format!(": {last}")
                        }
                    ),
                ))
            }
        }
    }
}

/// The plugins loaded at start, by name.
#[derive(Debug, Default)]
pub struct Plugins {
    by_name: BTreeMap<String, Arc<Plugin>>,
}

impl Plugins {
    /// Loads every `*.so` in `dir`. Refusals are logged with their reason and skip the file.
    pub fn load_dir(dir: &Path) -> Plugins {
        let mut plugins = Plugins::default();
        if let Err(e) = check_trusted(dir) {
            tracing::error!(error = %e, "plugin directory refused; no provisioner is available");
            return plugins;
        }
        let mut paths: Vec<PathBuf> = match fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "so"))
                .collect(),
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot read the plugin directory");
                return plugins;
            }
        };
        paths.sort();
        for path in paths {
            match Plugin::load(&path) {
                Ok(plugin) => {
                    if let Some(first) = plugins.by_name.get(&plugin.name) {
                        tracing::error!(
                            name = %plugin.name,
                            path = %path.display(),
                            first = %first.path.display(),
                            "plugin refused: a plugin of that name is already loaded"
                        );
                        continue;
                    }
                    tracing::info!(name = %plugin.name, version = %plugin.version, path = %path.display(), "plugin loaded");
                    plugins
                        .by_name
                        .insert(plugin.name.clone(), Arc::new(plugin));
                }
                Err(e) => tracing::error!(error = %e, "plugin refused"),
            }
        }
        plugins
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }

    pub fn infos(&self) -> Vec<PluginInfo> {
        self.by_name.values().map(|p| p.info()).collect()
    }
}
