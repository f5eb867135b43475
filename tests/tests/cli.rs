//! The client's shell completions and manual page, generated from its command-line definition.
//! Needs no daemon.

use std::process::Command;

use amidala_tests::{bin_dir, run};

fn amidala(args: &[&str]) -> String {
    run(Command::new(bin_dir().join("amidala")).args(args))
        .ok()
        .to_owned()
}

/// What bash completes for the words `line` (the last one being completed).
fn bash_completes(line: &[&str]) -> Vec<String> {
    let script = format!(
        "source <('{}' completions bash)\n\
         COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}\n\
         _amidala amidala '{last}' '{prev}'\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        bin_dir().join("amidala").display(),
        words = line.join(" "),
        cword = line.len() - 1,
        last = line[line.len() - 1],
        prev = line[line.len().saturating_sub(2)],
    );
    run(Command::new("bash").arg("-c").arg(script))
        .ok()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn bash_completes_commands_and_options() {
    assert_eq!(bash_completes(&["amidala", "bu"]), ["build"]);
    let options = bash_completes(&["amidala", "build", "--net"]);
    assert_eq!(options, ["--network"], "{options:?}");
    let all = bash_completes(&["amidala", ""]);
    for command in ["base", "build", "cancel", "gc", "logs", "status"] {
        assert!(all.iter().any(|c| c == command), "{command} in {all:?}");
    }
}

#[test]
fn other_shells_get_scripts() {
    for (shell, mark) in [("zsh", "#compdef amidala"), ("fish", "complete -c amidala")] {
        let script = amidala(&["completions", shell]);
        assert!(script.contains(mark), "{shell}: {script}");
    }
}

#[test]
fn the_manual_has_a_page_per_command() {
    let man = amidala(&["man"]);
    assert!(
        man.starts_with(".ie") || man.contains(".TH amidala 1"),
        "{man}"
    );
    for page in ["amidala-build", "amidala-gc", "amidala-base"] {
        assert!(man.contains(&format!(".TH {page} 1")), "{page}");
    }
    assert!(
        man.contains("no\\-metadata"),
        "the build options are documented"
    );
}
