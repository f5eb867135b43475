//! The shell provisioner: runs the build's command inside the image, with `/workspace` as its
//! working directory. Its exit status is the build's: anything but 0 fails the build.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use amidala_plugin::{export_provisioner, BuildInfo, PluginError, Provisioner};

/// Runs `CMD [ARG]...` given after `--` on the `amidala build` command line.
#[derive(Debug)]
pub struct Shell;

impl Provisioner for Shell {
    const NAME: &'static str = "shell";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "runs a command inside the image, cwd /workspace";

    fn validate(build: &BuildInfo) -> Result<(), PluginError> {
        if let Some(key) = build.options.keys().next() {
            return Err(PluginError::invalid(format!(
                "the shell provisioner takes no options, got {key:?}"
            )));
        }
        match build.command.first() {
            None => Err(PluginError::invalid(
                "the shell provisioner needs a command: amidala build -- CMD [ARG]...",
            )),
            Some(cmd) if cmd.is_empty() => Err(PluginError::invalid("the command is empty")),
            Some(_) => Ok(()),
        }
    }

    fn provision(build: &BuildInfo) -> Result<i32, PluginError> {
        let (program, args) = build
            .command
            .split_first()
            .ok_or_else(|| PluginError::invalid("no command"))?;
        let status = Command::new(program)
            .args(args)
            .current_dir(&build.workspace)
            .status()
            .map_err(|e| PluginError::failed(format!("cannot run {program}: {e}")))?;
        Ok(match (status.code(), status.signal()) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 1,
        })
    }
}

export_provisioner!(Shell);
