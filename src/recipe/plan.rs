//! The rendered, validated form of a recipe: what the executor runs and `jbake validate` prints.
//!
//! Everything here is plain data. Every template has been rendered, every include expanded, every
//! upload source resolved to a local path. Nothing here needs the network.

use std::path::PathBuf;
use std::time::Duration;

/// Where something was written in a recipe file (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// How the base image of a build is chosen (used by `jbake build`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseImage {
    SsmParameter(String),
    Ami(String),
    Filter {
        name: String,
        owners: Vec<String>,
        most_recent: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Base {
    pub image: BaseImage,
    pub ssh_user: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Instance {
    pub instance_type: String,
    pub volume_gb: u32,
}

/// Where a variable's value came from, lowest precedence first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VarSource {
    /// The recipe's `default:`.
    Default,
    /// An image's tag (`jbake test` of an existing image).
    Image,
    /// A `--var-file`.
    File(PathBuf),
    /// A `--var k=v` on the command line.
    CommandLine,
    /// A jbake built-in (`region`, `build_id`, `version`, `base_ami`, ...).
    Builtin,
    /// A built-in that is only known in the cloud; the value is a clearly marked placeholder.
    Placeholder,
    /// Declared optional without a default and not given: no value (`value` is empty); a
    /// template that uses it is an error.
    Unset,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ResolvedVar {
    pub name: String,
    /// Never print this when `secret` is true: use [`ResolvedVar::display_value`].
    #[serde(skip)]
    pub value: String,
    pub secret: bool,
    pub source: VarSource,
    pub description: Option<String>,
}

impl ResolvedVar {
    pub fn display_value(&self) -> &str {
        if self.secret {
            "<secret>"
        } else {
            &self.value
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Steps,
    Validate,
    /// The boot test: checks on an instance booted from the image.
    Test,
}

/// Ownership and permissions of a file written by `upload` or `file`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct FileAttrs {
    /// e.g. 0o644; `None` keeps the default (0644 for new files, existing mode otherwise).
    pub mode: Option<u32>,
    pub owner: Option<String>,
    pub group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A shell script run with `sh -c` (as root unless `user` is set).
    Run { script: String },
    /// Ensure `line` is present exactly once in `path`; replace lines matching `regexp` if given.
    Line {
        path: String,
        line: String,
        regexp: Option<String>,
        attrs: FileAttrs,
    },
    /// Copy a local file or directory (recursively) to `dest`.
    Upload {
        src: PathBuf,
        dest: String,
        /// `Some` when `template: true`: the rendered bytes replace the file's content
        /// (only for single files).
        rendered: Option<Vec<u8>>,
        attrs: FileAttrs,
    },
    /// Write `content` to `path`.
    File {
        path: String,
        content: String,
        attrs: FileAttrs,
    },
    /// Reboot the machine, wait for it to come back, reconnect, continue.
    Reboot { timeout: Duration },
}

impl Action {
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Run { .. } => "run",
            Action::Line { .. } => "line",
            Action::Upload { .. } => "upload",
            Action::File { .. } => "file",
            Action::Reboot { .. } => "reboot",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Step {
    /// 1-based position in its phase, after includes are expanded.
    pub number: usize,
    pub phase: Phase,
    pub name: String,
    /// Where the step is written (the `- name:` item), possibly in an included file.
    pub origin: Origin,
    pub action: Action,
    /// Run as this user instead of root.
    pub user: Option<String>,
    pub env: Vec<(String, String)>,
    /// Extra attempts after the first failure (0 = run once).
    pub retries: u32,
    pub delay: Duration,
    pub timeout: Option<Duration>,
    /// The `when:` expression as written and what it evaluated to; a false one skips the step.
    pub when: Option<(String, bool)>,
    /// Skip the step when this remote path exists.
    pub creates: Option<String>,
}

/// A `facts:` entry: the tag key, the command (rendered), where it is written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Fact {
    pub key: String,
    pub script: String,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    pub schema_version: u32,
    pub name: String,
    pub description: Option<String>,
    pub file: PathBuf,
    pub base: Base,
    pub instance: Instance,
    /// All variables, built-ins included, sorted by name.
    pub vars: Vec<ResolvedVar>,
    /// The recipe's `tags:`, rendered, sorted by key: put on the image and its snapshots.
    pub tags: Vec<(String, String)>,
    /// The recipe's `facts:`, rendered like `run:` scripts, in the order written: each runs as
    /// root after the checks, and its output becomes the tag of that key on the image.
    pub facts: Vec<Fact>,
    pub steps: Vec<Step>,
    pub validate: Vec<Step>,
    /// `test:`: run by the boot test on a fresh instance of the image, never on the build
    /// machine.
    pub test: Vec<Step>,
}

impl Plan {
    /// What must never be shown, for masking output: the values of secret variables in every
    /// form they can be printed in (each line of a multi-line value, JSON- and shell-escaped:
    /// [`crate::util::secret_forms`]), longest first.
    pub fn secrets(&self) -> Vec<String> {
        let values: Vec<String> = self
            .vars
            .iter()
            .filter(|v| v.secret && !v.value.is_empty())
            .map(|v| v.value.clone())
            .collect();
        crate::util::secret_forms(&values)
    }

    /// Steps then validate, in the order they run on the build machine (not `test`).
    pub fn all_steps(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().chain(self.validate.iter())
    }
}
