//! Commands about jbake itself: the built-in recipes, shell completions, man pages.

use std::io::Write as _;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Subcommand};

use super::{Cli, Failure};
use crate::progress::Output;
use crate::shipped;

#[derive(Debug, Subcommand)]
pub enum RecipesCommand {
    /// List the built-in recipes (`jbake controller` and `jbake agent` bake them).
    List,
    /// Write the built-in recipes and their files into DIR (DIR/recipes, DIR/files), to edit
    /// them and bake with `--recipe DIR/recipes/controller.yaml`.
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The folder to write into (created if missing).
    pub dir: PathBuf,
    /// Overwrite files that differ from the built-in ones.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write jbake.1 and one page per command (jbake-build.1, …) into this folder instead of
    /// printing jbake.1.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

fn out_err(e: std::io::Error) -> Failure {
    Failure::Runtime(anyhow::anyhow!("cannot write to standard output: {e}"))
}

pub fn recipes_cmd(cmd: RecipesCommand, output: Output) -> Result<(), Failure> {
    match cmd {
        RecipesCommand::List => {
            let x = shipped::Extracted::new().map_err(|e| Failure::Runtime(e.into()))?;
            let mut rows = Vec::new();
            for (name, _) in shipped::recipes() {
                let path = x.recipe(name).map_err(|e| Failure::Runtime(e.into()))?;
                // Only what the file says: required variables may be missing here.
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let field = |key: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(key))
                        .map(|v| v.trim().to_string())
                        .unwrap_or_default()
                };
                rows.push((name, field("name:"), field("description:")));
            }
            let mut out = std::io::stdout().lock();
            match output {
                Output::Json => {
                    let list: Vec<serde_json::Value> = rows
                        .iter()
                        .map(|(file, name, d)| {
                            serde_json::json!({ "file": format!("recipes/{file}.yaml"), "name": name, "description": d })
                        })
                        .collect();
                    writeln!(out, "{}", serde_json::Value::Array(list)).map_err(out_err)?;
                }
                Output::Text => {
                    for (file, name, d) in &rows {
                        writeln!(
                            out,
                            "{:<28} {:<20} {d}",
                            format!("recipes/{file}.yaml"),
                            name
                        )
                        .map_err(out_err)?;
                    }
                }
            }
            Ok(())
        }
        RecipesCommand::Export(args) => {
            let written = shipped::export(&args.dir, args.force).map_err(|e| match e {
                shipped::Error::Exists { .. } => Failure::Input(e.into()),
                other => Failure::Runtime(other.into()),
            })?;
            let mut err = std::io::stderr().lock();
            let _ = writeln!(
                err,
                "wrote {} file(s) into {} (unchanged files left as they are); bake with --recipe {}",
                written.len(),
                args.dir.display(),
                args.dir.join("recipes/controller.yaml").display()
            );
            Ok(())
        }
    }
}

pub fn completions_cmd(args: CompletionsArgs) -> Result<(), Failure> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "jbake", &mut out);
    std::io::stdout().write_all(&out).map_err(out_err)
}

pub fn man_cmd(args: ManArgs) -> Result<(), Failure> {
    let cmd = Cli::command();
    match args.dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(out_err)?;
            std::io::stdout().write_all(&out).map_err(out_err)
        }
        Some(dir) => {
            let werr = |e: std::io::Error| {
                Failure::Runtime(anyhow::anyhow!(
                    "cannot write man pages into {}: {e}",
                    dir.display()
                ))
            };
            std::fs::create_dir_all(&dir).map_err(werr)?;
            clap_mangen::generate_to(cmd, &dir).map_err(werr)?;
            Ok(())
        }
    }
}
