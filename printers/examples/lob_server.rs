//! The local Lob test server as a program, to try a mail campaign without Lob or to measure the
//! mail path (benches/mail-rate.sh):
//!
//! ```text
//! cargo run -p broadside-printers --example lob_server -- [--addr 127.0.0.1:8089] [--key K] [--latency-ms 0]
//! ```
//!
//! Prints its base URL, serves until interrupted (Ctrl-C / SIGINT), then prints
//! `pieces=N calls=M max_in_flight=K`.

#[path = "../tests/support/lob_server.rs"]
mod lob_server;

use std::time::Duration;

fn main() {
    let mut addr = "127.0.0.1:8089".to_string();
    let mut key = "test_lob_key".to_string();
    let mut latency_ms = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--addr" => addr = value(),
            "--key" => key = value(),
            "--latency-ms" => latency_ms = value().parse().expect("--latency-ms: a number"),
            other => {
                eprintln!("unknown argument {other}; use --addr, --key, --latency-ms");
                std::process::exit(2);
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let server =
            lob_server::LobServer::start_at(&addr, &key, Duration::from_millis(latency_ms)).await;
        println!("{}", server.base_url);
        let _ = tokio::signal::ctrl_c().await;
        println!(
            "pieces={} calls={} max_in_flight={}",
            server.pieces().len(),
            server.calls(),
            server.max_in_flight()
        );
    });
}
