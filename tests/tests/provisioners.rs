//! The chef and ansible provisioners in real builds (root, real daemon and client).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use amidala_tests::{field, run, Env, Mounted};

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
    env.import_busybox();
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

const PLAYBOOK: &str = r#"- hosts: localhost
  gather_facts: true
  vars:
    greeting: default greeting
  roles:
    - role: motd
      tags: [setup]
  tasks:
    - name: a user
      ansible.builtin.user:
        name: deploy
        uid: 1500
        shell: /bin/sh
        create_home: true
      tags: [setup]
    - name: a package-free configuration
      ansible.builtin.copy:
        dest: /etc/default/amidala-tuning
        content: "vm.swappiness = 10\n"
        mode: "0644"
      tags: [setup]
    - name: a task the tags leave out
      ansible.builtin.copy:
        dest: /etc/left-out
        content: "should not exist\n"
      tags: [extra]
"#;

#[test]
fn ansible_provisions_a_real_debian_image() {
    let env = Env::start_full("", &[], &[("libamidala_ansible.so", "ansible.so", 0o644)]);
    let base = env.import(&amidala_tests::debian_rootfs(), &[]);
    let ws = env.workspace("ws", &[("site.yml", PLAYBOOK)]);
    fs::create_dir_all(ws.join("roles/motd/tasks")).unwrap();
    fs::create_dir_all(ws.join("roles/motd/templates")).unwrap();
    fs::write(
        ws.join("roles/motd/tasks/main.yml"),
        "- name: the motd\n  ansible.builtin.template:\n    src: motd.j2\n    dest: /etc/motd\n    mode: \"0644\"\n",
    )
    .unwrap();
    fs::write(
        ws.join("roles/motd/templates/motd.j2"),
        "{{ greeting }} on {{ ansible_facts['distribution'] }} {{ ansible_facts['distribution_major_version'] }}, build {{ lookup('env', 'AMIDALA_BUILD_ID') }}\n",
    )
    .unwrap();
    let run = env.amidala_in(
        &ws,
        &[
            "build",
            "--json",
            "--source",
            &base,
            "--provisioner",
            "ansible",
            "--opt",
            "playbook=site.yml",
            "--opt",
            "extra_vars=greeting='hello from amidala'",
            "--opt",
            "tags=setup",
        ],
    );
    let result = run.json();
    assert!(run.stderr.contains("PLAY RECAP"), "{}", run.stderr);
    let build = field(&result, "build_id");
    let out = Mounted::new(&env.snapshot_file(field(&result, "snapshot_id")), 0);
    assert_eq!(
        out.read("/etc/motd"),
        format!("hello from amidala on Debian 12, build {build}\n")
    );
    let passwd = out.read("/etc/passwd");
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("deploy:x:1500:") && l.ends_with(":/home/deploy:/bin/sh")),
        "{passwd}"
    );
    assert!(out.path("/home/deploy").is_dir());
    assert_eq!(
        out.read("/etc/default/amidala-tuning"),
        "vm.swappiness = 10\n"
    );
    assert!(
        !out.exists("/etc/left-out"),
        "--tags setup skipped the extra task"
    );
    assert!(
        !out.exists("/root/.ansible"),
        "ansible's home was private to the build"
    );
    let leftovers: Vec<_> = fs::read_dir(out.path("/tmp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("amidala"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        out.read("/etc/resolv.conf"),
        "# resolv.conf of the debian test image\nnameserver 192.0.2.53\n"
    );
    assert!(!out.exists("/usr/sbin/policy-rc.d"));
    drop(out);

    // A failing playbook fails the build with ansible's status.
    fs::write(ws.join("fail.yml"), "- hosts: localhost\n  gather_facts: false\n  tasks:\n    - ansible.builtin.fail:\n        msg: failing on purpose\n").unwrap();
    let failed = env.amidala_in(
        &ws,
        &[
            "build",
            "--source",
            &base,
            "--provisioner",
            "ansible",
            "--opt",
            "playbook=fail.yml",
        ],
    );
    let err = failed.err();
    assert!(
        err.contains("failing on purpose")
            && err.contains("failed in phase provision")
            && err.contains("exited with status 2"),
        "{err}"
    );
    env.assert_no_leaks();
}
