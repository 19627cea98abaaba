//! Helpers of the plugin tests: where the build puts things, building the plugins once per test
//! binary, compiling C plugins, loading and opening plugins.
//!
//! The target directory is found from the test executable itself
//! (`<target>/<profile>/deps/<test>`), so the tests work with any `CARGO_TARGET_DIR` and
//! profile, and the nested `cargo build` writes into the very directory the tests run from.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use kms_core::config::Context;
use kms_core::plugin::{Plugin, library_file_name};
use kms_core::{KeyProvider, Result};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("plugin-tests lives in the workspace")
        .to_path_buf()
}

/// `<target>/<profile>`: where `cargo build` puts binaries and plugins.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let dir = exe.parent().expect("the test lives in a directory");
    let dir = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps lives in the profile directory")
    } else {
        dir
    };
    dir.to_path_buf()
}

/// `<target>`.
pub fn target_dir() -> PathBuf {
    profile_dir()
        .parent()
        .expect("the profile directory lives in the target directory")
        .to_path_buf()
}

/// Runs `cargo build` with `args` for the profile the tests were built with.
pub fn cargo_build(args: &[&str]) {
    let profile = profile_dir();
    let profile = profile
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", target_dir());
    match profile {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    let status = command.args(args).status().expect("cargo runs");
    assert!(status.success(), "cargo build {args:?} failed: {status}");
}

/// Builds the CLI, every shipped plugin and the Rust example plugin, once per test binary;
/// returns the profile directory that holds them.
pub fn built() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        cargo_build(&[
            "-p",
            "kms-cli",
            "-p",
            "kms-file-plugin",
            "-p",
            "kms-command-plugin",
            "-p",
            "kms-mock-plugin",
            "-p",
            "kms-example-plugin",
        ]);
        profile_dir()
    })
}

/// Runs a plain `cargo build` (the default members), once per test binary.
pub fn built_by_default() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        cargo_build(&[]);
        profile_dir()
    })
}

/// The plugin of provider `name` in the profile directory, built first.
pub fn plugin_path(name: &str) -> PathBuf {
    built().join(library_file_name(name))
}

/// The `kms` binary, built first.
pub fn kms_bin() -> PathBuf {
    built().join("kms")
}

/// A C source of these tests (`plugin-tests/c/<file>`).
pub fn c_test_source(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("c").join(file)
}

/// The C example plugin's source.
pub fn c_example_source() -> PathBuf {
    workspace_root().join("examples/plugin-c/kms_example.c")
}

/// Compiles `source` with `cc -shared -fPIC -I include` (plus `flags`) into `out`.
pub fn compile_c(source: &Path, out: &Path, flags: &[&str]) -> PathBuf {
    let status = Command::new("cc")
        .args([
            "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-I",
        ])
        .arg(workspace_root().join("include"))
        .args(flags)
        .arg("-o")
        .arg(out)
        .arg(source)
        .status()
        .expect("cc runs");
    assert!(status.success(), "cc {} failed: {status}", source.display());
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755)).unwrap();
    out.to_path_buf()
}

/// A private temporary directory (mode 0700, so that plugins in it pass the loader's checks).
pub fn private_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// Parses TOML text as a provider options table.
pub fn options(text: &str) -> kms_core::toml::Table {
    text.parse().expect("test options are valid TOML")
}

/// Loads the plugin at `path` and opens a provider with `options`, relative paths resolving
/// against `base_dir`.
pub fn open_plugin(path: &Path, base_dir: &Path, options: &str) -> Result<Box<dyn KeyProvider>> {
    let context = Context {
        base_dir: base_dir.to_path_buf(),
    };
    Plugin::load(path)?.open(&context, &self::options(options))
}

/// Initialises through the plugin's `init`, then opens.
pub fn init_and_open(path: &Path, base_dir: &Path, options: &str) -> Box<dyn KeyProvider> {
    let context = Context {
        base_dir: base_dir.to_path_buf(),
    };
    let plugin = Plugin::load(path).expect("the plugin loads");
    let line = plugin
        .init(&context, &self::options(options))
        .expect("init through the plugin");
    assert!(line.starts_with("initialised"), "{line}");
    plugin
        .open(&context, &self::options(options))
        .expect("open through the plugin")
}
