//! The chef provisioner: runs `chef-solo` (or `cinc-solo`, whichever the image has) inside the
//! image with cookbooks from the workspace.
//!
//! It writes a `solo.rb` into a private directory under `/tmp` in the image (cookbook path,
//! cache path, attributes), runs `chef-solo --config solo.rb --override-runlist RUN_LIST
//! --no-color`, and removes the directory afterwards, whatever happened. With
//! `--opt install=chef.deb` it first installs chef from a package file in the workspace with
//! `dpkg -i` (the omnibus package flow).

use std::path::{Path, PathBuf};
use std::process::Command;

use amidala_plugin::{
    exit_code, export_provisioner, workspace_path, BuildInfo, OptionDecl, PluginError, Provisioner,
};

/// See the crate documentation.
#[derive(Debug)]
pub struct Chef;

/// The programs tried, in order.
pub const CHEF_PROGRAMS: [&str; 2] = ["chef-solo", "cinc-solo"];

/// A run list as chef takes it: comma-separated `recipe[...]` and `role[...]` items.
fn check_run_list(run_list: &str) -> Result<(), PluginError> {
    let items: Vec<&str> = run_list.split(',').map(str::trim).collect();
    for item in &items {
        let name = item
            .strip_prefix("recipe[")
            .or_else(|| item.strip_prefix("role["))
            .and_then(|rest| rest.strip_suffix(']'));
        let ok = name.is_some_and(|n| !n.is_empty() && !n.contains(['[', ']', ',']));
        if !ok {
            return Err(PluginError::invalid(format!(
                "run_list item {item:?} is not recipe[NAME] or role[NAME]"
            )));
        }
    }
    Ok(())
}

/// Ruby string literal for `s`.
fn ruby(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('#', "\\#")
    )
}

/// The `solo.rb` for a run.
pub fn solo_rb(cookbooks: &Path, cache: &Path, attributes: Option<&Path>) -> String {
    let mut rb = format!(
        "# Written by amidala for one chef-solo run; removed afterwards.\ncookbook_path [{}]\nfile_cache_path {}\n",
        ruby(&cookbooks.to_string_lossy()),
        ruby(&cache.to_string_lossy())
    );
    if let Some(attributes) = attributes {
        rb.push_str(&format!(
            "json_attribs {}\n",
            ruby(&attributes.to_string_lossy())
        ));
    }
    rb
}

fn find_program() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    CHEF_PROGRAMS.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

impl Provisioner for Chef {
    const NAME: &'static str = "chef";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "runs chef-solo (or cinc-solo) with cookbooks from the workspace";
    const OPTIONS: &'static [OptionDecl] = &[
        OptionDecl::required(
            "run_list",
            "comma-separated recipe[...] and role[...] items",
        ),
        OptionDecl::optional(
            "cookbooks",
            "the cookbook directory in the workspace (default cookbooks)",
        ),
        OptionDecl::optional(
            "attributes",
            "a JSON attributes file in the workspace (json_attribs)",
        ),
        OptionDecl::optional(
            "install",
            "a chef or cinc .deb in the workspace, installed with dpkg -i first",
        ),
    ];

    fn validate(build: &BuildInfo) -> Result<(), PluginError> {
        check_run_list(&build.options["run_list"])?;
        for option in ["cookbooks", "attributes", "install"] {
            if let Some(value) = build.options.get(option) {
                workspace_path(option, value)?;
            }
        }
        if let Some(install) = build.options.get("install") {
            if !install.ends_with(".deb") {
                return Err(PluginError::invalid(format!(
                    "install {install:?} is not a .deb package"
                )));
            }
        }
        if !build.command.is_empty() {
            return Err(PluginError::invalid(
                "the chef provisioner takes no command; give the run list with --opt run_list=...",
            ));
        }
        Ok(())
    }

    fn provision(build: &BuildInfo) -> Result<i32, PluginError> {
        let workspace = Path::new(&build.workspace);
        if let Some(package) = build.options.get("install") {
            println!("amidala chef: installing {package}");
            let status = Command::new("dpkg")
                .arg("-i")
                .arg(workspace.join(package))
                .status()
                .map_err(|e| PluginError::failed(format!("running dpkg -i {package}: {e}")))?;
            if !status.success() {
                println!("amidala chef: dpkg -i {package} failed");
                return Ok(exit_code(status));
            }
        }
        let program = find_program().ok_or_else(|| {
            PluginError::failed("neither chef-solo nor cinc-solo is in the image; install one, or give --opt install=PACKAGE.deb")
        })?;
        let dir = PathBuf::from(format!("/tmp/amidala-chef-{}", build.build_id));
        std::fs::create_dir(&dir)
            .map_err(|e| PluginError::failed(format!("creating {}: {e}", dir.display())))?;
        let result = (|| {
            let cookbooks = workspace.join(
                build
                    .options
                    .get("cookbooks")
                    .map_or("cookbooks", String::as_str),
            );
            let attributes = build.options.get("attributes").map(|a| workspace.join(a));
            let solo = dir.join("solo.rb");
            std::fs::write(
                &solo,
                solo_rb(&cookbooks, &dir.join("cache"), attributes.as_deref()),
            )
            .map_err(|e| PluginError::failed(format!("writing {}: {e}", solo.display())))?;
            println!(
                "amidala chef: {} with run list {}",
                program.display(),
                build.options["run_list"]
            );
            let status = Command::new(&program)
                .arg("--config")
                .arg(&solo)
                .arg("--override-runlist")
                .arg(&build.options["run_list"])
                .arg("--no-color")
                .current_dir(workspace)
                .status()
                .map_err(|e| PluginError::failed(format!("running {}: {e}", program.display())))?;
            Ok(exit_code(status))
        })();
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            println!("amidala chef: removing {}: {e}", dir.display());
        }
        result
    }
}

export_provisioner!(Chef);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_lists_are_checked() {
        assert!(check_run_list("recipe[base]").is_ok());
        assert!(check_run_list("recipe[base::users], role[web]").is_ok());
        assert!(check_run_list("base").is_err());
        assert!(check_run_list("recipe[]").is_err());
        assert!(check_run_list("recipe[a],").is_err());
    }

    #[test]
    fn solo_rb_quotes_paths() {
        let rb = solo_rb(
            Path::new("/workspace/cook books"),
            Path::new("/tmp/c"),
            Some(Path::new("/workspace/a\"#{x}.json")),
        );
        assert!(
            rb.contains("cookbook_path [\"/workspace/cook books\"]\n"),
            "{rb}"
        );
        assert!(rb.contains("file_cache_path \"/tmp/c\"\n"), "{rb}");
        assert!(
            rb.contains("json_attribs \"/workspace/a\\\"\\#{x}.json\"\n"),
            "{rb}"
        );
    }
}
