//! The fuzz targets on the stable toolchain: every seed (`fuzz/seeds/<target>/`) and every
//! saved crash input (`fuzz/regressions/<target>/`) goes through the target's body, then a
//! few thousand inputs mutated from the seeds by a fixed-seed generator, so that each
//! `cargo test` repeats the same short fuzzing run. The long runs use cargo-fuzz
//! (`fuzz/README.md`); a crash they find is saved under `fuzz/regressions/` and stays here.

use std::fs;
use std::path::{Path, PathBuf};

use kms_tests::fuzzing::{self, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect()
}

/// xorshift64*: the same inputs on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation in the manner of libFuzzer's: flip, insert, delete, duplicate or splice.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(6) {
            0 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 => out.insert(at, rng.next() as u8),
            2 if at < out.len() => {
                out.remove(at);
            }
            3 => {
                let interesting = [b' ', b'/', b'.', b'\n', b'\r', 0, 0xff, b'%', b'\''];
                out.insert(at, interesting[rng.below(interesting.len())]);
            }
            4 if !other.is_empty() => {
                let from = rng.below(other.len());
                let len = rng.below(other.len() - from + 1).min(64);
                out.splice(at..at, other[from..from + len].iter().copied());
            }
            _ => out.truncate(at),
        }
    }
    out
}

#[test]
fn every_target_has_seeds() {
    for target in TARGETS {
        assert!(
            !inputs("seeds", target).is_empty(),
            "no seeds in fuzz/seeds/{target}"
        );
    }
}

#[test]
fn seeds_and_saved_crashes_pass_every_target() {
    for target in TARGETS {
        for kind in ["seeds", "regressions"] {
            for (path, data) in inputs(kind, target) {
                let ran = std::panic::catch_unwind(|| fuzzing::run(target, &data));
                assert!(
                    matches!(ran, Ok(true)),
                    "fuzz target {target} fails on {}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn short_deterministic_fuzzing_of_every_target() {
    const PER_TARGET: usize = 3_000;
    for (n, target) in TARGETS.iter().enumerate() {
        let seeds: Vec<Vec<u8>> = inputs("seeds", target).into_iter().map(|s| s.1).collect();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64);
        for i in 0..PER_TARGET {
            let a = &seeds[rng.below(seeds.len())];
            let b = &seeds[rng.below(seeds.len())];
            let input = mutate(&mut rng, a, b);
            let ran = std::panic::catch_unwind(|| fuzzing::run(target, &input));
            assert!(
                ran.is_ok(),
                "fuzz target {target} fails on mutated input {i}: {input:?} \
                 (save it under fuzz/regressions/{target}/)"
            );
        }
    }
}

/// Writes the binary seeds of `file_reader` (real encrypted files under the target's key).
/// Run by hand after a format change: `cargo test -p kms-tests --test fuzz_replay -- --ignored`.
#[test]
#[ignore]
fn write_file_reader_seeds() {
    let dir = fuzz_dir().join("seeds/file_reader");
    fs::create_dir_all(&dir).unwrap();
    for (name, data) in fuzzing::file_reader_seeds() {
        fs::write(dir.join(name), data).unwrap();
    }
}
