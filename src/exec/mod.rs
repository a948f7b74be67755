//! Runs a [`Plan`] on a machine over SSH: each step through the root shell, with retries,
//! timeouts, `when`/`creates`, idempotent file steps, and reboots.

mod line;

pub use line::ensure_line;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::progress::{Progress, StepRow, StepStatus};
use crate::recipe::{Action, Fact, FileAttrs, Origin, Phase, Plan, Step};
use crate::ssh::{self, ConnectOptions, RootShell, Session, Stream};
use crate::util::{fmt_duration, mask, shell_quote};

/// How many lines of a failed step's output the error keeps.
const TAIL: usize = 20;

/// A step without `timeout:` is killed after this long: an unattended (cron) run must end.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", step_failure(.origin, .label, .host, .detail, .tail))]
    StepFailed {
        origin: Origin,
        label: String,
        host: String,
        detail: String,
        tail: Vec<String>,
    },
    #[error("{label} ({origin}) could not run on {host}: {source}")]
    Connection {
        origin: Origin,
        label: String,
        host: String,
        #[source]
        source: ssh::Error,
    },
    #[error(transparent)]
    Ssh(#[from] ssh::Error),
    #[error("{label} ({origin}): cannot read {}: {source}", path.display())]
    LocalFile {
        origin: Origin,
        label: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn step_failure(origin: &Origin, label: &str, host: &str, detail: &str, tail: &[String]) -> String {
    let mut s = format!("{label} ({origin}) {detail} on {host}");
    if !tail.is_empty() {
        s.push_str("\nlast lines of its output:");
        for l in tail {
            s.push_str("\n  | ");
            s.push_str(l);
        }
    }
    s
}

fn step_label(step: &Step) -> String {
    match step.phase {
        Phase::Steps => format!("step {} '{}'", step.number, step.name),
        Phase::Validate => format!("validate step {} '{}'", step.number, step.name),
        Phase::Test => format!("test check {} '{}'", step.number, step.name),
    }
}

/// The outcome of a whole run.
#[derive(Debug)]
pub struct Report {
    pub rows: Vec<StepRow>,
    pub elapsed: Duration,
}

/// Splits a stream into lines for display and keeps the last [`TAIL`] lines for errors.
struct Lines {
    partial: [Vec<u8>; 2],
    tail: VecDeque<String>,
    captured: Option<Vec<u8>>,
}

impl Lines {
    fn new(capture: bool) -> Lines {
        Lines {
            partial: [Vec::new(), Vec::new()],
            tail: VecDeque::new(),
            captured: capture.then(Vec::new),
        }
    }

    fn feed(&mut self, stream: Stream, data: &[u8], mut emit: impl FnMut(Stream, &str)) {
        if stream == Stream::Stdout {
            if let Some(c) = &mut self.captured {
                c.extend_from_slice(data);
                return;
            }
        }
        let buf = &mut self.partial[stream as usize];
        buf.extend_from_slice(data);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1])
                .trim_end_matches('\r')
                .to_string();
            emit(stream, &text);
            self.tail.push_back(text);
            if self.tail.len() > TAIL {
                self.tail.pop_front();
            }
        }
    }

    fn finish(&mut self, mut emit: impl FnMut(Stream, &str)) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let buf = std::mem::take(&mut self.partial[stream as usize]);
            if !buf.is_empty() {
                let text = String::from_utf8_lossy(&buf).to_string();
                emit(stream, &text);
                self.tail.push_back(text);
                if self.tail.len() > TAIL {
                    self.tail.pop_front();
                }
            }
        }
    }
}

/// Runs plans on one machine, over one connection (re-established after a reboot).
pub struct Executor<'p> {
    connect: ConnectOptions,
    session: Option<Session>,
    shell: Option<RootShell>,
    progress: &'p mut Progress,
    secrets: Vec<String>,
    /// Shown in errors: the instance id, or `user@host:port`.
    host_label: String,
    /// The root shell's pid on the machine, for stopping its step after an interrupt.
    broker_pid: Arc<AtomicU32>,
}

/// What a request to the root shell produced.
struct Ran {
    code: i32,
    tail: Vec<String>,
    stdout: Vec<u8>,
}

impl<'p> Executor<'p> {
    /// Connects (with retries until the deadline), opens the root shell and waits for cloud-init.
    pub async fn connect(
        connect: ConnectOptions,
        host_label: String,
        secrets: Vec<String>,
        progress: &'p mut Progress,
        broker_pid: Arc<AtomicU32>,
    ) -> Result<Executor<'p>, Error> {
        let mut ex = Executor {
            connect,
            session: None,
            shell: None,
            progress,
            secrets,
            host_label,
            broker_pid,
        };
        ex.establish().await?;
        Ok(ex)
    }

    async fn establish(&mut self) -> Result<(), Error> {
        let started = Instant::now();
        self.progress.info(
            "connecting",
            &format!("connecting to {}", self.connect.target),
        );
        let session = Session::connect(&self.connect).await?;
        let how = match &self.connect.host_key {
            ssh::HostKeyPolicy::Pinned(_) => "pinned host key verified".to_string(),
            ssh::HostKeyPolicy::KnownHosts(p) => format!("host key verified with {}", p.display()),
            ssh::HostKeyPolicy::Insecure => "host key NOT verified".to_string(),
        };
        if matches!(self.connect.host_key, ssh::HostKeyPolicy::Insecure) {
            self.progress.warn(&format!(
                "--insecure-ignore-host-key: accepted {}'s host key {} without checking it",
                self.connect.target.addr(),
                session.host_key_fingerprint
            ));
        }
        let shell = RootShell::open(&session).await?;
        self.progress.info(
            "connected",
            &format!(
                "connected to {} in {} ({how}: {})",
                self.connect.target,
                fmt_duration(started.elapsed()),
                session.host_key_fingerprint
            ),
        );
        self.broker_pid.store(shell.pid(), Ordering::SeqCst);
        self.session = Some(session);
        self.shell = Some(shell);
        self.wait_for_cloud_init().await
    }

    /// Packer users race cloud-init for the apt lock: wait for it first, if it exists.
    async fn wait_for_cloud_init(&mut self) -> Result<(), Error> {
        let script = "command -v cloud-init >/dev/null 2>&1 || exit 0\n\
                      cloud-init status --wait >/dev/null 2>&1 && exit 0\n\
                      cloud-init status 2>&1 | tail -n 3; exit 3\n";
        let Some(shell) = self.shell.as_mut() else {
            return Ok(());
        };
        let mut out = Vec::new();
        let mut sink = |_: Stream, d: &[u8]| out.extend_from_slice(d);
        let code = shell
            .run(
                script,
                Duration::from_secs(1800),
                None,
                "while waiting for cloud-init",
                &mut sink,
            )
            .await?;
        if code != 0 {
            self.progress.warn(&format!(
                "cloud-init finished with errors: {}",
                String::from_utf8_lossy(&out).trim()
            ));
        }
        Ok(())
    }

    /// Runs one step (of `total` in its phase) with its progress lines; its result and its row
    /// in the report.
    async fn run_shown(
        &mut self,
        step: &Step,
        total: usize,
    ) -> (Result<StepStatus, Error>, StepRow) {
        self.progress.step_started(step, total);
        let t = Instant::now();
        let (result, attempts) = self.run_step(step).await;
        let status = match &result {
            Ok(s) => s.clone(),
            Err(e) => StepStatus::Failed(short(e)),
        };
        self.progress
            .step_finished(step, total, &status, t.elapsed());
        let row = StepRow {
            phase: step.phase,
            number: step.number,
            name: step.name.clone(),
            status,
            elapsed_ms: t.elapsed().as_millis(),
            attempts,
        };
        (result, row)
    }

    /// Runs the plan's steps, then its validate phase. Stops at the first failure.
    pub async fn run_plan(&mut self, plan: &Plan) -> Result<Report, (Error, Report)> {
        let start = Instant::now();
        let mut rows = Vec::new();
        for (steps, total) in [
            (&plan.steps, plan.steps.len()),
            (&plan.validate, plan.validate.len()),
        ] {
            if total > 0 && steps[0].phase == Phase::Validate {
                self.progress
                    .info("phase", &format!("validating ({total} checks)"));
            }
            for step in steps {
                let (result, row) = self.run_shown(step, total).await;
                rows.push(row);
                if let Err(e) = result {
                    let report = Report {
                        rows,
                        elapsed: start.elapsed(),
                    };
                    return Err((e, report));
                }
            }
        }
        Ok(Report {
            rows,
            elapsed: start.elapsed(),
        })
    }

    /// Runs every check (the boot test): unlike [`run_plan`](Self::run_plan), a failing check
    /// does not stop the others. `Ok`: each check's row, and the failures (each names its check
    /// and what it printed last). `Err`: the machine could not be asked (a lost connection):
    /// no verdict.
    pub async fn run_checks(&mut self, checks: &[Step]) -> Result<(Report, Vec<Error>), Error> {
        let start = Instant::now();
        let total = checks.len();
        let mut rows = Vec::with_capacity(total);
        let mut failed = Vec::new();
        for step in checks {
            let (result, row) = self.run_shown(step, total).await;
            rows.push(row);
            match result {
                Ok(_) => {}
                Err(e @ Error::StepFailed { .. }) => failed.push(e),
                Err(e) => return Err(e),
            }
        }
        Ok((
            Report {
                rows,
                elapsed: start.elapsed(),
            },
            failed,
        ))
    }

    /// Runs a `run` step quietly (its output is not shown) and returns its exit status and
    /// standard output: what jbake reads from the machine itself.
    pub async fn query(&mut self, step: &Step) -> Result<(i32, Vec<u8>), Error> {
        let script = match &step.action {
            Action::Run { script } => compose(step, script),
            other => {
                return Err(self.lost(
                    step,
                    &format!("a query is a run step, not {}", other.kind()),
                ))
            }
        };
        let r = self.request(step, &script, step.timeout, true).await?;
        Ok((r.code, r.stdout))
    }

    /// Reads the recipe's `facts:` on the machine: each command runs as root (after the
    /// checks), and its output, one line of at most 256 characters, is the value of its tag.
    /// Shown like checks; a command that fails, prints nothing or more than one line, or prints
    /// a secret, fails the build.
    pub async fn read_facts(
        &mut self,
        facts: &[Fact],
    ) -> Result<(Vec<(String, String)>, Report), (Error, Report)> {
        let start = Instant::now();
        let mut rows = Vec::new();
        let mut values = Vec::new();
        let total = facts.len();
        if total > 0 {
            self.progress
                .info("phase", &format!("reading {total} image fact(s)"));
        }
        for (i, fact) in facts.iter().enumerate() {
            let step = Step {
                number: i.saturating_add(1),
                phase: Phase::Validate,
                name: format!("fact {}", fact.key),
                origin: fact.origin.clone(),
                action: Action::Run {
                    script: fact.script.clone(),
                },
                user: None,
                env: Vec::new(),
                retries: 0,
                delay: Duration::from_secs(1),
                timeout: Some(Duration::from_secs(60)),
                when: None,
                creates: None,
            };
            self.progress.step_started(&step, total);
            let t = Instant::now();
            let result = match self.request(&step, &fact.script, step.timeout, true).await {
                Err(e) => Err(e),
                Ok(r) if r.code != 0 => {
                    Err(self.failed(&step, exit_detail(r.code, Duration::from_secs(60)), r.tail))
                }
                Ok(r) => {
                    let text = String::from_utf8_lossy(&r.stdout).trim().to_string();
                    match fact_value(&text, &self.secrets) {
                        Ok(()) => Ok(text),
                        Err(why) => Err(self.failed(&step, why, Vec::new())),
                    }
                }
            };
            let status = match &result {
                Ok(_) => StepStatus::Ok,
                Err(e) => StepStatus::Failed(short(e)),
            };
            self.progress
                .step_finished(&step, total, &status, t.elapsed());
            rows.push(StepRow {
                phase: step.phase,
                number: step.number,
                name: step.name.clone(),
                status,
                elapsed_ms: t.elapsed().as_millis(),
                attempts: 1,
            });
            match result {
                Ok(v) => values.push((fact.key.clone(), v)),
                Err(e) => {
                    return Err((
                        e,
                        Report {
                            rows,
                            elapsed: start.elapsed(),
                        },
                    ))
                }
            }
        }
        Ok((
            values,
            Report {
                rows,
                elapsed: start.elapsed(),
            },
        ))
    }

    /// Ends the root shell and the connection.
    pub async fn close(mut self) {
        if let Some(shell) = self.shell.take() {
            shell.close().await;
        }
        if let Some(session) = self.session.take() {
            session.close().await;
        }
    }

    async fn run_step(&mut self, step: &Step) -> (Result<StepStatus, Error>, u32) {
        if let Some((expr, false)) = &step.when {
            return (Ok(StepStatus::Skipped(format!("when: {expr} is false"))), 0);
        }
        if let Some(path) = &step.creates {
            let script = format!("test -e {}", shell_quote(path));
            match self.request(step, &script, None, false).await {
                Ok(r) if r.code == 0 => {
                    return (Ok(StepStatus::Skipped(format!("{path} exists"))), 0)
                }
                Ok(_) => {}
                Err(e) => return (Err(e), 1),
            }
        }
        // A recipe's `retries` is user input: never overflow.
        let max = step.retries.saturating_add(1);
        let mut attempt = 1;
        loop {
            match self.attempt(step).await {
                Err(Failure::Fatal(e)) => return (Err(*e), attempt),
                Ok(status) => return (Ok(status), attempt),
                Err(Failure::Step { detail, tail }) if attempt >= max => {
                    let detail = if max > 1 {
                        format!("{detail} (attempt {attempt} of {max})")
                    } else {
                        detail
                    };
                    return (Err(self.failed(step, detail, tail)), attempt);
                }
                Err(Failure::Step { detail, .. }) => {
                    self.progress
                        .step_retry(step, attempt, max, &detail, step.delay);
                    tokio::time::sleep(step.delay).await;
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    fn failed(&self, step: &Step, detail: String, tail: Vec<String>) -> Error {
        Error::StepFailed {
            origin: step.origin.clone(),
            // A step's name may be rendered from a secret variable.
            label: mask(&step_label(step), &self.secrets),
            host: self.host_label.clone(),
            detail,
            tail: tail.iter().map(|l| mask(l, &self.secrets)).collect(),
        }
    }

    async fn attempt(&mut self, step: &Step) -> Result<StepStatus, Failure> {
        match &step.action {
            Action::Run { script } => {
                let script = compose(step, script);
                let r = self.request(step, &script, step.timeout, false).await?;
                if r.code == 0 && step.phase != Phase::Steps {
                    Ok(StepStatus::Ok) // a check that passed changed nothing
                } else if r.code == 0 {
                    Ok(StepStatus::Changed)
                } else {
                    Err(Failure::Step {
                        detail: exit_detail(r.code, step.timeout.unwrap_or(DEFAULT_STEP_TIMEOUT)),
                        tail: r.tail,
                    })
                }
            }
            Action::File {
                path,
                content,
                attrs,
            } => {
                self.install(step, content.as_bytes(), path, attrs, 0o644)
                    .await
            }
            Action::Upload {
                src,
                dest,
                rendered,
                attrs,
            } => {
                self.upload(step, src, dest, rendered.as_deref(), attrs)
                    .await
            }
            Action::Line {
                path,
                line,
                regexp,
                attrs,
            } => self.line(step, path, line, regexp.as_deref(), attrs).await,
            Action::Reboot { timeout } => self.reboot(step, *timeout).await,
        }
    }

    /// Sends one script to the root shell, streaming its output to the progress display.
    async fn request(
        &mut self,
        step: &Step,
        script: &str,
        timeout: Option<Duration>,
        capture: bool,
    ) -> Result<Ran, Error> {
        let during = format!("during {}", step_label(step));
        let Some(shell) = self.shell.as_mut() else {
            return Err(self.lost(step, "the root shell is not open"));
        };
        let mut lines = Lines::new(capture);
        let progress = &mut *self.progress;
        let secrets = &self.secrets;
        let mut sink = |stream: Stream, data: &[u8]| {
            lines.feed(stream, data, |s, text| {
                progress.step_output(step, s, &mask(text, secrets))
            });
        };
        let timeout = timeout.unwrap_or(DEFAULT_STEP_TIMEOUT);
        let result = shell
            .run(script, timeout, step.user.as_deref(), &during, &mut sink)
            .await;
        lines.finish(|s, text| progress.step_output(step, s, &mask(text, secrets)));
        let code = result.map_err(|source| Error::Connection {
            origin: step.origin.clone(),
            label: step_label(step),
            host: self.host_label.clone(),
            source,
        })?;
        Ok(Ran {
            code,
            tail: lines.tail.into_iter().collect(),
            stdout: lines.captured.unwrap_or_default(),
        })
    }

    fn lost(&self, step: &Step, why: &str) -> Error {
        Error::Connection {
            origin: step.origin.clone(),
            label: step_label(step),
            host: self.host_label.clone(),
            source: ssh::Error::Lost {
                target: self.connect.target.addr(),
                during: why.to_string(),
            },
        }
    }

    /// Writes bytes to `dest` atomically, with `attrs`; reports whether anything changed.
    async fn install(
        &mut self,
        step: &Step,
        data: &[u8],
        dest: &str,
        attrs: &FileAttrs,
        default_mode: u32,
    ) -> Result<StepStatus, Failure> {
        let during = format!("during {}", step_label(step));
        let len = data.len() as u64;
        self.put(step, std::io::Cursor::new(data.to_vec()), len, &during)
            .await?;
        self.finish_install(step, dest, attrs, default_mode).await
    }

    async fn put<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        step: &Step,
        data: R,
        len: u64,
        during: &str,
    ) -> Result<(), Error> {
        let Some(shell) = self.shell.as_mut() else {
            return Err(self.lost(step, "the root shell is not open"));
        };
        shell
            .put_data(data, len, during)
            .await
            .map_err(|source| Error::Connection {
                origin: step.origin.clone(),
                label: step_label(step),
                host: self.host_label.clone(),
                source,
            })
    }

    async fn finish_install(
        &mut self,
        step: &Step,
        dest: &str,
        attrs: &FileAttrs,
        default_mode: u32,
    ) -> Result<StepStatus, Failure> {
        let script = install_script(dest, attrs, default_mode);
        let r = self.request(step, &script, step.timeout, true).await?;
        if r.code != 0 {
            return Err(Failure::Step {
                detail: format!("could not write {dest} (exit status {})", r.code),
                tail: r.tail,
            });
        }
        Ok(if String::from_utf8_lossy(&r.stdout).contains(UNCHANGED) {
            StepStatus::Ok
        } else {
            StepStatus::Changed
        })
    }

    async fn upload(
        &mut self,
        step: &Step,
        src: &Path,
        dest: &str,
        rendered: Option<&[u8]>,
        attrs: &FileAttrs,
    ) -> Result<StepStatus, Failure> {
        if let Some(bytes) = rendered {
            return self
                .install(step, bytes, dest, attrs, local_mode(step, src)?)
                .await;
        }
        let local = |source| {
            Failure::from(Error::LocalFile {
                origin: step.origin.clone(),
                label: step_label(step),
                path: src.to_path_buf(),
                source,
            })
        };
        let meta = std::fs::metadata(src).map_err(local)?;
        if !meta.is_dir() {
            return self.upload_file(step, src, dest, attrs).await;
        }
        // A directory: every file below it, folders first.
        let mut changed = false;
        let mut files = Vec::new();
        collect_files(src, Path::new(""), &mut files).map_err(local)?;
        let dirs: Vec<String> = std::iter::once(dest.to_string())
            .chain(
                files
                    .iter()
                    .filter(|(_, is_dir)| *is_dir)
                    .map(|(rel, _)| join(dest, rel)),
            )
            .collect();
        let mut mk = String::from("set -e\n");
        for d in &dirs {
            let q = shell_quote(d);
            mk.push_str(&format!(
                "[ -d {q} ] || {{ mkdir -p {q}; echo created; }}\n"
            ));
            if attrs.owner.is_some() || attrs.group.is_some() {
                mk.push_str(&format!("chown {} {q}\n", owner_spec(attrs)));
            }
        }
        let r = self.request(step, &mk, step.timeout, true).await?;
        if r.code != 0 {
            return Err(Failure::Step {
                detail: format!("could not create the folders under {dest}"),
                tail: r.tail,
            });
        }
        changed |= !r.stdout.is_empty();
        for (rel, is_dir) in &files {
            if *is_dir {
                continue;
            }
            let status = self
                .upload_file(step, &src.join(rel), &join(dest, rel), attrs)
                .await?;
            changed |= status == StepStatus::Changed;
        }
        Ok(if changed {
            StepStatus::Changed
        } else {
            StepStatus::Ok
        })
    }

    async fn upload_file(
        &mut self,
        step: &Step,
        src: &Path,
        dest: &str,
        attrs: &FileAttrs,
    ) -> Result<StepStatus, Failure> {
        let local = |source| {
            Failure::from(Error::LocalFile {
                origin: step.origin.clone(),
                label: step_label(step),
                path: src.to_path_buf(),
                source,
            })
        };
        let file = tokio::fs::File::open(src).await.map_err(local)?;
        let len = file.metadata().await.map_err(local)?.len();
        let mode = local_mode(step, src)?;
        let during = format!("during {} (uploading {})", step_label(step), src.display());
        self.put(step, file, len, &during).await?;
        self.finish_install(step, dest, attrs, mode).await
    }

    async fn line(
        &mut self,
        step: &Step,
        path: &str,
        line: &str,
        regexp: Option<&str>,
        attrs: &FileAttrs,
    ) -> Result<StepStatus, Failure> {
        let re = match regexp.map(regex::Regex::new).transpose() {
            Ok(re) => re,
            Err(e) => {
                return Err(Failure::Step {
                    detail: format!("regexp is invalid: {e}"),
                    tail: Vec::new(),
                })
            }
        };
        let q = shell_quote(path);
        let read = format!("[ -e {q} ] || exit 3\ncat -- {q}\n");
        let r = self.request(step, &read, step.timeout, true).await?;
        let content = match r.code {
            0 => String::from_utf8(r.stdout).map_err(|_| Failure::Step {
                detail: format!("{path} is not a text file"),
                tail: Vec::new(),
            })?,
            3 => String::new(),
            code => {
                return Err(Failure::Step {
                    detail: format!("could not read {path} (exit status {code})"),
                    tail: r.tail,
                })
            }
        };
        match ensure_line(&content, line, re.as_ref()) {
            None if attrs == &FileAttrs::default() => Ok(StepStatus::Ok),
            None => {
                self.install(step, content.as_bytes(), path, attrs, 0o644)
                    .await
            }
            Some(new) => {
                self.install(step, new.as_bytes(), path, attrs, 0o644)
                    .await?;
                Ok(StepStatus::Changed)
            }
        }
    }

    /// Reboots, waits for the machine to go down and come back (a new boot id), reconnects.
    async fn reboot(&mut self, step: &Step, timeout: Duration) -> Result<StepStatus, Failure> {
        let boot_id = "cat /proc/sys/kernel/random/boot_id 2>/dev/null || true\n";
        let before = self
            .request(step, boot_id, Some(Duration::from_secs(30)), true)
            .await?;
        let before = String::from_utf8_lossy(&before.stdout).trim().to_string();
        let trigger =
            "nohup sh -c 'sleep 1; systemctl reboot || reboot' >/dev/null 2>&1 </dev/null &\n";
        self.request(step, trigger, Some(Duration::from_secs(30)), false)
            .await?;
        if let Some(shell) = self.shell.take() {
            drop(shell);
        }
        if let Some(session) = self.session.take() {
            session.close().await;
        }
        // `reboot.timeout` is user input: a deadline past what `Instant` can hold is no deadline.
        let deadline = Instant::now().checked_add(timeout);
        tokio::time::sleep(Duration::from_secs(2)).await;
        loop {
            let left = remaining(deadline);
            if left.is_zero() {
                return Err(Failure::from(self.lost(
                    step,
                    &format!(
                        "after the reboot: it did not come back within {}",
                        fmt_duration(timeout)
                    ),
                )));
            }
            let mut opts = self.connect.clone();
            opts.deadline = left;
            let session = Session::connect(&opts).await.map_err(|source| {
                Failure::from(Error::Connection {
                    origin: step.origin.clone(),
                    label: step_label(step),
                    host: self.host_label.clone(),
                    source,
                })
            })?;
            let shell = RootShell::open(&session).await.map_err(|source| {
                Failure::from(Error::Connection {
                    origin: step.origin.clone(),
                    label: step_label(step),
                    host: self.host_label.clone(),
                    source,
                })
            })?;
            self.broker_pid.store(shell.pid(), Ordering::SeqCst);
            self.session = Some(session);
            self.shell = Some(shell);
            let now = self
                .request(step, boot_id, Some(Duration::from_secs(30)), true)
                .await?;
            let now = String::from_utf8_lossy(&now.stdout).trim().to_string();
            if before.is_empty() || now != before {
                break;
            }
            // Still the old boot: the shutdown has not begun yet.
            if let Some(shell) = self.shell.take() {
                shell.close().await;
            }
            if let Some(session) = self.session.take() {
                session.close().await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.progress.info(
            "reconnected",
            &format!("{} is back after the reboot", self.connect.target),
        );
        self.wait_for_cloud_init().await?;
        Ok(StepStatus::Changed)
    }
}

/// What is left of a deadline (`None`: none, the timeout did not fit in an `Instant`).
fn remaining(deadline: Option<Instant>) -> Duration {
    match deadline {
        Some(d) => d.saturating_duration_since(Instant::now()),
        None => Duration::MAX,
    }
}

/// Why an attempt failed: a step failure may be retried, a fatal one may not.
enum Failure {
    Step { detail: String, tail: Vec<String> },
    Fatal(Box<Error>),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Fatal(Box::new(e))
    }
}

fn short(e: &Error) -> String {
    match e {
        Error::StepFailed { detail, .. } => detail.clone(),
        Error::Connection { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

fn exit_detail(code: i32, timeout: Duration) -> String {
    match (code, timeout) {
        (124 | 137, t) => format!(
            "timed out after {} (the remote command was killed)",
            fmt_duration(t)
        ),
        _ => format!("exited {code}"),
    }
}

/// The script a `run` step sends: `set -e`, the step's environment, then the user's script.
fn compose(step: &Step, script: &str) -> String {
    let mut s = String::from("set -e\n");
    if step.user.is_some() {
        s.push_str("cd \"$HOME\" 2>/dev/null || cd /\n");
    } else {
        s.push_str("cd /root 2>/dev/null || cd /\n");
    }
    for (k, v) in &step.env {
        s.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    s.push_str(script);
    s.push('\n');
    s
}

const UNCHANGED: &str = "JBAKE-UNCHANGED";

fn owner_spec(attrs: &FileAttrs) -> String {
    match (&attrs.owner, &attrs.group) {
        (Some(o), Some(g)) => shell_quote(&format!("{o}:{g}")),
        (Some(o), None) => shell_quote(o),
        (None, Some(g)) => shell_quote(&format!(":{g}")),
        (None, None) => String::new(),
    }
}

/// Moves `$JBAKE_TMP/data` into place atomically (temp file in the same folder, then `mv`),
/// keeping an existing file's mode and owner unless `attrs` says otherwise; prints
/// [`UNCHANGED`] when content, mode and owner were already right.
fn install_script(dest: &str, attrs: &FileAttrs, default_mode: u32) -> String {
    let q = shell_quote(dest);
    let mut s = format!(
        "set -e\nd={q}\ndir=$(dirname -- \"$d\")\nmkdir -p -- \"$dir\"\n\
         t=$(mktemp \"$dir/.jbake.XXXXXX\")\ntrap 'rm -f \"$t\"' EXIT\n\
         cat \"$JBAKE_TMP/data\" > \"$t\"\n\
         if [ -e \"$d\" ]; then chmod --reference=\"$d\" \"$t\"; chown --reference=\"$d\" \"$t\"; \
         else chmod {default_mode:o} \"$t\"; fi\n"
    );
    if let Some(mode) = attrs.mode {
        s.push_str(&format!("chmod {mode:o} \"$t\"\n"));
    }
    if attrs.owner.is_some() || attrs.group.is_some() {
        s.push_str(&format!("chown {} \"$t\"\n", owner_spec(attrs)));
    }
    s.push_str(&format!(
        "if [ -f \"$d\" ] && cmp -s \"$t\" \"$d\" && [ \"$(stat -c %a.%u.%g \"$t\")\" = \"$(stat -c %a.%u.%g \"$d\")\" ]; \
         then echo {UNCHANGED}; else mv -f -- \"$t\" \"$d\"; fi\n"
    ));
    s
}

fn local_mode(step: &Step, src: &Path) -> Result<u32, Failure> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(src)
        .map(|m| m.permissions().mode() & 0o7777)
        .map_err(|source| {
            Failure::from(Error::LocalFile {
                origin: step.origin.clone(),
                label: step_label(step),
                path: src.to_path_buf(),
                source,
            })
        })
}

fn join(dest: &str, rel: &Path) -> String {
    format!("{}/{}", dest.trim_end_matches('/'), rel.display())
}

/// Every entry below `root` (relative paths), folders before their contents, sorted.
fn collect_files(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, bool)>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let r = rel.join(e.file_name());
        if e.file_type()?.is_dir() {
            out.push((r.clone(), true));
            collect_files(root, &r, out)?;
        } else {
            out.push((r, false));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_the_tail_and_split_streams() {
        let mut l = Lines::new(false);
        let mut seen = Vec::new();
        l.feed(Stream::Stdout, b"a\nb", |s, t| {
            seen.push((s, t.to_string()))
        });
        l.feed(Stream::Stderr, b"err\n", |s, t| {
            seen.push((s, t.to_string()))
        });
        l.feed(Stream::Stdout, b"c\n", |s, t| seen.push((s, t.to_string())));
        for i in 0..30 {
            l.feed(Stream::Stdout, format!("n{i}\n").as_bytes(), |_, _| {});
        }
        l.finish(|_, _| {});
        assert_eq!(seen[0], (Stream::Stdout, "a".to_string()));
        assert_eq!(seen[1], (Stream::Stderr, "err".to_string()));
        assert_eq!(seen[2], (Stream::Stdout, "bc".to_string()));
        assert_eq!(l.tail.len(), TAIL);
        assert_eq!(l.tail.back().map(String::as_str), Some("n29"));
    }

    #[test]
    fn a_huge_timeout_is_no_deadline_and_never_overflows() {
        let huge = Duration::from_secs(u64::MAX);
        assert_eq!(remaining(Instant::now().checked_add(huge)), Duration::MAX);
        assert!(
            remaining(Instant::now().checked_add(Duration::from_secs(60)))
                <= Duration::from_secs(60)
        );
        assert!(exit_detail(124, huge).contains("timed out after"));
    }

    #[test]
    fn timeouts_are_named() {
        assert!(exit_detail(124, Duration::from_secs(2)).contains("timed out after 2.0s"));
        assert_eq!(exit_detail(100, Duration::from_secs(2)), "exited 100");
    }

    #[test]
    fn install_script_quotes_the_destination() {
        let s = install_script(
            "/etc/it's here",
            &FileAttrs {
                mode: Some(0o600),
                owner: Some("root".into()),
                group: None,
            },
            0o644,
        );
        assert!(s.contains(r"d='/etc/it'\''s here'"));
        assert!(s.contains("chmod 600 \"$t\""));
        assert!(s.contains("chown root \"$t\""));
    }
}

/// Whether a fact's output can be a tag value: one line, 1 to 256 characters, no secret.
fn fact_value(text: &str, secrets: &[String]) -> Result<(), String> {
    if text.is_empty() {
        return Err("printed nothing (a fact is one line of output)".to_string());
    }
    if text.contains('\n') {
        return Err(format!(
            "printed {} lines (a fact is one line of output)",
            text.lines().count()
        ));
    }
    if text.chars().count() > 256 {
        return Err(format!(
            "printed {} characters (a tag value holds at most 256)",
            text.chars().count()
        ));
    }
    if mask(text, secrets) != text {
        return Err("printed the value of a secret variable (tags are readable by anyone who can describe the image)".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod fact_tests {
    use super::fact_value;

    #[test]
    fn a_fact_is_one_short_line_without_secrets() {
        let none: Vec<String> = Vec::new();
        assert!(fact_value("2026-11-30T08:00:00Z", &none).is_ok());
        assert!(fact_value("", &none).unwrap_err().contains("nothing"));
        assert!(fact_value("a\nb", &none).unwrap_err().contains("2 lines"));
        assert!(fact_value(&"x".repeat(257), &none)
            .unwrap_err()
            .contains("257"));
        let secrets = vec!["hunter2".to_string()];
        assert!(fact_value("pw=hunter2", &secrets)
            .unwrap_err()
            .contains("secret"));
    }
}
