//! What `amidala build` shows while a build runs.
//!
//! On a terminal: a line per finished phase with the time it took, a spinner on the current
//! phase with its elapsed time, and the provisioner's output scrolling above it. When stderr
//! is not a terminal (CI logs, pipes): plain lines, `==> PHASE` as each phase starts, which
//! scripts may match. With `--quiet`: nothing but the result and errors. `NO_COLOR` (set and
//! not empty) turns colour off.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use amidala::proto::Phase;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nothing.
    Quiet,
    /// Plain lines.
    Plain,
    /// A live display, in colour or not.
    Live { color: bool },
}

impl Mode {
    /// The mode for stderr as it is: live on a terminal (not a dumb one), plain otherwise.
    pub fn detect(quiet: bool) -> Mode {
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() && !dumb {
            Mode::Live {
                color: color_wanted(),
            }
        } else {
            Mode::Plain
        }
    }
}

/// Colour unless `NO_COLOR` is set to something (<https://no-color.org>).
fn color_wanted() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The display of one build's progress.
#[derive(Debug)]
pub struct Progress {
    mode: Mode,
    bar: Option<ProgressBar>,
    started: Instant,
    /// The current phase and when it began.
    phase: Option<(Phase, Instant)>,
}

impl Progress {
    pub fn new(mode: Mode) -> Progress {
        Progress {
            mode,
            bar: None,
            started: Instant::now(),
            phase: None,
        }
    }

    /// A line of output (the build's log, or amidala's own), above the spinner if there is one.
    pub fn line(&self, line: &str) {
        match (&self.mode, &self.bar) {
            (Mode::Quiet, _) => {}
            (_, Some(bar)) => bar.println(line),
            (_, None) => eprintln!("{line}"),
        }
    }

    /// The build entered `phase`.
    pub fn phase(&mut self, phase: Phase) {
        let now = Instant::now();
        match self.mode {
            Mode::Quiet => {}
            Mode::Plain => eprintln!("==> {phase}"),
            Mode::Live { color } => {
                self.end_phase(now, true);
                let bar = self.bar.get_or_insert_with(|| spinner(color));
                bar.set_message(phase.as_str());
                bar.reset_elapsed();
            }
        }
        self.phase = Some((phase, now));
    }

    /// Prints the phase that ends now as done (`ok`) or failed.
    fn end_phase(&mut self, now: Instant, ok: bool) {
        let (Mode::Live { color }, Some((phase, since))) = (self.mode, self.phase.take()) else {
            return;
        };
        let mark = match (ok, color) {
            (true, true) => "\x1b[32m✓\x1b[0m",
            (true, false) => "✓",
            (false, true) => "\x1b[31m✗\x1b[0m",
            (false, false) => "✗",
        };
        let took = seconds(now - since);
        self.line(&format!("{mark} {:<10} {took}", phase.as_str()));
    }

    /// The build ended: clears the spinner and sums up (`ok`: it succeeded).
    pub fn finish(&mut self, ok: bool, summary: &str) {
        let now = Instant::now();
        self.end_phase(now, ok);
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if self.mode != Mode::Quiet {
            eprintln!("amidala: {summary} in {}", seconds(now - self.started));
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // An error return leaves no spinner behind on the terminal.
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn spinner(color: bool) -> ProgressBar {
    let template = if color {
        "{spinner:.cyan} {msg:<10} {phase_time}"
    } else {
        "{spinner} {msg:<10} {phase_time}"
    };
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("a valid template")
            .with_key(
                "phase_time",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.1}s", state.elapsed().as_secs_f64());
                },
            )
            .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ "),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// `0.31s`, `12.4s`, `2m05s`.
fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.2}s")
    } else if s < 60.0 {
        format!("{s:.1}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(seconds(Duration::from_millis(310)), "0.31s");
        assert_eq!(seconds(Duration::from_millis(12_440)), "12.4s");
        assert_eq!(seconds(Duration::from_secs(125)), "2m05s");
    }
}
