//! The chef and ansible provisioners in real builds (root, real daemon and client).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use amidala_tests::{run, Env, Mounted};

fn field<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key} in {v}"))
}

/// The contract a chef-solo must meet, checked by a stand-in: chef itself cannot be installed
/// from the package registries this project may use. The stand-in fails (exit 64 to 66) unless
/// amidala's chef provisioner calls it as documented: `--config SOLO_RB --override-runlist
/// RUN_LIST --no-color`, with a solo.rb naming the workspace's cookbooks and attributes, run
/// from /workspace. It records what it saw in /root/chef-ran.
const CHEF_SOLO_STAND_IN: &str = r#"#!/bin/sh
[ "$1" = --config ] && [ -f "$2" ] || { echo "chef-solo stand-in: want --config SOLO_RB, got $*" >&2; exit 64; }
[ "$3" = --override-runlist ] && [ "$5" = --no-color ] && [ $# -eq 5 ] || { echo "chef-solo stand-in: bad arguments: $*" >&2; exit 64; }
grep -qx 'cookbook_path \["/workspace/cookbooks"\]' "$2" || { echo "chef-solo stand-in: bad cookbook_path" >&2; cat "$2" >&2; exit 65; }
grep -qx 'json_attribs "/workspace/attributes.json"' "$2" || { echo "chef-solo stand-in: bad json_attribs" >&2; exit 65; }
[ "$(pwd)" = /workspace ] && [ -f /workspace/cookbooks/base/recipes/default.rb ] || { echo "chef-solo stand-in: no cookbooks" >&2; exit 66; }
{ echo "run_list=$4"; echo "config=$2"; cat /workspace/attributes.json; } > /root/chef-ran
echo "chef-solo stand-in: converged $4"
"#;

fn fake_chef_deb(dir: &Path) -> std::path::PathBuf {
    let pkg = dir.join("pkg");
    fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
    fs::create_dir_all(pkg.join("usr/bin")).unwrap();
    fs::write(
        pkg.join("DEBIAN/control"),
        "Package: chef-stand-in\nVersion: 1.0\nArchitecture: all\nMaintainer: amidala tests <tests@amidala.invalid>\nDescription: checks the chef-solo contract\n",
    )
    .unwrap();
    fs::write(pkg.join("usr/bin/chef-solo"), CHEF_SOLO_STAND_IN).unwrap();
    fs::set_permissions(
        pkg.join("usr/bin/chef-solo"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let deb = dir.join("chef-stand-in.deb");
    run(Command::new("dpkg-deb")
        .args(["-Zgzip", "--root-owner-group", "--build"])
        .arg(&pkg)
        .arg(&deb))
    .ok();
    deb
}

#[test]
fn chef_contract_with_a_stand_in_chef_solo_installed_from_the_workspace() {
    let env = Env::start_full("", &[], &[("libamidala_chef.so", "chef.so", 0o644)]);
    let rootfs = env.busybox_rootfs("rootfs");
    env.import(&rootfs, &[]);
    let ws = env.workspace("ws", &[("attributes.json", "{\"motd\": \"hello\"}\n")]);
    fs::create_dir_all(ws.join("cookbooks/base/recipes")).unwrap();
    fs::write(
        ws.join("cookbooks/base/recipes/default.rb"),
        "file '/etc/motd'\n",
    )
    .unwrap();
    let deb = fake_chef_deb(&ws);
    assert!(deb.starts_with(&ws));

    // Without chef in the image and no package to install: a clear failure.
    let none = env.amidala_in(
        &ws,
        &[
            "build",
            "--provisioner",
            "chef",
            "--opt",
            "run_list=recipe[base]",
        ],
    );
    assert!(
        none.err()
            .contains("neither chef-solo nor cinc-solo is in the image"),
        "{}",
        none.stderr
    );
    let bad = env.amidala_in(
        &ws,
        &["build", "--provisioner", "chef", "--opt", "run_list=base"],
    );
    assert!(
        bad.err().contains("is not recipe[NAME] or role[NAME]"),
        "{}",
        bad.stderr
    );

    let run = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--provisioner",
            "chef",
            "--opt",
            "run_list=recipe[base],role[web]",
            "--opt",
            "attributes=attributes.json",
            "--opt",
            "install=chef-stand-in.deb",
        ],
    );
    let result = run.json();
    assert!(
        run.stderr
            .contains("chef-solo stand-in: converged recipe[base],role[web]"),
        "{}",
        run.stderr
    );
    let out = Mounted::new(&env.snapshot_file(field(&result, "snapshot_id")), 0);
    let ran = out.read("/root/chef-ran");
    assert!(
        ran.starts_with("run_list=recipe[base],role[web]\nconfig=/tmp/amidala-chef-"),
        "{ran}"
    );
    assert!(ran.ends_with("{\"motd\": \"hello\"}\n"), "{ran}");
    let tmp: Vec<_> = fs::read_dir(out.path("/tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(tmp.is_empty(), "solo.rb and its directory removed: {tmp:?}");
    assert!(
        out.exists("/usr/bin/chef-solo"),
        "installed from the workspace package"
    );
    drop(out);
    env.assert_no_leaks();
}
