//! Dev CLI for the load generator: runs sender→receiver pairs through a relay and prints the JSON report.
//!
//! cargo run --release --example load -- --url http://127.0.0.1:3340 --pairs 10 --size 1400 --secs 5

use std::process::ExitCode;
use std::time::Duration;

use derpmesh_relay::loadgen::{self, LoadOptions};

const USAGE: &str = "\
usage: load --url http://HOST:PORT [options]

  --url URL           relay the senders dial (http://host:port or http://host:port/derp)
  --receiver-url URL  relay the receivers dial (default: --url); another node measures the mesh path
  --pairs N           sender/receiver pairs (default 10)
  --size BYTES        packet payload bytes (default 1400)
  --secs S            measured window in seconds (default 5)
  --warmup S          unmeasured sending before the window, in seconds (default 1)
  --rate PPS          packets per second per sender (default: as fast as the relay takes them)
  --window N          most packets in flight per pair (default: no limit); about the relay's
                      per-client queue size measures its capacity rather than its overload
  --probe-ms MS       latency probe interval per pair, in milliseconds (default 5)
  --fast-start        dial with Derp-Fast-Start: 1
  --threads N         tokio worker threads (default: one per core)
";

fn main() -> ExitCode {
    match parse(std::env::args().skip(1)) {
        Ok(None) => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Some((opts, threads))) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.enable_all();
            if let Some(n) = threads {
                builder.worker_threads(n);
            }
            let runtime = match builder.build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("load: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(loadgen::run(opts)) {
                Ok(report) => {
                    println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("load: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprint!("load: {e}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// `Ok(None)` means help was asked for.
fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<(LoadOptions, Option<usize>)>, String> {
    let mut opts = LoadOptions::default();
    let mut threads = None;
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        if flag == "--fast-start" {
            opts.fast_start = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<f64>().ok().filter(|n| n.is_finite() && *n >= 0.0);
        let bad = || format!("{flag}: {value:?} is not a valid value");
        match flag.as_str() {
            "--url" => opts.url = value,
            "--receiver-url" => opts.receiver_url = Some(value),
            "--pairs" => opts.pairs = value.parse().map_err(|_| bad())?,
            "--size" => opts.packet_size = value.parse().map_err(|_| bad())?,
            "--secs" => opts.duration = Duration::from_secs_f64(number(&value).ok_or_else(bad)?),
            "--warmup" => opts.warmup = Duration::from_secs_f64(number(&value).ok_or_else(bad)?),
            "--probe-ms" => opts.probe_interval = Duration::from_secs_f64(number(&value).ok_or_else(bad)? / 1000.0),
            "--rate" => opts.rate_per_pair = Some(number(&value).filter(|&r| r > 0.0).ok_or_else(bad)?),
            "--window" => opts.window = Some(value.parse().ok().filter(|&n| n > 0).ok_or_else(bad)?),
            "--threads" => threads = Some(value.parse().ok().filter(|&n| n > 0).ok_or_else(bad)?),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if opts.url.is_empty() {
        return Err("--url is required".into());
    }
    Ok(Some((opts, threads)))
}
