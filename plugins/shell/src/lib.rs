//! The shell provisioner: runs the build's command, a script from the workspace, or inline
//! commands, inside the image with `/workspace` as working directory. Its exit status is the
//! build's: anything but 0 fails the build.

use std::path::Path;
use std::process::Command;

use amidala_plugin::{
    exit_code, export_provisioner, workspace_path, BuildInfo, OptionDecl, PluginError, Provisioner,
};

/// See the crate documentation.
#[derive(Debug)]
pub struct Shell;

/// What to run, from the command line or the options.
#[derive(Debug, PartialEq, Eq)]
enum Work<'a> {
    Command(&'a [String]),
    Script(&'a str),
    Inline(&'a str),
}

fn work(build: &BuildInfo) -> Result<Work<'_>, PluginError> {
    let script = build.options.get("script");
    let inline = build.options.get("inline");
    match (build.command.is_empty(), script, inline) {
        (false, None, None) => Ok(Work::Command(&build.command)),
        (true, Some(script), None) => Ok(Work::Script(script)),
        (true, None, Some(inline)) => Ok(Work::Inline(inline)),
        (true, None, None) => Err(PluginError::invalid(
            "the shell provisioner needs a command (amidala build -- CMD [ARG]...), --opt script=FILE or --opt inline=COMMANDS",
        )),
        _ => Err(PluginError::invalid(
            "give the shell provisioner one of a command, --opt script=FILE and --opt inline=COMMANDS, not several",
        )),
    }
}

fn check_env_name(key: &str) -> Result<(), PluginError> {
    let name = key.strip_prefix("env.").unwrap_or(key);
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(PluginError::invalid(format!(
            "{key:?}: {name:?} is not an environment variable name"
        )))
    }
}

/// The interpreter line of a script: `#!/bin/bash -e` gives `["/bin/bash", "-e"]` (Linux passes
/// everything after the interpreter as one argument).
fn shebang(head: &[u8]) -> Option<Vec<String>> {
    let line = head.strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n').unwrap_or(line.len())];
    let line = String::from_utf8_lossy(line);
    let line = line.trim();
    let (interpreter, arg) = match line.split_once([' ', '\t']) {
        Some((i, a)) => (i, Some(a.trim())),
        None => (line, None),
    };
    if interpreter.is_empty() {
        return None;
    }
    let mut out = vec![interpreter.to_owned()];
    out.extend(arg.filter(|a| !a.is_empty()).map(str::to_owned));
    Some(out)
}

impl Provisioner for Shell {
    const NAME: &'static str = "shell";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "runs a command, a workspace script or inline commands inside the image, cwd /workspace";
    const OPTIONS: &'static [OptionDecl] = &[
        OptionDecl::optional(
            "script",
            "a script in the workspace (relative path), run by its #! line, else by /bin/sh",
        ),
        OptionDecl::optional("inline", "shell commands, run by /bin/sh -e"),
        OptionDecl::optional("env.*", "env.NAME=VALUE sets the environment variable NAME"),
    ];

    fn validate(build: &BuildInfo) -> Result<(), PluginError> {
        for key in build.options.keys().filter(|k| k.starts_with("env.")) {
            check_env_name(key)?;
        }
        match work(build)? {
            Work::Command(cmd) if cmd[0].is_empty() => {
                Err(PluginError::invalid("the command is empty"))
            }
            Work::Script(script) => workspace_path("script", script),
            _ => Ok(()),
        }
    }

    fn provision(build: &BuildInfo) -> Result<i32, PluginError> {
        let mut cmd = match work(build)? {
            Work::Command(argv) => {
                let mut cmd = Command::new(&argv[0]);
                cmd.args(&argv[1..]);
                cmd
            }
            Work::Inline(commands) => {
                let mut cmd = Command::new("/bin/sh");
                cmd.args(["-e", "-c", commands]);
                cmd
            }
            Work::Script(script) => {
                let path = Path::new(&build.workspace).join(script);
                let head = std::fs::read(&path)
                    .map(|bytes| bytes.into_iter().take(256).collect::<Vec<u8>>())
                    .map_err(|e| {
                        PluginError::failed(format!("reading script {}: {e}", path.display()))
                    })?;
                let interpreter = shebang(&head).unwrap_or_else(|| vec!["/bin/sh".to_owned()]);
                let mut cmd = Command::new(&interpreter[0]);
                cmd.args(&interpreter[1..]).arg(&path);
                cmd
            }
        };
        for (key, value) in &build.options {
            if let Some(name) = key.strip_prefix("env.") {
                cmd.env(name, value);
            }
        }
        let status = cmd
            .current_dir(&build.workspace)
            .status()
            .map_err(|e| PluginError::failed(format!("cannot run {:?}: {e}", cmd.get_program())))?;
        Ok(exit_code(status))
    }
}

export_provisioner!(Shell);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn build(command: &[&str], options: &[(&str, &str)]) -> BuildInfo {
        BuildInfo {
            build_id: "bld-1".into(),
            source_snapshot: String::new(),
            image_name: "x".into(),
            workspace: "/workspace".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn exactly_one_thing_to_run() {
        assert!(Shell::validate(&build(&["true"], &[])).is_ok());
        assert!(Shell::validate(&build(&[], &[("script", "setup.sh")])).is_ok());
        assert!(Shell::validate(&build(&[], &[("inline", "true")])).is_ok());
        assert!(Shell::validate(&build(&[], &[]))
            .unwrap_err()
            .message
            .contains("needs a command"));
        assert!(Shell::validate(&build(&["true"], &[("inline", "x")]))
            .unwrap_err()
            .message
            .contains("not several"));
        assert!(Shell::validate(&build(&[], &[("script", "/etc/x")])).is_err());
        assert!(Shell::validate(&build(&[], &[("script", "../x")])).is_err());
        assert!(Shell::validate(&build(&["true"], &[("env.GOOD_1", "x")])).is_ok());
        assert!(Shell::validate(&build(&["true"], &[("env.1BAD", "x")])).is_err());
        assert!(Shell::validate(&build(&["true"], &[("env.A-B", "x")])).is_err());
    }

    #[test]
    fn shebang_lines() {
        assert_eq!(
            shebang(b"#!/bin/sh\necho"),
            Some(vec!["/bin/sh".to_owned()])
        );
        assert_eq!(
            shebang(b"#! /usr/bin/env python3 -u\n"),
            Some(vec!["/usr/bin/env".to_owned(), "python3 -u".to_owned()])
        );
        assert_eq!(
            shebang(b"#!/bin/bash -e"),
            Some(vec!["/bin/bash".to_owned(), "-e".to_owned()])
        );
        assert_eq!(shebang(b"echo hi\n"), None);
        assert_eq!(shebang(b"#!\n"), None);
    }
}
