//! `amidalad-exec`: what amidalad runs as a build's executor and as a plugin's validator, so
//! that those processes start and end without the daemon's 26 MB (see `amidalad::helper`).
//! Not a command for people: `--version` is all it answers besides amidalad's calls.

use std::process::ExitCode;

fn main() -> ExitCode {
    amidalad::helper::run_if_asked();
    if std::env::args_os().nth(1).is_some_and(|a| a == "--version") {
        println!("{}", amidalad::helper::version_line());
        return ExitCode::SUCCESS;
    }
    eprintln!(
        "{}: amidalad runs this as a build's executor and a plugin's validator; it is not a command",
        amidalad::helper::NAME
    );
    ExitCode::from(2)
}
