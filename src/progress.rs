//! Progress for people and machines: spinners on a terminal, plain timestamped lines when not
//! (cron, CI), one JSON object per event with `--output json`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::recipe::{Phase, Step};
use crate::ssh::Stream;
use crate::util::{fmt_duration, mask, mask_json, register_secrets, secret_forms};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Spinners on a terminal, plain timestamped lines otherwise.
    Text,
    /// One JSON object per line on stdout.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Tty,
    Plain,
    Json,
}

/// A step's outcome.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "detail")]
pub enum StepStatus {
    /// Ran, and reported nothing to change (file/line/upload already right).
    Ok,
    /// Ran and changed the machine (every `run` counts as a change).
    Changed,
    /// Not run: `when:` false or `creates:` present.
    Skipped(String),
    Failed(String),
}

impl StepStatus {
    fn word(&self) -> &'static str {
        match self {
            StepStatus::Ok => "ok",
            StepStatus::Changed => "changed",
            StepStatus::Skipped(_) => "skipped",
            StepStatus::Failed(_) => "FAILED",
        }
    }
}

/// One row of the summary table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepRow {
    pub phase: Phase,
    pub number: usize,
    pub name: String,
    #[serde(flatten)]
    pub status: StepStatus,
    pub elapsed_ms: u128,
    pub attempts: u32,
}

pub struct Progress {
    mode: Mode,
    quiet: bool,
    secrets: Vec<String>,
    bar: Option<ProgressBar>,
    /// Buffered output of the current step, shown only if it fails (quiet mode).
    held: Vec<String>,
    /// Whose progress this is, when several run at once (`jbake nightly`'s two bakes): every
    /// line starts with it, every JSON event carries it as `"bake"`.
    label: Option<String>,
}

/// One line on stdout. A closed pipe (`jbake build … | head`) is not an error: the build, and
/// above all its cleanup, go on.
pub fn out_line(text: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

/// One line on stderr; a closed pipe is ignored (see [`out_line`]).
pub fn err_line(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn label(step: &Step, total: usize) -> String {
    let phase = match step.phase {
        Phase::Steps => "",
        Phase::Validate => "validate ",
        Phase::Test => "test ",
    };
    format!("[{phase}{}/{total}] {}", step.number, step.name)
}

impl Progress {
    /// `quiet`: print only warnings, failures and the final result (for cron). `secrets` are
    /// masked in everything it prints, in every form they can take ([`secret_forms`]), and
    /// registered for the final error line and the internal logs.
    pub fn new(output: Output, quiet: bool, secrets: Vec<String>) -> Progress {
        register_secrets(&secrets);
        let secrets = secret_forms(&secrets);
        let mode = match output {
            Output::Json => Mode::Json,
            Output::Text if std::io::stderr().is_terminal() && !quiet => Mode::Tty,
            Output::Text => Mode::Plain,
        };
        Progress {
            mode,
            quiet,
            secrets,
            bar: None,
            held: Vec::new(),
            label: None,
        }
    }

    /// The progress of one of several bakes running at once: plain lines (never spinners:
    /// two cannot share a terminal), each starting with `label`; JSON events carry it. In
    /// quiet mode the result line is left to the caller's summary.
    pub fn labelled(output: Output, quiet: bool, secrets: Vec<String>, label: &str) -> Progress {
        let mut p = Progress::new(output, quiet, secrets);
        if p.mode == Mode::Tty {
            p.mode = Mode::Plain;
        }
        p.label = Some(label.to_string());
        p
    }

    fn line(&self, text: &str) {
        let text = match &self.label {
            Some(l) => mask(&format!("{l}: {text}"), &self.secrets),
            None => mask(text, &self.secrets),
        };
        match (&self.bar, self.mode) {
            (Some(bar), _) => bar.println(text),
            (None, Mode::Tty) => err_line(&text),
            _ => err_line(&format!("{} {text}", now())),
        }
    }

    fn event(&self, mut v: Value) {
        if let Value::Object(map) = &mut v {
            map.insert("time".into(), Value::String(now()));
            if let Some(l) = &self.label {
                map.insert("bake".into(), Value::String(l.clone()));
            }
        }
        // Before serialising: a secret's escaped form would no longer be found afterwards.
        mask_json(&mut v, &self.secrets);
        let text = mask(&v.to_string(), &self.secrets);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
    }

    /// A general progress message ("connecting to …").
    pub fn info(&self, event: &str, text: &str) {
        match self.mode {
            Mode::Json => self.event(json!({"event": event, "message": text})),
            _ if self.quiet => {}
            _ => self.line(text),
        }
    }

    /// Something the user must see, even in quiet mode.
    pub fn warn(&self, text: &str) {
        match self.mode {
            Mode::Json => self.event(json!({"event": "warning", "message": text})),
            _ => self.line(&format!("warning: {text}")),
        }
    }

    pub fn step_started(&mut self, step: &Step, total: usize) {
        self.held.clear();
        match self.mode {
            Mode::Json => self.event(json!({
                "event": "step_started", "phase": step.phase, "number": step.number,
                "name": step.name, "kind": step.action.kind(),
            })),
            Mode::Tty => {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner:.cyan} {prefix} {elapsed:.dim} {wide_msg:.dim}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_prefix(mask(&label(step, total), &self.secrets));
                bar.enable_steady_tick(Duration::from_millis(100));
                self.bar = Some(bar);
            }
            Mode::Plain if !self.quiet => self.line(&format!("{} ...", label(step, total))),
            Mode::Plain => {}
        }
    }

    pub fn step_output(&mut self, step: &Step, stream: Stream, text: &str) {
        let stream_name = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        match self.mode {
            Mode::Json => self.event(json!({
                "event": "output", "phase": step.phase, "number": step.number,
                "stream": stream_name, "line": text,
            })),
            Mode::Tty => {
                if let Some(bar) = &self.bar {
                    bar.set_message(mask(text, &self.secrets));
                    bar.println(mask(&format!("  {} | {text}", step.name), &self.secrets));
                }
            }
            Mode::Plain if self.quiet => self.held.push(format!("  {} | {text}", step.name)),
            Mode::Plain => self.line(&format!("  {} | {text}", step.name)),
        }
    }

    pub fn step_retry(&mut self, step: &Step, attempt: u32, of: u32, why: &str, delay: Duration) {
        let text = format!(
            "  {}: attempt {attempt}/{of} failed ({why}); retrying in {}",
            step.name,
            fmt_duration(delay)
        );
        match self.mode {
            Mode::Json => self.event(json!({
                "event": "step_retry", "phase": step.phase, "number": step.number,
                "attempt": attempt, "of": of, "reason": why, "delay_ms": delay.as_millis(),
            })),
            _ => self.line(&text),
        }
    }

    /// The running step was cut off (Ctrl-C): its spinner gives way to a line saying so, so
    /// that what follows (the cleanup) is not printed under a spinner that still ticks.
    pub fn abandon_step(&mut self) {
        if let Some(bar) = self.bar.take() {
            let (what, took) = (bar.prefix(), bar.elapsed());
            bar.finish_and_clear();
            self.line(&format!(
                "✗ {what} interrupted after {}",
                fmt_duration(took)
            ));
        }
    }

    pub fn step_finished(
        &mut self,
        step: &Step,
        total: usize,
        status: &StepStatus,
        elapsed: Duration,
    ) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let mark = match (status, self.mode) {
            (StepStatus::Failed(_), Mode::Tty) => "✗",
            (StepStatus::Skipped(_), Mode::Tty) => "-",
            (_, Mode::Tty) => "✓",
            _ => "",
        };
        let detail = match status {
            StepStatus::Skipped(why) | StepStatus::Failed(why) => format!(": {why}"),
            _ => String::new(),
        };
        let text = format!(
            "{mark}{}{} {} ({}){detail}",
            if mark.is_empty() { "" } else { " " },
            label(step, total),
            status.word(),
            fmt_duration(elapsed)
        );
        match self.mode {
            Mode::Json => self.event(json!({
                "event": "step_finished", "phase": step.phase, "number": step.number,
                "name": step.name, "status": status.word().to_lowercase(),
                "detail": match status { StepStatus::Skipped(d) | StepStatus::Failed(d) => Some(d.clone()), _ => None },
                "elapsed_ms": elapsed.as_millis(),
            })),
            _ if self.quiet && !matches!(status, StepStatus::Failed(_)) => {}
            _ => {
                if matches!(status, StepStatus::Failed(_)) {
                    for held in std::mem::take(&mut self.held) {
                        self.line(&held);
                    }
                }
                self.line(&text)
            }
        }
    }

    /// The result of a build: always printed (on stdout), quiet or not.
    pub fn result(&self, built: &crate::bake::Built) {
        if self.mode == Mode::Json {
            self.event(json!({"event": "build_finished", "result": built}));
            return;
        }
        if self.label.is_some() && self.quiet {
            return; // one of several bakes: the caller's summary says it
        }
        let mut text = if built.skipped_unchanged {
            format!(
                "unchanged {} {} (content hash {})",
                built.ami_id, built.name, built.content_hash
            )
        } else {
            format!(
                "built {} {} (content hash {})",
                built.ami_id, built.name, built.content_hash
            )
        };
        // Its copies (--copy-to), when it has some.
        let copies: Vec<String> = built
            .distributed
            .regions
            .iter()
            .filter(|(_, id)| **id != built.ami_id)
            .map(|(region, id)| format!("{id} ({region})"))
            .collect();
        if !copies.is_empty() {
            text.push_str(&format!("; copies {}", copies.join(", ")));
        }
        out_line(&mask(&text, &self.secrets));
    }

    /// A command's result, always printed on stdout, quiet or not: `text`, or with `--output
    /// json` one `event` object carrying `data` under `result`.
    pub fn finished(&self, event: &str, text: &str, data: Value) {
        if self.mode == Mode::Json {
            self.event(json!({"event": event, "result": data}));
        } else {
            out_line(&mask(text, &self.secrets));
        }
    }

    /// The boot test's checks: a table (as [`summary`](Self::summary)), or with `--output json`
    /// one `test_finished` event.
    pub fn test_summary(&self, image: &str, rows: &[StepRow], elapsed: Duration, passed: bool) {
        if self.mode == Mode::Json {
            self.event(
                json!({"event": "test_finished", "image": image, "passed": passed,
                "elapsed_ms": elapsed.as_millis(), "checks": rows}),
            );
            return;
        }
        self.summary(rows, elapsed, passed);
    }

    pub fn is_json(&self) -> bool {
        self.mode == Mode::Json
    }

    /// The summary table at the end of a run.
    pub fn summary(&self, rows: &[StepRow], elapsed: Duration, ok: bool) {
        if self.mode == Mode::Json {
            self.event(json!({"event": "run_finished", "ok": ok, "elapsed_ms": elapsed.as_millis(), "steps": rows}));
            return;
        }
        if self.quiet && ok {
            return;
        }
        let width = rows
            .iter()
            .map(|r| r.name.chars().count())
            .max()
            .unwrap_or(4)
            .min(48);
        let mut table = String::new();
        for r in rows {
            let phase = match r.phase {
                Phase::Steps => " ",
                Phase::Validate => "v",
                Phase::Test => "t",
            };
            let tries = if r.attempts > 1 {
                format!("  ({} attempts)", r.attempts)
            } else {
                String::new()
            };
            table.push_str(&format!(
                "  {phase}{:>3}  {:<width$}  {:<8} {:>8}{tries}\n",
                r.number,
                r.name.chars().take(48).collect::<String>(),
                r.status.word(),
                fmt_duration(Duration::from_millis(r.elapsed_ms as u64)),
            ));
        }
        let count = |f: fn(&StepStatus) -> bool| rows.iter().filter(|r| f(&r.status)).count();
        let head = format!(
            "{} in {}: {} ok, {} changed, {} skipped, {} failed",
            if ok { "finished" } else { "FAILED" },
            fmt_duration(elapsed),
            count(|s| matches!(s, StepStatus::Ok)),
            count(|s| matches!(s, StepStatus::Changed)),
            count(|s| matches!(s, StepStatus::Skipped(_))),
            count(|s| matches!(s, StepStatus::Failed(_))),
        );
        let text = format!("{}{head}", mask(&table, &self.secrets));
        match &self.label {
            // Two bakes' tables may come out together: say whose each line is.
            Some(l) => {
                let lines: Vec<String> = text.lines().map(|line| format!("{l}: {line}")).collect();
                err_line(&lines.join("\n"));
            }
            None => err_line(&text),
        }
    }
}
