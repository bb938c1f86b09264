//! One connector process: spawning it, writing requests, pairing answers with their calls,
//! forwarding its stderr, and noticing when it dies or breaks the protocol.
//!
//! Invariants:
//! - Exactly one task reads stdout; it is the one place that declares the process dead, and
//!   then fails every call in flight (and every later one) with the same transient error.
//! - Exactly one task writes stdin, from a queue, so a call that times out never leaves half a
//!   line behind; dropping the queue's sender closes stdin once what was queued is written.
//! - Exactly one task owns the `Child`: it reaps the process and kills it on request, so no
//!   path leaves a zombie or a stray process (and `kill_on_drop` covers a dropped runtime).

use std::collections::HashMap;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use optinsync_connector_protocol::{Cancel, MAX_LINE, Method, Request, Response};
use optinsync_core::untrusted::Escaped;
use optinsync_plugin_api::{ConnectorError, ConnectorResult};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::sync::{Notify, mpsc, oneshot, watch};

/// Only these are passed on from the daemon's environment: a connector gets its secrets from
/// `configure`, never from the environment.
const KEPT_ENV: [&str; 6] = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// A stderr line is forwarded cut to this many bytes.
const MAX_LOG_LINE: usize = 2048;

/// How long a process that closed stdout gets to exit by itself before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

type Answer = ConnectorResult<Value>;

/// Calls waiting for an answer, and why the process is gone once it is.
#[derive(Default)]
struct Pending {
    calls: HashMap<u64, oneshot::Sender<Answer>>,
    dead: Option<(Instant, String)>,
}

fn lock(p: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    // A panic while holding this lock cannot leave the map inconsistent: keep going.
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Who is talking, for logs and error messages.
#[derive(Debug, Clone)]
pub(crate) struct Label {
    pub name: Arc<str>,
}

pub(crate) struct Process {
    label: Label,
    pub(crate) started: Instant,
    next_id: AtomicU64,
    pending: Arc<Mutex<Pending>>,
    stdin: Mutex<Option<mpsc::UnboundedSender<Vec<u8>>>>,
    kill: Arc<Notify>,
    exit: watch::Receiver<Option<String>>,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("connector", &self.label.name)
            .finish_non_exhaustive()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill.notify_one();
    }
}

/// `command` as the operator wrote it, for messages.
pub(crate) fn command_text(command: &[String]) -> String {
    command.join(" ")
}

impl Process {
    /// Start `command` in `cwd` with the cleared environment and the three pipes.
    pub(crate) fn spawn(
        label: Label,
        command: &[String],
        cwd: &Path,
        first_id: u64,
    ) -> std::io::Result<Self> {
        let (program, args) = command
            .split_first()
            .ok_or_else(|| std::io::Error::other("empty command"))?;
        // A relative path is relative to the config file's directory (what the doc promises),
        // whatever the platform does with a relative program and a changed working directory.
        let program = if program.contains('/') && Path::new(program).is_relative() {
            cwd.join(program).into_os_string()
        } else {
            program.into()
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for key in KEPT_ENV {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        let mut child = cmd.spawn()?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(std::io::Error::other("the child's pipes are missing"));
        };

        let pending = Arc::new(Mutex::new(Pending::default()));
        let kill = Arc::new(Notify::new());
        let (exit_tx, exit_rx) = watch::channel(None);
        let (tx, rx) = mpsc::unbounded_channel();

        tokio::spawn(own_child(child, kill.clone(), exit_tx));
        tokio::spawn(write_stdin(stdin, rx));
        tokio::spawn(forward_stderr(label.clone(), stderr));
        tokio::spawn(read_stdout(
            label.clone(),
            BufReader::new(stdout),
            pending.clone(),
            kill.clone(),
            exit_rx.clone(),
        ));
        Ok(Self {
            label,
            started: Instant::now(),
            next_id: AtomicU64::new(first_id),
            pending,
            stdin: Mutex::new(Some(tx)),
            kill,
            exit: exit_rx,
        })
    }

    /// When and why the process died, once the stdout reader has seen it.
    pub(crate) fn death(&self) -> Option<(Instant, String)> {
        lock(&self.pending).dead.clone()
    }

    /// One request under a fresh id; `timeout` covers queueing and the answer.
    pub(crate) async fn call(&self, method: Method, params: Value, timeout: Duration) -> Answer {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.call_id(id, method, params, Some(timeout)).await
    }

    /// One request under `id` (`hello` and `configure` have fixed ids); without a timeout the
    /// caller bounds the wait (start-up has one deadline for both).
    pub(crate) async fn call_id(
        &self,
        id: u64,
        method: Method,
        params: Value,
        timeout: Option<Duration>,
    ) -> Answer {
        let mut line = serde_json::to_vec(&Request { id, method, params }).map_err(|e| {
            ConnectorError::permanent(format!("cannot encode the `{method}` request: {e}"))
        })?;
        if line.len() > MAX_LINE {
            return Err(ConnectorError::permanent(format!(
                "the `{method}` request is longer than the protocol's 16 MiB line limit"
            )));
        }
        line.push(b'\n');
        let (tx, rx) = oneshot::channel();
        {
            let mut p = lock(&self.pending);
            if let Some((_, reason)) = &p.dead {
                return Err(ConnectorError::transient(reason.clone()));
            }
            p.calls.insert(id, tx);
        }
        if !self.send_line(line) {
            lock(&self.pending).calls.remove(&id);
            return Err(ConnectorError::transient(format!(
                "connector `{}`: its stdin is closed",
                self.label.name
            )));
        }
        let answer = match timeout {
            Some(t) => match tokio::time::timeout(t, rx).await {
                Ok(a) => a,
                Err(_) => {
                    lock(&self.pending).calls.remove(&id);
                    // Best effort: the connector may stop working on it; a late answer is
                    // ignored (its id is no longer pending).
                    if let Ok(cancel) = serde_json::to_vec(&Cancel { id }) {
                        let mut cancel = cancel;
                        cancel.push(b'\n');
                        self.send_line(cancel);
                    }
                    metrics::counter!("optinsync_exec_call_timeouts_total", "connector" => self.label.name.to_string())
                        .increment(1);
                    return Err(ConnectorError::transient(format!(
                        "connector `{}` did not answer `{method}` within {}",
                        self.label.name,
                        crate::settings::duration_text(t)
                    )));
                }
            },
            None => rx.await,
        };
        match answer {
            Ok(a) => a,
            // The reader dropped the sender without an answer: it failed us on its way out.
            Err(_) => Err(ConnectorError::transient(
                self.death()
                    .map(|(_, r)| r)
                    .unwrap_or_else(|| format!("connector `{}` went away", self.label.name)),
            )),
        }
    }

    fn send_line(&self, line: Vec<u8>) -> bool {
        let guard = self.stdin.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().is_some_and(|tx| tx.send(line).is_ok())
    }

    /// Close stdin once what is queued has been written (end of input for the connector).
    pub(crate) fn close_stdin(&self) {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    pub(crate) fn kill(&self) {
        self.kill.notify_one();
    }

    /// Wait up to `limit` for the process to exit; whether it did.
    pub(crate) async fn wait_exit(&self, limit: Duration) -> bool {
        let mut exit = self.exit.clone();
        tokio::time::timeout(limit, exit.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("status {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            (None, None) => s.to_string(),
        },
        Err(e) => format!("status unknown ({e})"),
    }
}

/// Reaps the child, or kills it when asked; publishes how it ended.
async fn own_child(mut child: Child, kill: Arc<Notify>, exit: watch::Sender<Option<String>>) {
    let status = tokio::select! {
        s = child.wait() => s,
        () = kill.notified() => {
            let _ = child.start_kill();
            child.wait().await
        }
    };
    let _ = exit.send(Some(describe(status)));
}

async fn write_stdin(
    mut stdin: tokio::process::ChildStdin,
    mut lines: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    while let Some(line) = lines.recv().await {
        // A failed write means the process is going away; the stdout reader reports that.
        if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
            return;
        }
    }
    // Sender dropped: stdin closes here (end of input after `shutdown`).
}

/// Read up to `limit` bytes of one line into `buf`; `Ok(None)` at end of input; `Ok(Some(true))`
/// when the line ended with `\n`.
async fn read_capped<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<Option<bool>> {
    buf.clear();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX);
    let n = (&mut *reader).take(cap).read_until(b'\n', buf).await?;
    if n == 0 {
        return Ok(None);
    }
    let complete = buf.last() == Some(&b'\n');
    if complete {
        buf.pop();
    }
    Ok(Some(complete))
}

async fn forward_stderr(label: Label, stderr: ChildStderr) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        match read_capped(&mut reader, &mut buf, MAX_LOG_LINE).await {
            Ok(Some(complete)) => {
                let text = String::from_utf8_lossy(&buf);
                let text = text.trim_end_matches('\r');
                tracing::info!(connector = %label.name, "{}", Escaped(text));
                if !complete {
                    // Cut: drop the rest of this line without keeping it in memory.
                    loop {
                        match read_capped(&mut reader, &mut buf, 64 * 1024).await {
                            Ok(Some(false)) => continue,
                            Ok(Some(true)) => break,
                            _ => return,
                        }
                    }
                }
            }
            _ => return,
        }
    }
}

/// Pairs answers with their calls until the process is gone or breaks the protocol; then
/// fails every call in flight and marks the process dead.
async fn read_stdout(
    label: Label,
    mut stdout: BufReader<ChildStdout>,
    pending: Arc<Mutex<Pending>>,
    kill: Arc<Notify>,
    mut exit: watch::Receiver<Option<String>>,
) {
    let name = &label.name;
    let mut buf = Vec::new();
    let mut number = 0u64;
    let broken: Option<String> = loop {
        // One byte over the limit tells an over-long line from one of exactly the limit.
        let line = match read_capped(&mut stdout, &mut buf, MAX_LINE + 1).await {
            Ok(None) | Err(_) => break None,
            Ok(Some(_)) if buf.len() > MAX_LINE => {
                number += 1;
                break Some(format!("line {number} is longer than 16 MiB"));
            }
            Ok(Some(_)) => {
                number += 1;
                &buf
            }
        };
        let text = match std::str::from_utf8(line) {
            Ok(t) => t.trim_end_matches('\r'),
            Err(_) => break Some(format!("line {number} is not UTF-8")),
        };
        if text.trim().is_empty() {
            continue; // A blank line carries nothing; not worth a restart.
        }
        match Response::parse_line(text) {
            Ok(answer) => {
                let waiting = lock(&pending).calls.remove(&answer.id);
                match waiting {
                    Some(tx) => {
                        let _ = tx.send(answer.outcome);
                    }
                    None => tracing::debug!(
                        connector = %name,
                        id = answer.id,
                        "answer to an unknown or cancelled request ignored"
                    ),
                }
            }
            Err(e) => {
                let shown: String = text.chars().take(200).collect();
                tracing::error!(
                    connector = %name,
                    line = number,
                    "protocol error on stdout: {}: {}",
                    e,
                    Escaped(&shown)
                );
                metrics::counter!("optinsync_exec_protocol_errors_total", "connector" => name.to_string())
                    .increment(1);
                break Some(format!("protocol error at stdout line {number}: {e}"));
            }
        }
    };
    if broken.is_some() {
        kill.notify_one();
    }
    // Name how it ended; a process that closed stdout but lingers is killed.
    if tokio::time::timeout(EXIT_GRACE, exit.wait_for(Option::is_some))
        .await
        .is_err()
    {
        kill.notify_one();
    }
    let status = match exit.wait_for(Option::is_some).await {
        Ok(s) => s.clone().unwrap_or_default(),
        Err(_) => "status unknown".to_owned(),
    };
    let reason = match broken {
        Some(b) => format!("connector process exited: killed after a {b} (connector `{name}`)"),
        None => format!("connector process exited: {status} (connector `{name}`)"),
    };
    tracing::warn!(connector = %name, "{}", Escaped(&reason));
    metrics::counter!("optinsync_exec_process_exits_total", "connector" => name.to_string())
        .increment(1);
    let calls = {
        let mut p = lock(&pending);
        p.dead = Some((Instant::now(), reason.clone()));
        std::mem::take(&mut p.calls)
    };
    for (_, tx) in calls {
        let _ = tx.send(Err(ConnectorError::transient(reason.clone())));
    }
}
