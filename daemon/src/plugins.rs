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

use amidala::proto::PluginInfo;
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
        Ok(Plugin {
            name,
            version,
            description,
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
