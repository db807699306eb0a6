//! The fuzz targets without libFuzzer, on any toolchain: each target replays its committed corpus
//! (`corpus/<target>/`) and the crash regressions (`regressions/<target>/`), then runs mutations of
//! them (`src/mutate.rs`) for a time budget or a case count. No coverage feedback: this is the
//! fallback when cargo-fuzz cannot run, and the quick replay CI does in every mode.
//!
//! `DERPMESH_FUZZ_SECONDS` (per target, default 2) and `DERPMESH_FUZZ_CASES` (per target, default
//! unlimited within the time) bound the mutation phase; `DERPMESH_FUZZ_SEED` picks its seed
//! (default: the time). A failing input is written to `artifacts/<target>/stable-crash-<seed>-<n>`.
//!
//!     cargo test --release --no-default-features --test stable -- --test-threads=1 --nocapture

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use derpmesh_relay_fuzz::common::Rng;
use derpmesh_relay_fuzz::mutate::mutate;
use derpmesh_relay_fuzz::TARGETS;

const MAX_LEN: usize = 8 << 10;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number"))
    })
}

fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
            (p, data)
        })
        .collect()
}

fn run_one(target: &str, run: fn(&[u8]), data: &[u8], what: &str, save_as: Option<String>) {
    if std::panic::catch_unwind(|| run(data)).is_err() {
        let saved = save_as.map(|name| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts").join(target);
            std::fs::create_dir_all(&dir).expect("artifacts dir");
            let path = dir.join(name);
            std::fs::write(&path, data).expect("writing the crashing input");
            path.display().to_string()
        });
        panic!(
            "{target}: {what} fails ({} bytes){}",
            data.len(),
            saved.map(|p| format!(", saved as {p}")).unwrap_or_default()
        );
    }
}

fn fuzz(target: &str) {
    let run = TARGETS.iter().find(|(n, _)| *n == target).expect("a target").1;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut seeds = inputs(&root.join("corpus").join(target));
    let regressions = inputs(&root.join("regressions").join(target));
    let start = Instant::now();
    for (path, data) in seeds.iter().chain(&regressions) {
        run_one(target, run, data, &path.display().to_string(), None);
    }
    let replayed = seeds.len() + regressions.len();
    seeds.extend(regressions);
    if seeds.is_empty() {
        seeds.push((PathBuf::new(), vec![0]));
    }
    let budget = Duration::from_secs(env_u64("DERPMESH_FUZZ_SECONDS").unwrap_or(2));
    let cases = env_u64("DERPMESH_FUZZ_CASES").unwrap_or(u64::MAX);
    let seed = env_u64("DERPMESH_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut rng = Rng::new(seed);
    let mutating = Instant::now();
    let mut n = 0u64;
    while n < cases && mutating.elapsed() < budget {
        let a = &seeds[rng.below(seeds.len())].1;
        let b = &seeds[rng.below(seeds.len())].1;
        let data = mutate(a, b, &mut rng, MAX_LEN);
        run_one(
            target,
            run,
            &data,
            &format!("mutation {n} (DERPMESH_FUZZ_SEED={seed})"),
            Some(format!("stable-crash-{seed}-{n}")),
        );
        n += 1;
    }
    println!(
        "stable fuzz {target}: replayed {replayed} corpus/regression inputs, ran {n} mutations in {:.1} s (seed {seed})",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn frame_reader() {
    fuzz("frame_reader");
}

#[test]
fn relay_conn() {
    fuzz("relay_conn");
}

#[test]
fn handshake() {
    fuzz("handshake");
}

#[test]
fn http_front() {
    fuzz("http_front");
}

#[test]
fn websocket() {
    fuzz("websocket");
}

#[test]
fn stun() {
    fuzz("stun");
}

#[test]
fn client() {
    fuzz("client");
}

#[test]
fn tls_records() {
    fuzz("tls_records");
}
