//! `probe`: a provisioner for amidala's tests, written as a third party would, from the SDK
//! alone. It records what it was told, or fails in the way `--opt mode=` asks.

use std::fmt::Write as _;

use amidala_plugin::{export_provisioner, BuildInfo, OptionDecl, PluginError, Provisioner};
use nix::sys::signal::{raise, signal, SigHandler, Signal};

/// Dies of SIGSEGV. The Rust runtime's own SIGSEGV handler (for stack overflows) would take a
/// raised signal and return, so the default action comes back first.
fn segfault() {
    // SAFETY: setting a signal's action to its default has no memory-safety preconditions.
    let _ = unsafe { signal(Signal::SIGSEGV, SigHandler::SigDfl) };
    let _ = raise(Signal::SIGSEGV);
}

pub struct Probe;

impl Provisioner for Probe {
    const NAME: &'static str = "probe";
    const VERSION: &'static str = "0.1.0";
    const DESCRIPTION: &'static str = "records what it was told (a test plugin)";
    const OPTIONS: &'static [OptionDecl] = &[
        OptionDecl::required("marker", "text written into /root/probe"),
        OptionDecl::optional(
            "mode",
            "ok, panic, segfault, abort, validate-panic or validate-segfault",
        ),
    ];

    fn validate(build: &BuildInfo) -> Result<(), PluginError> {
        match build.options.get("mode").map(String::as_str) {
            None | Some("ok" | "panic" | "segfault" | "abort") => Ok(()),
            Some("validate-panic") => panic!("probe panics while validating"),
            Some("validate-segfault") => {
                segfault();
                Ok(())
            }
            Some(other) => Err(PluginError::invalid(format!("unknown mode {other:?}"))),
        }
    }

    fn provision(build: &BuildInfo) -> Result<i32, PluginError> {
        match build.options.get("mode").map(String::as_str) {
            Some("panic") => panic!("probe panics while provisioning"),
            Some("segfault") => segfault(),
            Some("abort") => std::process::abort(),
            _ => {}
        }
        let mut out = String::new();
        writeln!(out, "marker={}", build.options["marker"]).unwrap();
        writeln!(out, "build={}", build.build_id).unwrap();
        writeln!(out, "source={}", build.source_snapshot).unwrap();
        writeln!(out, "image={}", build.image_name).unwrap();
        writeln!(out, "workspace={}", build.workspace).unwrap();
        writeln!(out, "cwd={}", std::env::current_dir().unwrap().display()).unwrap();
        let mut env: Vec<(String, String)> = std::env::vars().collect();
        env.sort();
        for (k, v) in env {
            writeln!(out, "env {k}={v}").unwrap();
        }
        std::fs::write("/root/probe", out)
            .map_err(|e| PluginError::failed(format!("writing /root/probe: {e}")))?;
        println!("probe wrote /root/probe");
        Ok(0)
    }
}

export_provisioner!(Probe);
