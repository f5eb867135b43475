//! The ansible provisioner: runs `ansible-playbook` inside the image against localhost with the
//! local connection, the playbook, roles and collections coming from the workspace.
//!
//! Ansible's home and temporary directories are pointed at a private directory under `/tmp` in
//! the image, removed afterwards, so the image keeps no `~/.ansible`. Roles are looked up in
//! the workspace's `roles/` and, with `--opt requirements=FILE`, in the roles `ansible-galaxy`
//! installs from that file; collections in the workspace's `collections/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use amidala_plugin::{
    exit_code, export_provisioner, workspace_path, BuildInfo, OptionDecl, PluginError, Provisioner,
};

/// See the crate documentation.
#[derive(Debug)]
pub struct Ansible;

/// The `ansible-playbook` arguments for a build.
pub fn playbook_args(build: &BuildInfo) -> Vec<String> {
    let workspace = Path::new(&build.workspace);
    let mut args = vec![
        "-i".to_owned(),
        "localhost,".to_owned(),
        "-c".to_owned(),
        "local".to_owned(),
    ];
    if let Some(vars) = build.options.get("extra_vars") {
        args.extend(["--extra-vars".to_owned(), vars.clone()]);
    }
    if let Some(tags) = build.options.get("tags") {
        args.extend(["--tags".to_owned(), tags.clone()]);
    }
    if let Some(tags) = build.options.get("skip_tags") {
        args.extend(["--skip-tags".to_owned(), tags.clone()]);
    }
    let playbook = build
        .options
        .get("playbook")
        .map_or("playbook.yml", String::as_str);
    args.push(workspace.join(playbook).to_string_lossy().into_owned());
    args
}

impl Provisioner for Ansible {
    const NAME: &'static str = "ansible";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "runs ansible-playbook against the image itself, playbooks from the workspace";
    const OPTIONS: &'static [OptionDecl] = &[
        OptionDecl::optional("playbook", "the playbook in the workspace (default playbook.yml)"),
        OptionDecl::optional("extra_vars", "passed to --extra-vars (key=value pairs, JSON, or @FILE)"),
        OptionDecl::optional("tags", "only tasks with these tags (--tags)"),
        OptionDecl::optional("skip_tags", "skip tasks with these tags (--skip-tags)"),
        OptionDecl::optional("requirements", "a requirements file in the workspace; its roles are installed with ansible-galaxy first"),
    ];

    fn validate(build: &BuildInfo) -> Result<(), PluginError> {
        for option in ["playbook", "requirements"] {
            if let Some(value) = build.options.get(option) {
                workspace_path(option, value)?;
            }
        }
        if !build.command.is_empty() {
            return Err(PluginError::invalid(
                "the ansible provisioner takes no command; name the playbook with --opt playbook=FILE",
            ));
        }
        Ok(())
    }

    fn provision(build: &BuildInfo) -> Result<i32, PluginError> {
        let workspace = Path::new(&build.workspace);
        let dir = PathBuf::from(format!("/tmp/amidala-ansible-{}", build.build_id));
        std::fs::create_dir(&dir)
            .map_err(|e| PluginError::failed(format!("creating {}: {e}", dir.display())))?;
        let result = (|| {
            let mut roles = vec![workspace.join("roles")];
            let env = |cmd: &mut Command, roles: &[PathBuf]| {
                let roles: Vec<String> = roles
                    .iter()
                    .map(|r| r.to_string_lossy().into_owned())
                    .collect();
                cmd.env("ANSIBLE_HOME", &dir)
                    .env("ANSIBLE_LOCAL_TEMP", dir.join("tmp"))
                    .env("ANSIBLE_REMOTE_TEMP", dir.join("tmp"))
                    .env("ANSIBLE_ROLES_PATH", roles.join(":"))
                    .env("ANSIBLE_COLLECTIONS_PATH", workspace.join("collections"))
                    .env("ANSIBLE_RETRY_FILES_ENABLED", "false")
                    .env("ANSIBLE_NOCOLOR", "1")
                    .env("ANSIBLE_FORCE_COLOR", "0")
                    .env("PYTHONDONTWRITEBYTECODE", "1")
                    .current_dir(workspace);
            };
            if let Some(requirements) = build.options.get("requirements") {
                let installed = dir.join("roles");
                println!("amidala ansible: installing the roles of {requirements}");
                let mut galaxy = Command::new("ansible-galaxy");
                galaxy
                    .args(["role", "install", "-r"])
                    .arg(workspace.join(requirements))
                    .arg("-p")
                    .arg(&installed);
                env(&mut galaxy, &roles);
                let status = galaxy.status().map_err(|e| {
                    PluginError::failed(format!(
                        "running ansible-galaxy (is ansible in the image?): {e}"
                    ))
                })?;
                if !status.success() {
                    return Ok(exit_code(status));
                }
                roles.push(installed);
            }
            let mut playbook = Command::new("ansible-playbook");
            playbook.args(playbook_args(build));
            env(&mut playbook, &roles);
            let status = playbook.status().map_err(|e| {
                PluginError::failed(format!(
                    "running ansible-playbook (is ansible in the image?): {e}"
                ))
            })?;
            Ok(exit_code(status))
        })();
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            println!("amidala ansible: removing {}: {e}", dir.display());
        }
        result
    }
}

export_provisioner!(Ansible);

#[cfg(test)]
mod tests {
    use super::*;

    fn build(options: &[(&str, &str)]) -> BuildInfo {
        BuildInfo {
            build_id: "bld-1".into(),
            source_snapshot: String::new(),
            image_name: "x".into(),
            workspace: "/workspace".into(),
            command: vec![],
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn arguments_follow_the_options() {
        assert_eq!(
            playbook_args(&build(&[])),
            ["-i", "localhost,", "-c", "local", "/workspace/playbook.yml"]
        );
        assert_eq!(
            playbook_args(&build(&[
                ("playbook", "site.yml"),
                ("extra_vars", "a=1 b=2"),
                ("tags", "web")
            ])),
            [
                "-i",
                "localhost,",
                "-c",
                "local",
                "--extra-vars",
                "a=1 b=2",
                "--tags",
                "web",
                "/workspace/site.yml"
            ]
        );
        assert!(Ansible::validate(&build(&[("playbook", "../x.yml")])).is_err());
        assert!(Ansible::validate(&build(&[("requirements", "/r.yml")])).is_err());
    }
}
