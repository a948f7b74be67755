//! Runs the real `jbake` binary, like a user would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The jbake binary: the one cargo built for the tests (`CARGO_BIN_EXE_jbake`, known when
/// the integration tests are compiled); for an example (`examples/sandbox.rs`), which cargo
/// does not tell, `JBAKE_BIN`, else `jbake` next to the example's folder
/// (`target/debug/examples/sandbox` → `target/debug/jbake`).
pub fn jbake_bin() -> PathBuf {
    if let Some(built) = option_env!("CARGO_BIN_EXE_jbake") {
        return PathBuf::from(built);
    }
    if let Some(bin) = std::env::var_os("JBAKE_BIN") {
        return PathBuf::from(bin);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("jbake")))
        .filter(|bin| bin.is_file())
        .unwrap_or_else(|| {
            panic!("no jbake binary next to this program: build it (cargo build --bin jbake) or set JBAKE_BIN")
        })
}

/// The built binary under test.
pub fn jbake() -> Command {
    let mut c = super::command(jbake_bin());
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c.stdin(Stdio::null());
    // Tests must not pick up the developer's environment.
    for var in [
        "AWS_REGION",
        "JBAKE_OUTPUT",
        "JBAKE_QUIET",
        "JBAKE_IDENTITY",
        "JBAKE_LOG",
    ] {
        c.env_remove(var);
    }
    c
}

/// A finished run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The JSON events printed with `--output json`.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l}: {e}")))
            .collect()
    }

    /// The `status` of each finished step, in order, as `(number, status)`.
    pub fn statuses(&self) -> Vec<(u64, String)> {
        self.events()
            .iter()
            .filter(|e| e["event"] == "step_finished")
            .map(|e| {
                (
                    e["number"].as_u64().unwrap_or(0),
                    e["status"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code, code,
            "expected exit {code}, got {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

pub fn run(args: &[&str]) -> Run {
    Run::from_output(jbake().args(args).output().expect("run jbake"))
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("create folder");
    }
    std::fs::write(&p, text).expect("write file");
    p
}
