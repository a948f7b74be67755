//! The root shell: privilege is paid for once per run.
//!
//! `sudo -n` costs ~5 ms and a fresh `ssh … sudo sh -c` ~15 ms per call, so one sudo per step cannot
//! be fast. jbake opens ONE exec channel running `sudo -n sh -c BROKER` (plain `sh` when the login
//! user is root). The broker reads requests from stdin, runs each step in a fresh `sh` (its own
//! process group under `timeout`, stdin from /dev/null) and, after it, prints an unguessable marker
//! with the step's exit status on both stdout and stderr. So every step keeps its own exit status,
//! live output and a timeout that kills the remote command, while sudo runs once.

use std::time::Duration;

use rand::Rng;
use russh::client::Msg;
use russh::{Channel, ChannelMsg};
use tokio::io::AsyncRead;

use super::{Error, MarkerScanner, Session};
use crate::util::shell_quote;

/// The broker, a POSIX shell script (dash, bash, busybox sh). `$1` is the marker.
///
/// Requests (one line, then a payload):
/// - `x TIMEOUT USER`, then the script's lines, then a line holding only the marker: run the
///   script under `timeout` (`TIMEOUT` seconds; `USER` `-` for root). The script is read with
///   the shell's own `read`, so a step costs two processes: `timeout` (which leads the step's
///   process group, so a timeout or an interrupt kills the whole step) and its `sh`.
/// - `w LEN`, then exactly LEN bytes: store them in `$JBAKE_TMP/data` for the next script
///   (uploads). `head -c` reads exactly LEN bytes and `read` reads byte by byte, so a payload never
///   swallows the next request.
/// - `q`: quit.
///
/// Scripts (with their `export SECRET=…`) and uploaded data are written under `$JBAKE_TMP`, a
/// folder of mode 0700 in `/run` (a tmpfs: nothing reaches the disk, so nothing is left in an
/// image), as files of mode 0600 (umask 077). The step itself runs with umask 022. A `user:`
/// step reads its script, made its own, through file descriptor 3 (`sh /dev/fd/3`), so the
/// folder never has to be opened to other users.
const BROKER: &str = r#"m=$1
umask 077
JBAKE_TMP=$(mktemp -d /run/.jbake.XXXXXXXX 2>/dev/null || mktemp -d /tmp/.jbake.XXXXXXXX) || exit 90
export JBAKE_TMP
chmod 700 "$JBAKE_TMP"
trap 'rm -rf "$JBAKE_TMP"' EXIT HUP TERM
export HOME=/root
export DEBIAN_FRONTEND=noninteractive
cd / || exit 90
command -v timeout >/dev/null 2>&1 || { echo "jbake needs 'timeout' (coreutils or busybox) on the machine" >&2; exit 93; }
printf '%s ready %s %s\n' "$m" "$(id -u)" "$$"
while IFS=' ' read -r op a b; do
  case $op in
  x)
    umask 077
    while IFS= read -r l; do
      [ "$l" = "$m" ] && break
      printf '%s\n' "$l"
    done > "$JBAKE_TMP/s"
    if [ "$b" != - ]; then
      chown "$b" "$JBAKE_TMP/s" 2>/dev/null
      set -- su -s /bin/sh -c 'exec sh /dev/fd/3' "$b"
    else
      set -- sh "$JBAKE_TMP/s"
    fi
    umask 022
    timeout -k 10 "$a" "$@" </dev/null 3<"$JBAKE_TMP/s"; rc=$?
    ;;
  w) umask 077; head -c "$a" > "$JBAKE_TMP/data"; rc=$? ;;
  q) exit 0 ;;
  *) rc=92 ;;
  esac
  printf '\n%s %s\n' "$m" "$rc"
  printf '\n%s %s\n' "$m" "$rc" >&2
done
"#;

/// Which stream a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// A root shell on the remote machine. Requests run one after another.
pub struct RootShell {
    channel: Channel<Msg>,
    target: String,
    marker: String,
    out: MarkerScanner,
    err: MarkerScanner,
    pid: u32,
}

/// How long to wait past a step's own timeout before declaring the machine unresponsive.
const GRACE: Duration = Duration::from_secs(30);

impl RootShell {
    /// Starts the broker: `sudo -n` once (or nothing when logged in as root).
    pub async fn open(session: &Session) -> Result<RootShell, Error> {
        let target = session.target.addr();
        let protocol = |source| Error::Protocol {
            target: target.clone(),
            source,
        };
        let marker = format!("JBAKE-{:032x}", rand::thread_rng().gen::<u128>());
        let channel = session.open_channel().await.map_err(protocol)?;
        let script = shell_quote(BROKER);
        let command = if session.target.user == "root" {
            format!("sh -c {script} jbake {marker}")
        } else {
            format!("sudo -n -- sh -c {script} jbake {marker}")
        };
        channel.exec(true, command).await.map_err(protocol)?;
        let mut shell = RootShell {
            channel,
            target: target.clone(),
            out: MarkerScanner::new(&marker),
            err: MarkerScanner::new(&marker),
            marker,
            pid: 0,
        };
        shell.wait_ready(&session.target.user).await?;
        Ok(shell)
    }

    async fn wait_ready(&mut self, user: &str) -> Result<(), Error> {
        self.pid = self.read_ready(user).await?;
        Ok(())
    }

    async fn read_ready(&mut self, user: &str) -> Result<u32, Error> {
        let ready = format!("{} ready ", self.marker);
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let wait = async {
            loop {
                match self.channel.wait().await {
                    Some(ChannelMsg::Data { data }) => {
                        stdout.extend_from_slice(&data);
                        let text = String::from_utf8_lossy(&stdout);
                        if let Some(at) = text.find(&ready) {
                            if let Some(line) = text[at + ready.len()..].split('\n').next() {
                                if text[at..].contains('\n') {
                                    let pid = line.split_whitespace().nth(1);
                                    return Ok(pid.and_then(|p| p.parse().ok()).unwrap_or(0));
                                }
                            }
                        }
                    }
                    Some(ChannelMsg::ExtendedData { data, .. }) => stderr.extend_from_slice(&data),
                    Some(ChannelMsg::Eof | ChannelMsg::Close) | None => return Err(()),
                    Some(ChannelMsg::ExitStatus { .. }) => {}
                    Some(_) => {}
                }
            }
        };
        match tokio::time::timeout(GRACE, wait).await {
            Ok(Ok(pid)) => Ok(pid),
            Ok(Err(())) => {
                let why = String::from_utf8_lossy(&stderr).trim().to_string();
                let hint = if why.contains("password") || why.contains("sudo") {
                    format!(
                        "jbake runs steps as root through passwordless sudo ('sudo -n'); give \
                         '{user}' a NOPASSWD sudoers rule, or connect as root"
                    )
                } else {
                    "the root shell exited at once".to_string()
                };
                Err(Error::Privilege {
                    target: self.target.clone(),
                    detail: if why.is_empty() {
                        hint
                    } else {
                        format!("{why} ({hint})")
                    },
                })
            }
            Err(_) => Err(Error::Unresponsive {
                target: self.target.clone(),
                during: "while starting the root shell".to_string(),
                waited: GRACE,
            }),
        }
    }

    /// Runs `script` with `sh` as root (or as `user`), streaming output to `sink` as it arrives.
    /// Returns the exit status. The `timeout` kills the remote command (its whole process group):
    /// the status is then 124 (or 137 when it ignored SIGTERM for 10 s).
    pub async fn run(
        &mut self,
        script: &str,
        timeout: Duration,
        user: Option<&str>,
        during: &str,
        sink: &mut (dyn FnMut(Stream, &[u8]) + Send),
    ) -> Result<i32, Error> {
        let secs = timeout.as_secs().max(1);
        let user = user.unwrap_or("-");
        let mut request = format!("x {secs} {user}\n{script}");
        if !request.ends_with('\n') {
            request.push('\n');
        }
        request.push_str(&self.marker);
        request.push('\n');
        self.send(request.into_bytes()).await?;
        // A step's `timeout` is user input: never overflow.
        self.collect(Some(timeout.saturating_add(GRACE)), during, sink)
            .await
    }

    /// Sends `len` bytes from `data` to `$JBAKE_TMP/data` on the machine, for the next script.
    pub async fn put_data<R: AsyncRead + Unpin>(
        &mut self,
        data: R,
        len: u64,
        during: &str,
    ) -> Result<(), Error> {
        self.send(format!("w {len}\n").into_bytes()).await?;
        self.channel
            .data(data)
            .await
            .map_err(|_| self.lost(during))?;
        let mut ignore = |_: Stream, _: &[u8]| {};
        let code = self.collect(None, during, &mut ignore).await?;
        if code != 0 {
            return Err(Error::Lost {
                target: self.target.clone(),
                during: format!("{during} (storing the data failed with exit status {code})"),
            });
        }
        Ok(())
    }

    async fn send(&mut self, bytes: Vec<u8>) -> Result<(), Error> {
        self.channel
            .data_bytes(bytes)
            .await
            .map_err(|_| self.lost("while sending a request"))
    }

    fn lost(&self, during: &str) -> Error {
        Error::Lost {
            target: self.target.clone(),
            during: during.to_string(),
        }
    }

    async fn collect(
        &mut self,
        backstop: Option<Duration>,
        during: &str,
        sink: &mut (dyn FnMut(Stream, &[u8]) + Send),
    ) -> Result<i32, Error> {
        let mut out_done = None;
        let mut err_done = None;
        // Output of a previous request's background process may already be buffered.
        for (stream, scanner, done) in [
            (Stream::Stdout, &mut self.out, &mut out_done),
            (Stream::Stderr, &mut self.err, &mut err_done),
        ] {
            let r = scanner.scan();
            if !r.output.is_empty() {
                sink(stream, &r.output);
            }
            *done = r.done;
        }
        let channel = &mut self.channel;
        let out = &mut self.out;
        let err = &mut self.err;
        let wait = async {
            while out_done.is_none() || err_done.is_none() {
                let (stream, scanned) = match channel.wait().await {
                    Some(ChannelMsg::Data { data }) => (Stream::Stdout, out.feed(&data)),
                    Some(ChannelMsg::ExtendedData { data, .. }) => {
                        (Stream::Stderr, err.feed(&data))
                    }
                    Some(ChannelMsg::Eof | ChannelMsg::Close) | None => {
                        for (s, sc) in [(Stream::Stdout, &mut *out), (Stream::Stderr, &mut *err)] {
                            let rest = sc.take_rest();
                            if !rest.is_empty() {
                                sink(s, &rest);
                            }
                        }
                        return false;
                    }
                    Some(_) => continue,
                };
                if !scanned.output.is_empty() {
                    sink(stream, &scanned.output);
                }
                if let Some(code) = scanned.done {
                    match stream {
                        Stream::Stdout => out_done = Some(code),
                        Stream::Stderr => err_done = Some(code),
                    }
                }
            }
            true
        };
        let finished = match backstop {
            Some(limit) => match tokio::time::timeout(limit, wait).await {
                Ok(f) => f,
                Err(_) => {
                    return Err(Error::Unresponsive {
                        target: self.target.clone(),
                        during: during.to_string(),
                        waited: limit,
                    })
                }
            },
            None => wait.await,
        };
        if !finished {
            return Err(self.lost(during));
        }
        Ok(out_done.or(err_done).unwrap_or(-1))
    }

    /// The root shell's process id on the machine (for [`stop_remote`]).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Ends the broker (it removes its temporary folder) and closes the channel.
    pub async fn close(mut self) {
        let _ = self.channel.data_bytes(b"q\n".to_vec()).await;
        let _ = self.channel.eof().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(msg) = self.channel.wait().await {
                if matches!(msg, ChannelMsg::Close) {
                    break;
                }
            }
        })
        .await;
    }
}

/// Stops whatever a root shell is running, from a second connection: used after an interrupt,
/// when the first connection is already gone. Every step runs under `timeout`, which leads its
/// own process group; SIGTERM to it is passed on to the whole group. Needs no procps.
pub async fn stop_remote(session: &Session, broker_pid: u32) -> Result<(), Error> {
    let target = session.target.addr();
    let script = format!(
        "for s in /proc/[0-9]*/stat; do read -r p c st pp rest < \"$s\" 2>/dev/null || continue; \
         [ \"$pp\" = {broker_pid} ] && kill -TERM \"$p\" 2>/dev/null; done; \
         kill -TERM {broker_pid} 2>/dev/null; exit 0"
    );
    let quoted = shell_quote(&script);
    let command = if session.target.user == "root" {
        format!("sh -c {quoted}")
    } else {
        format!("sudo -n -- sh -c {quoted}")
    };
    let mut channel = session
        .open_channel()
        .await
        .map_err(|source| Error::Protocol {
            target: target.clone(),
            source,
        })?;
    channel
        .exec(true, command)
        .await
        .map_err(|source| Error::Protocol { target, source })?;
    while let Some(msg) = channel.wait().await {
        if matches!(msg, ChannelMsg::ExitStatus { .. } | ChannelMsg::Close) {
            break;
        }
    }
    Ok(())
}
