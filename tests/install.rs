//! An installed jbake (the binary alone, no checkout around it) bakes the shipped images from
//! any folder, exports its recipes to customise, and generates completions and man pages.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::support::cli::{jbake_bin, Run};

/// The binary copied alone into `dir/bin`, run from the empty folder `dir/cwd` with an empty
/// HOME and its own TMPDIR: nothing of the checkout is reachable.
fn installed(dir: &Path) -> Command {
    let bin = dir.join("bin");
    let cwd = dir.join("cwd");
    let tmp = dir.join("tmp");
    for d in [&bin, &cwd, &tmp] {
        std::fs::create_dir_all(d).unwrap();
    }
    let exe = bin.join("jbake");
    if !exe.exists() {
        std::fs::copy(jbake_bin(), &exe).unwrap();
    }
    let mut c = Command::new(&exe);
    c.current_dir(&cwd)
        .env("HOME", &cwd)
        .env("TMPDIR", &tmp)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        // Nothing listens here: a call that should not be made fails loudly, not slowly.
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(std::process::Stdio::null());
    for var in ["JBAKE_OUTPUT", "JBAKE_QUIET", "JBAKE_LOG", "AWS_PROFILE"] {
        c.env_remove(var);
    }
    c
}

fn run(mut c: Command, args: &[&str]) -> Run {
    Run::from_output(c.args(args).output().expect("run the installed jbake"))
}

#[test]
fn an_installed_jbake_uses_its_built_in_recipes_from_any_folder() {
    let d = tempfile::tempdir().unwrap();
    // Bad input for the built-in recipe: exit 2 before any AWS call, the error located in the
    // built-in recipe (named as such, not as a temporary path), nothing left in TMPDIR.
    let r = run(
        installed(d.path()),
        &[
            "controller",
            "--efs-id",
            "fs-0123456789abcdef0",
            "--var",
            "jenkins_port=80; rm -rf /",
        ],
    );
    r.assert_code(2);
    assert!(
        r.stderr
            .contains("error: <built-in>/recipes/controller.yaml:"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("jenkins_port"), "{}", r.stderr);
    let agent = run(installed(d.path()), &["agent", "--var", "nope=1"]);
    agent.assert_code(2);
    assert!(
        agent.stderr.contains("<built-in>/recipes/agent.yaml"),
        "{}",
        agent.stderr
    );
    let left: Vec<_> = std::fs::read_dir(d.path().join("tmp")).unwrap().collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");

    // The list, and an export that validates from where it was written.
    let list = run(installed(d.path()), &["recipes", "list"]);
    list.assert_code(0);
    for name in ["jenkins-controller", "jenkins-agent"] {
        assert!(list.stdout.contains(name), "{}", list.stdout);
    }
    let out = d.path().join("mine");
    run(
        installed(d.path()),
        &["recipes", "export", out.to_str().unwrap()],
    )
    .assert_code(0);
    let ssm_get = out.join("files/jbake-ssm-get");
    let mode = std::fs::metadata(&ssm_get).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "{}", ssm_get.display());
    let controller = out.join("recipes/controller.yaml");
    run(
        installed(d.path()),
        &[
            "validate",
            controller.to_str().unwrap(),
            "--var",
            "efs_id=fs-0123456789abcdef0",
        ],
    )
    .assert_code(0);
    // A customised recipe is never overwritten silently.
    std::fs::write(&controller, "# mine\n").unwrap();
    let again = run(
        installed(d.path()),
        &["recipes", "export", out.to_str().unwrap()],
    );
    again.assert_code(2);
    assert!(again.stderr.contains("--force"), "{}", again.stderr);
    assert_eq!(std::fs::read_to_string(&controller).unwrap(), "# mine\n");
}

#[test]
fn completions_and_man_pages_are_generated_from_the_command_line_definition() {
    let d = tempfile::tempdir().unwrap();
    let bash = run(installed(d.path()), &["completions", "bash"]);
    bash.assert_code(0);
    let script = d.path().join("jbake.bash");
    std::fs::write(&script, &bash.stdout).unwrap();
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        syntax.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    for word in ["controller", "roll", "--efs-id"] {
        assert!(
            bash.stdout.contains(word),
            "no {word} in the bash completion"
        );
    }
    for shell in ["zsh", "fish"] {
        let r = run(installed(d.path()), &["completions", shell]);
        r.assert_code(0);
        assert!(r.stdout.contains("controller"), "{shell}");
    }
    let man = run(installed(d.path()), &["man"]);
    man.assert_code(0);
    assert!(man.stdout.contains(".TH jbake 1"), "{}", man.stdout);
    let pages = d.path().join("man");
    run(
        installed(d.path()),
        &["man", "--dir", pages.to_str().unwrap()],
    )
    .assert_code(0);
    for page in [
        "jbake.1",
        "jbake-controller.1",
        "jbake-roll.1",
        "jbake-recipes-export.1",
    ] {
        let text =
            std::fs::read_to_string(pages.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}");
    }
}
