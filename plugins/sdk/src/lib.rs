//! SDK for amidala provisioner plugins.
//!
//! A provisioner is a shared library (`cdylib`) that `amidalad` loads at start. It exports one
//! C symbol, [`ENTRY_SYMBOL`], of type [`EntryFn`]: the host calls it with the ABI version it
//! speaks; the plugin fills a [`Vtable`] and answers [`ENTRY_OK`], or writes only its own ABI
//! version into the vtable's first field and answers [`ENTRY_ABI_MISMATCH`].
//!
//! Memory rules: every [`AbiStr`] points into memory owned by the side that made it and is valid
//! only for the duration of the call it is passed in (for the vtable's strings: as long as the
//! library stays loaded, which the host guarantees). Nothing is ever freed across the boundary:
//! errors come back through an [`ErrorSink`] callback whose callee copies the message at once.
//!
//! Plugin authors implement [`Provisioner`] in safe Rust and call [`export_provisioner!`]; all
//! `unsafe` code of the ABI lives in this crate.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use serde::{Deserialize, Serialize};

/// The ABI version this SDK speaks. Bumped on any change to [`Vtable`], [`AbiStr`],
/// [`ErrorSink`] or the JSON of [`BuildInfo`] that an older peer could misread.
pub const ABI_VERSION: u32 = 1;

/// Name of the exported entry point (without the trailing NUL).
pub const ENTRY_SYMBOL: &str = "amidala_plugin_entry";

/// The entry point answered: vtable filled.
pub const ENTRY_OK: i32 = 0;
/// The entry point answered: this plugin speaks another ABI; only `abi_version` was written.
pub const ENTRY_ABI_MISMATCH: i32 = 1;
/// The entry point answered: the host passed a null vtable pointer.
pub const ENTRY_BAD_ARGUMENT: i32 = 2;

/// Error codes a plugin reports through the [`ErrorSink`].
pub mod codes {
    /// The options or the build are not acceptable to this provisioner.
    pub const INVALID: u32 = 1;
    /// Provisioning could not be carried out.
    pub const FAILED: u32 = 2;
    /// The plugin panicked.
    pub const PANIC: u32 = 3;
    /// The host sent a request the plugin could not decode.
    pub const BAD_REQUEST: u32 = 4;
}

/// A UTF-8 string crossing the boundary: pointer and length, no terminator.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AbiStr {
    pub ptr: *const u8,
    pub len: usize,
}

impl AbiStr {
    /// Borrows `s` for the boundary; the caller keeps `s` alive for as long as the callee may
    /// read it.
    pub fn new(s: &str) -> AbiStr {
        AbiStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// Reads the string back.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes that stay valid and unchanged for `'a`.
    pub unsafe fn as_str<'a>(&self) -> Result<&'a str, std::str::Utf8Error> {
        if self.len == 0 {
            return Ok("");
        }
        // SAFETY: the caller guarantees `ptr` is valid for `len` bytes for `'a`.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        std::str::from_utf8(bytes)
    }
}

/// Where a plugin reports an error: `set(ctx, code, message)`. The host copies the message
/// before `set` returns; the plugin frees nothing the host made and vice versa.
#[repr(C)]
#[derive(Debug)]
pub struct ErrorSink {
    pub ctx: *mut c_void,
    pub set: unsafe extern "C" fn(ctx: *mut c_void, code: u32, message: AbiStr),
}

/// One option a provisioner takes, as the vtable describes it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AbiOption {
    /// The key of `--opt KEY=VALUE`; a name ending in `*` is a prefix (`env.*`).
    pub name: AbiStr,
    pub description: AbiStr,
    pub required: bool,
}

/// One option a provisioner takes, as its author declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionDecl {
    /// The key of `--opt KEY=VALUE`; a name ending in `*` is a prefix (`env.*`).
    pub name: &'static str,
    pub description: &'static str,
    pub required: bool,
}

impl OptionDecl {
    /// An optional option.
    pub const fn optional(name: &'static str, description: &'static str) -> OptionDecl {
        OptionDecl {
            name,
            description,
            required: false,
        }
    }

    /// A required option.
    pub const fn required(name: &'static str, description: &'static str) -> OptionDecl {
        OptionDecl {
            name,
            description,
            required: true,
        }
    }

    /// Whether `key` is this option.
    pub fn matches(&self, key: &str) -> bool {
        match self.name.strip_suffix('*') {
            Some(prefix) => key.starts_with(prefix) && key.len() > prefix.len(),
            None => key == self.name,
        }
    }
}

/// Checks `options` against `decls`: no unknown key, every required one present.
pub fn check_options(
    decls: &[OptionDecl],
    options: &BTreeMap<String, String>,
) -> Result<(), PluginError> {
    if let Some(unknown) = options.keys().find(|k| !decls.iter().any(|d| d.matches(k))) {
        let known: Vec<&str> = decls.iter().map(|d| d.name).collect();
        return Err(PluginError::invalid(if known.is_empty() {
            format!("unknown option {unknown:?}: this provisioner takes none")
        } else {
            format!("unknown option {unknown:?} (known: {})", known.join(", "))
        }));
    }
    if let Some(missing) = decls
        .iter()
        .find(|d| d.required && !options.keys().any(|k| d.matches(k)))
    {
        return Err(PluginError::invalid(format!(
            "option {:?} is required: {}",
            missing.name, missing.description
        )));
    }
    Ok(())
}

/// Checks that `value`, given as option `option`, is a relative path that stays inside the
/// workspace (no leading `/`, no `..`).
pub fn workspace_path(option: &str, value: &str) -> Result<(), PluginError> {
    let path = std::path::Path::new(value);
    if value.is_empty()
        || path.is_absolute()
        || path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(PluginError::invalid(format!(
            "{option} {value:?} must be a relative path inside the workspace"
        )));
    }
    Ok(())
}

/// The exit status a provisioner reports for a finished program: its exit code, or 128 plus
/// the signal that killed it, as shells do.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    }
}

/// The plugin's functions and metadata. `abi_version` stays the first field in every version.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Vtable {
    pub abi_version: u32,
    pub name: AbiStr,
    pub version: AbiStr,
    pub description: AbiStr,
    /// The options the provisioner takes: `options_len` entries, valid while loaded.
    pub options: *const AbiOption,
    pub options_len: usize,
    /// `validate(build_info_json, sink)`: 0 when acceptable, -1 after reporting an error.
    pub validate: unsafe extern "C" fn(request: AbiStr, sink: *const ErrorSink) -> i32,
    /// `provision(build_info_json, sink)`: the exit status (>= 0), or -1 after reporting an error.
    pub provision: unsafe extern "C" fn(request: AbiStr, sink: *const ErrorSink) -> i32,
}

/// Type of the exported entry point.
pub type EntryFn = unsafe extern "C" fn(host_abi: u32, out: *mut Vtable) -> i32;

/// What a provisioner is told about its build; crosses the ABI as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildInfo {
    pub build_id: String,
    /// The snapshot the build started from (empty in `validate`, before it is resolved).
    pub source_snapshot: String,
    pub image_name: String,
    /// Where the user's build directory is mounted inside the image.
    pub workspace: String,
    /// The command given after `--`.
    pub command: Vec<String>,
    /// `--opt KEY=VALUE` options.
    pub options: BTreeMap<String, String>,
}

/// An error from a plugin: a code from [`codes`] and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    pub code: u32,
    pub message: String,
}

impl PluginError {
    pub fn invalid(message: impl Into<String>) -> Self {
        PluginError {
            code: codes::INVALID,
            message: message.into(),
        }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        PluginError {
            code: codes::FAILED,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PluginError {}

/// A provisioner, written in safe Rust. Export it with [`export_provisioner!`].
pub trait Provisioner {
    const NAME: &'static str;
    const VERSION: &'static str;
    const DESCRIPTION: &'static str;
    /// The options it takes. Unknown and missing required options are refused by the SDK
    /// before [`validate`](Self::validate) is called.
    const OPTIONS: &'static [OptionDecl] = &[];

    /// Checks options and command before any resource of the build exists (in a process of
    /// its own, before the build starts).
    fn validate(build: &BuildInfo) -> Result<(), PluginError>;

    /// Does the work. Runs in the build's executor process, rooted in the image, with
    /// `/workspace` as working directory; stdout and stderr go to the build log.
    /// Returns the exit status: 0 for success.
    fn provision(build: &BuildInfo) -> Result<i32, PluginError>;
}

/// Exports `$ty` (a [`Provisioner`]) as this library's plugin entry point.
#[macro_export]
macro_rules! export_provisioner {
    ($ty:ty) => {
        /// The amidala plugin entry point.
        ///
        /// # Safety
        /// `out` must be null or point to writable memory for a `Vtable` of the host's ABI.
        #[no_mangle]
        pub unsafe extern "C" fn amidala_plugin_entry(
            host_abi: u32,
            out: *mut $crate::Vtable,
        ) -> i32 {
            // SAFETY: forwarded unchanged; the contract of this function is that of `entry`.
            unsafe { $crate::__private::entry::<$ty>(host_abi, out) }
        }
    };
}

#[doc(hidden)]
pub mod __private {
    use super::*;

    /// # Safety
    /// `out` must be null or valid for writes of a `Vtable` (or at least its first `u32` when
    /// the versions differ).
    pub unsafe fn entry<T: Provisioner>(host_abi: u32, out: *mut Vtable) -> i32 {
        if out.is_null() {
            return ENTRY_BAD_ARGUMENT;
        }
        if host_abi != ABI_VERSION {
            // SAFETY: `abi_version` is the first field of the vtable in every ABI version, so
            // the host's memory holds at least this `u32` whatever version it speaks.
            unsafe { out.cast::<u32>().write(ABI_VERSION) };
            return ENTRY_ABI_MISMATCH;
        }
        // Made once per load and never freed: it must live as long as the library.
        let options: &'static [AbiOption] = Box::leak(
            T::OPTIONS
                .iter()
                .map(|o| AbiOption {
                    name: AbiStr::new(o.name),
                    description: AbiStr::new(o.description),
                    required: o.required,
                })
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        let vtable = Vtable {
            abi_version: ABI_VERSION,
            name: AbiStr::new(T::NAME),
            version: AbiStr::new(T::VERSION),
            description: AbiStr::new(T::DESCRIPTION),
            options: options.as_ptr(),
            options_len: options.len(),
            validate: validate::<T>,
            provision: provision::<T>,
        };
        // SAFETY: `out` is non-null and, as the host speaks our version, valid for a `Vtable`.
        unsafe { out.write(vtable) };
        ENTRY_OK
    }

    unsafe extern "C" fn validate<T: Provisioner>(request: AbiStr, sink: *const ErrorSink) -> i32 {
        // SAFETY: the host keeps `request` and `sink` valid for the duration of this call.
        unsafe {
            call(request, sink, |build| {
                check_options(T::OPTIONS, &build.options)?;
                T::validate(build).map(|()| 0)
            })
        }
    }

    unsafe extern "C" fn provision<T: Provisioner>(request: AbiStr, sink: *const ErrorSink) -> i32 {
        // SAFETY: the host keeps `request` and `sink` valid for the duration of this call.
        unsafe { call(request, sink, T::provision) }
    }

    /// Decodes the request, runs `f` catching panics, and reports any error to the sink.
    ///
    /// # Safety
    /// `request` must be valid for reads and `sink` null or valid, for the duration of the call.
    unsafe fn call(
        request: AbiStr,
        sink: *const ErrorSink,
        f: impl FnOnce(&BuildInfo) -> Result<i32, PluginError>,
    ) -> i32 {
        // SAFETY: guaranteed by the caller.
        let text = unsafe { request.as_str() };
        let result = match text {
            Err(e) => Err(PluginError {
                code: codes::BAD_REQUEST,
                message: format!("request is not UTF-8: {e}"),
            }),
            Ok(text) => match serde_json::from_str::<BuildInfo>(text) {
                Err(e) => Err(PluginError {
                    code: codes::BAD_REQUEST,
                    message: format!("cannot decode the build info: {e}"),
                }),
                Ok(build) => match catch_unwind(AssertUnwindSafe(|| f(&build))) {
                    Ok(result) => result,
                    Err(panic) => Err(PluginError {
                        code: codes::PANIC,
                        message: format!("provisioner panicked: {}", panic_message(&panic)),
                    }),
                },
            },
        };
        match result {
            Ok(status) => status.max(0),
            Err(err) => {
                if !sink.is_null() {
                    // SAFETY: `sink` is non-null and valid per the caller; the message lives
                    // until `set` returns, and the host copies it before returning.
                    unsafe { ((*sink).set)((*sink).ctx, err.code, AbiStr::new(&err.message)) };
                }
                -1
            }
        }
    }

    fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
        if let Some(s) = panic.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = panic.downcast_ref::<String>() {
            s.clone()
        } else {
            "(no message)".to_owned()
        }
    }
}

/// Host side: calling a plugin's functions. Used by `amidalad`; a plugin author needs none of it.
pub mod host {
    use super::*;

    unsafe extern "C" fn collect(ctx: *mut c_void, code: u32, message: AbiStr) {
        // SAFETY: `ctx` is the `&mut Option<PluginError>` that `call` below passed for this call.
        let slot = unsafe { &mut *ctx.cast::<Option<PluginError>>() };
        // SAFETY: the plugin keeps `message` valid until this function returns; we copy it.
        let text = unsafe { message.as_str() }
            .map(str::to_owned)
            .unwrap_or_else(|_| "(plugin sent a message that is not UTF-8)".to_owned());
        *slot = Some(PluginError {
            code,
            message: text,
        });
    }

    /// Calls `f` (a vtable's `validate` or `provision`) with `build` as JSON.
    ///
    /// # Safety
    /// `f` must come from a vtable filled by a plugin whose library is still loaded.
    pub unsafe fn call(
        f: unsafe extern "C" fn(AbiStr, *const ErrorSink) -> i32,
        build: &BuildInfo,
    ) -> Result<i32, PluginError> {
        let json = serde_json::to_string(build).expect("BuildInfo serializes");
        let mut error: Option<PluginError> = None;
        let sink = ErrorSink {
            ctx: (&mut error as *mut Option<PluginError>).cast(),
            set: collect,
        };
        // SAFETY: `json` and `sink` outlive the call; `f` is valid per the caller.
        let status = unsafe { f(AbiStr::new(&json), &sink) };
        match (status, error) {
            (s, None) if s >= 0 => Ok(s),
            (_, Some(err)) => Err(err),
            (s, None) => Err(PluginError::failed(format!(
                "plugin returned {s} without reporting an error"
            ))),
        }
    }

    /// Reads a vtable's option list.
    ///
    /// # Safety
    /// `vtable` must have been filled by a plugin whose library is still loaded.
    pub unsafe fn vtable_options(vtable: &Vtable) -> Vec<(String, String, bool)> {
        if vtable.options.is_null() || vtable.options_len == 0 {
            return Vec::new();
        }
        // SAFETY: the plugin filled `options_len` entries at `options`, valid while loaded.
        let options = unsafe { std::slice::from_raw_parts(vtable.options, vtable.options_len) };
        options
            .iter()
            // SAFETY: the strings point into the loaded library.
            .map(|o| unsafe { (vtable_str(o.name), vtable_str(o.description), o.required) })
            .collect()
    }

    /// Reads a vtable string.
    ///
    /// # Safety
    /// `s` must come from a vtable of a plugin whose library is still loaded.
    pub unsafe fn vtable_str(s: AbiStr) -> String {
        // SAFETY: vtable strings point into the loaded library, per the caller.
        unsafe { s.as_str() }
            .map(str::to_owned)
            .unwrap_or_else(|_| "(not UTF-8)".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    impl Provisioner for Echo {
        const NAME: &'static str = "echo";
        const VERSION: &'static str = "1.2.3";
        const DESCRIPTION: &'static str = "test provisioner";
        const OPTIONS: &'static [OptionDecl] = &[
            OptionDecl::required("level", "how much"),
            OptionDecl::optional("bad", "fails validation"),
            OptionDecl::optional("env.*", "environment"),
        ];

        fn validate(build: &BuildInfo) -> Result<(), PluginError> {
            if build.options.contains_key("bad") {
                return Err(PluginError::invalid("option bad is not known"));
            }
            Ok(())
        }

        fn provision(build: &BuildInfo) -> Result<i32, PluginError> {
            if build.command.is_empty() {
                panic!("no command");
            }
            Ok(build.command.len() as i32)
        }
    }

    fn info(command: &[&str], options: &[(&str, &str)]) -> BuildInfo {
        BuildInfo {
            build_id: "bld-1".into(),
            source_snapshot: String::new(),
            image_name: "img".into(),
            workspace: "/workspace".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn load() -> Vtable {
        let mut vt = std::mem::MaybeUninit::<Vtable>::uninit();
        // SAFETY: `vt` is valid for writes of a Vtable.
        let rc = unsafe { __private::entry::<Echo>(ABI_VERSION, vt.as_mut_ptr()) };
        assert_eq!(rc, ENTRY_OK);
        // SAFETY: entry returned OK, so it wrote the whole vtable.
        unsafe { vt.assume_init() }
    }

    #[test]
    fn round_trip_through_the_abi() {
        let vt = load();
        // SAFETY: the vtable's strings are 'static in this test.
        unsafe {
            assert_eq!(host::vtable_str(vt.name), "echo");
            assert_eq!(host::vtable_str(vt.version), "1.2.3");
        }
        // SAFETY: the functions come from a vtable of code linked into this test.
        unsafe {
            assert_eq!(
                host::call(
                    vt.validate,
                    &info(&["x"], &[("level", "1"), ("env.A", "b")])
                ),
                Ok(0)
            );
            let err = host::call(vt.validate, &info(&["x"], &[("level", "1"), ("bad", "1")]))
                .unwrap_err();
            assert_eq!(err.code, codes::INVALID);
            let err = host::call(vt.validate, &info(&["x"], &[])).unwrap_err();
            assert!(
                err.message.contains("\"level\" is required"),
                "{}",
                err.message
            );
            let err = host::call(
                vt.validate,
                &info(&["x"], &[("level", "1"), ("colour", "red")]),
            )
            .unwrap_err();
            assert!(
                err.message.contains("unknown option \"colour\""),
                "{}",
                err.message
            );
            let err = host::call(vt.validate, &info(&["x"], &[("level", "1"), ("env.", "x")]))
                .unwrap_err();
            assert!(
                err.message.contains("unknown option"),
                "a prefix alone is no option: {}",
                err.message
            );
            let options = host::vtable_options(&vt);
            assert_eq!(
                options[0],
                ("level".to_owned(), "how much".to_owned(), true)
            );
            assert_eq!(options.len(), 3);
            assert_eq!(host::call(vt.provision, &info(&["a", "b"], &[])), Ok(2));
            let err = host::call(vt.provision, &info(&[], &[])).unwrap_err();
            assert_eq!(err.code, codes::PANIC);
            assert!(err.message.contains("no command"), "{}", err.message);
        }
    }

    #[test]
    fn other_abi_versions_are_refused_with_ours_named() {
        let mut version: u32 = 0;
        // SAFETY: on a mismatch only the first u32 is written, and `version` is one.
        let rc =
            unsafe { __private::entry::<Echo>(ABI_VERSION + 1, (&mut version as *mut u32).cast()) };
        assert_eq!(rc, ENTRY_ABI_MISMATCH);
        assert_eq!(version, ABI_VERSION);
    }
}
