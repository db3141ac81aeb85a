//! librdkafka's own mock Kafka cluster (`rdkafka::mocking::MockCluster`) as a process of
//! its own, for tests whose broker must outlive the client processes they kill.
//!
//! ```text
//! bs-mock-kafka [--brokers N] [--topic NAME:PARTITIONS]...
//! ```
//!
//! Starts N (default 3) mock brokers, each listening on 127.0.0.1 only (librdkafka binds
//! its mock listeners to `INADDR_LOOPBACK` on an ephemeral port), creates the `--topic`s,
//! then prints the bootstrap servers (`127.0.0.1:P1,127.0.0.1:P2,...`) as one line on stdout.
//!
//! The mock has no CreateTopics API, so topics are created here: by `--topic`, or while it
//! runs by a line `topic NAME PARTITIONS` on stdin, answered by `ok topic NAME` (or
//! `error ...`) on stdout. It runs until stdin closes or it gets SIGINT/SIGTERM.
//!
//! Limits of the mock worth knowing (librdkafka 2.12, `rdkafka_mock.c`): it keeps each
//! partition's log in memory and drops the oldest message sets once a partition holds more
//! than 5 MiB or 100 000 message sets (not configurable), and static group membership
//! (`group.instance.id`) is accepted but not honoured: a restarted member joins as a new
//! one and the dead one leaves the group when its session times out.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::mpsc;

use rdkafka::mocking::MockCluster;

enum Event {
    Line(String),
    StdinClosed,
    Signal(i32),
}

struct Args {
    brokers: i32,
    topics: Vec<(String, i32)>,
}

fn parse_topic(spec: &str) -> Result<(String, i32), String> {
    let (name, parts) = spec
        .rsplit_once(':')
        .ok_or_else(|| format!("--topic {spec}: expected NAME:PARTITIONS"))?;
    let parts: i32 = parts
        .parse()
        .map_err(|e| format!("--topic {spec}: partitions: {e}"))?;
    if name.is_empty() || parts < 1 {
        return Err(format!(
            "--topic {spec}: empty name or fewer than 1 partition"
        ));
    }
    Ok((name.to_string(), parts))
}

fn parse_args() -> Result<Args, String> {
    let mut out = Args {
        brokers: 3,
        topics: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--brokers" => {
                out.brokers = value
                    .parse()
                    .map_err(|e| format!("--brokers {value}: {e}"))?;
                if out.brokers < 1 {
                    return Err("--brokers must be at least 1".into());
                }
            }
            "--topic" => out.topics.push(parse_topic(&value)?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(out)
}

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread started after, the
/// mock cluster's included) and returns the set, for `sigwait`.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set calls on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bs-mock-kafka: {e}");
            return ExitCode::from(2);
        }
    };
    let signals = block_stop_signals();
    let (tx, rx) = mpsc::channel();
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `signals` is an initialised set, blocked in every thread.
            if unsafe { libc::sigwait(&signals, &mut sig) } == 0 {
                let _ = tx.send(Event::Signal(sig));
            }
        });
    }

    let cluster = match MockCluster::new(args.brokers) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bs-mock-kafka: creating the mock cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    let replication = args.brokers.min(3);
    for (name, parts) in &args.topics {
        if let Err(e) = cluster.create_topic(name, *parts, replication) {
            eprintln!("bs-mock-kafka: creating topic {name}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let bootstrap = cluster.bootstrap_servers();
    // Every listener is on the loopback interface; refuse to run otherwise.
    if !bootstrap.split(',').all(|b| b.starts_with("127.0.0.1:")) {
        eprintln!("bs-mock-kafka: mock brokers not on 127.0.0.1: {bootstrap}");
        return ExitCode::FAILURE;
    }
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{bootstrap}")
        .and_then(|_| out.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }

    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send(Event::Line(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(Event::StdinClosed);
    });

    for event in rx {
        match event {
            Event::Line(l) => {
                let words: Vec<&str> = l.split_whitespace().collect();
                let answer = match words.as_slice() {
                    [] => continue,
                    ["topic", name, parts] => match parts.parse::<i32>() {
                        Ok(p) if p >= 1 => match cluster.create_topic(name, p, replication) {
                            Ok(()) => format!("ok topic {name}"),
                            Err(e) => format!("error creating topic {name}: {e}"),
                        },
                        _ => format!("error bad partition count {parts:?}"),
                    },
                    _ => format!("error unknown command {l:?}"),
                };
                if writeln!(out, "{answer}").and_then(|_| out.flush()).is_err() {
                    break;
                }
            }
            Event::StdinClosed => break,
            Event::Signal(sig) => {
                eprintln!("bs-mock-kafka: signal {sig}, stopping");
                break;
            }
        }
    }
    drop(cluster);
    ExitCode::SUCCESS
}
