//! Child processes measured by `wait4` (wall, CPU, peak RSS), a `broadside serve` child, and
//! plain HTTP/1.1 requests over a `TcpStream`.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// What the kernel reports about a finished child.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Wall seconds from spawn to exit.
    pub wall_secs: f64,
    /// User + system CPU seconds.
    pub cpu_secs: f64,
    /// Peak resident set, bytes.
    pub peak_rss: u64,
}

struct Waited {
    status: i32,
    usage: Usage,
}

/// Waits for `pid` with wait4.
fn wait4(pid: u32, started: Instant) -> Result<Waited> {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in; pid is our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    if r < 0 {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Waited {
        status,
        usage: Usage {
            wall_secs: started.elapsed().as_secs_f64(),
            cpu_secs: secs(usage.ru_utime) + secs(usage.ru_stime),
            peak_rss: usage.ru_maxrss as u64 * 1024,
        },
    })
}

fn describe(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status}")
    }
}

/// The last `lines` lines of a file (for error messages).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// A finished child: its usage and stdout.
pub struct Finished {
    /// Wall, CPU, peak RSS.
    pub usage: Usage,
    /// Its stdout.
    pub stdout: String,
}

/// Runs `cmd` to completion with stdout and stderr in `<logs>.stdout` / `<logs>.stderr`;
/// fails naming `what`, the command and the tail of its stderr when it does not exit 0.
pub fn run_child(what: &str, cmd: &mut Command, logs: &Path) -> Result<Finished> {
    if let Some(d) = logs.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let out_path = PathBuf::from(format!("{}.stdout", logs.display()));
    let err_path = PathBuf::from(format!("{}.stderr", logs.display()));
    let out = std::fs::File::create(&out_path)
        .with_context(|| format!("creating {}", out_path.display()))?;
    let err = std::fs::File::create(&err_path)
        .with_context(|| format!("creating {}", err_path.display()))?;
    let started = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {what}: {cmd:?}"))?;
    let pid = child.id();
    let waited = wait4(pid, started);
    // Reaped by wait4 above: Child must not wait (or kill) it again.
    std::mem::forget(child);
    let waited = waited?;
    if !(libc::WIFEXITED(waited.status) && libc::WEXITSTATUS(waited.status) == 0) {
        bail!(
            "{what} failed ({}): {cmd:?}\n--- stderr tail ({}) ---\n{}",
            describe(waited.status),
            err_path.display(),
            tail(&err_path, 20)
        );
    }
    Ok(Finished {
        usage: waited.usage,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
    })
}

/// A running `broadside serve` child, killed on drop.
pub struct Server {
    child: Option<Child>,
    started: Instant,
    what: String,
    /// `host:port` it listens on.
    pub addr: String,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Server {
    /// Starts `cmd` (a `broadside serve … --listen 127.0.0.1:0`) and reads its stderr up to the
    /// `serving … on http://ADDR` line; later lines are kept (the last 50) for errors.
    pub fn start(what: &str, cmd: &mut Command) -> Result<Server> {
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}: {cmd:?}"))?;
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let mut seen = Vec::new();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some((_, rest)) = line
                        .strip_prefix("serving ")
                        .and_then(|l| l.split_once(" on http://"))
                    {
                        break rest.trim().to_string();
                    }
                    seen.push(line);
                }
                _ => {
                    let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                    let n = seen.len();
                    bail!(
                        "{what} exited before listening ({status}): {cmd:?}\n--- stderr tail ---\n{}",
                        seen[n.saturating_sub(20)..].join("\n")
                    );
                }
            }
        };
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let t = tail.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(|l| l.ok()) {
                let mut t = t.lock().expect("tail lock");
                if t.len() == 50 {
                    t.pop_front();
                }
                t.push_back(l);
            }
        });
        Ok(Server {
            child: Some(child),
            started,
            what: what.to_string(),
            addr,
            tail,
        })
    }

    /// The last lines it wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        let t = self.tail.lock().expect("tail lock");
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Names the server and its stderr tail in an error.
    pub fn context(&self, e: anyhow::Error) -> anyhow::Error {
        e.context(format!(
            "{} (on {}); --- its stderr tail ---\n{}",
            self.what,
            self.addr,
            self.stderr_tail()
        ))
    }

    /// Kills it and returns its usage over its whole life (peak RSS, CPU).
    pub fn stop(mut self) -> Result<Usage> {
        let child = self.child.take().expect("running");
        let pid = child.id();
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        let waited = wait4(pid, self.started);
        std::mem::forget(child);
        Ok(waited?.usage)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An HTTP answer.
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
    /// Seconds from connect to the last byte.
    pub secs: f64,
}

/// One request through the shared HTTP client (`broadside-net`) on a runtime of its own, so
/// over a new connection (the pooled connections of an earlier call's runtime are closed with
/// it): status, body and the seconds from connecting to the last byte.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Answer> {
    let endpoint = broadside_net::Endpoint::parse(&format!("http://{addr}"))
        .map_err(|e| anyhow::anyhow!("{addr}: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the HTTP client's runtime")?;
    let started = Instant::now();
    let a = rt
        .block_on(broadside_net::send(
            method,
            &endpoint,
            path,
            &[],
            headers,
            body.to_vec(),
        ))
        .map_err(|e| anyhow::anyhow!("{method} {path}: {e}"))?;
    Ok(Answer {
        status: a.status,
        body: a.body.to_vec(),
        secs: started.elapsed().as_secs_f64(),
    })
}
