//! `jbake validate` and bad input: every malformed recipe exits 2 with a located message, and
//! `jbake apply` with bad input makes no connection at all.

use std::net::TcpListener;
use std::path::PathBuf;

use crate::support::cli::{jbake, root, run, Run};

/// `(recipe, expected message substring, extra --var args)` for every fixture in bad/.
fn bad_cases() -> Vec<(PathBuf, String, Vec<String>)> {
    let dir = PathBuf::from("tests/fixtures/recipes/bad");
    let mut cases = Vec::new();
    for entry in std::fs::read_dir(root().join(&dir)).expect("read bad/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let expect = std::fs::read_to_string(path.with_extension("expect"))
            .unwrap_or_else(|_| panic!("{stem}.yaml has no .expect"));
        let args = std::fs::read_to_string(path.with_extension("args"))
            .map(|a| {
                a.lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        cases.push((
            dir.join(format!("{stem}.yaml")),
            expect.trim().to_string(),
            args,
        ));
    }
    cases.sort();
    cases
}

fn with_vars(base: &[&str], vars: &[String]) -> Vec<String> {
    let mut v: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    for kv in vars {
        v.push("--var".into());
        v.push(kv.clone());
    }
    v
}

#[test]
fn every_malformed_recipe_exits_2_with_a_located_message() {
    let cases = bad_cases();
    assert!(cases.len() >= 20, "only {} bad fixtures", cases.len());
    for (recipe, expect, vars) in &cases {
        let r = recipe.display().to_string();
        let args = with_vars(&["validate", &r], vars);
        let out = Run::from_output(jbake().args(&args).output().expect("run"));
        assert_eq!(out.code, 2, "{r}: exit {}\n{}", out.code, out.stderr);
        assert!(
            out.stderr.contains(expect.as_str()),
            "{r}: expected {expect:?} in:\n{}",
            out.stderr
        );
        assert!(out.stderr.starts_with("error: "), "{r}: {}", out.stderr);
    }
}

/// A listener that counts the connections it is offered, to prove none is made.
struct Tripwire(TcpListener);

impl Tripwire {
    fn new() -> Tripwire {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        Tripwire(l)
    }
    fn target(&self) -> String {
        format!(
            "nobody@127.0.0.1:{}",
            self.0.local_addr().map(|a| a.port()).unwrap_or(0)
        )
    }
    fn touched(&self) -> bool {
        self.0.accept().is_ok()
    }
}

#[test]
fn apply_with_bad_input_exits_2_before_connecting() {
    let wire = Tripwire::new();
    let target = wire.target();
    let key = root().join("tests/fixtures/recipes/good/minimal.yaml"); // any readable file
    let key = key.display().to_string();
    for (recipe, expect, vars) in bad_cases() {
        let r = recipe.display().to_string();
        let args = with_vars(
            &[
                "apply",
                &r,
                "--target",
                &target,
                "--identity",
                &key,
                "--insecure-ignore-host-key",
            ],
            &vars,
        );
        let out = Run::from_output(jbake().args(&args).output().expect("run"));
        assert_eq!(out.code, 2, "{r}: exit {}\n{}", out.code, out.stderr);
        assert!(out.stderr.contains(&expect), "{r}: {}", out.stderr);
    }
    let good = "tests/fixtures/recipes/good/hello.yaml";
    let flag_cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["apply", good, "--target", "no-at-sign", "--identity", &key],
            "is not USER@HOST",
        ),
        (
            vec!["apply", good, "--target", "u@h:99999", "--identity", &key],
            "is not a port number",
        ),
        (
            vec![
                "apply",
                good,
                "--target",
                &target,
                "--identity",
                "/nonexistent/key",
                "--insecure-ignore-host-key",
            ],
            "/nonexistent/key",
        ),
        (
            vec![
                "apply",
                good,
                "--target",
                &target,
                "--identity",
                &key,
                "--host-key",
                "ssh-ed25519 AAAAnotakey",
            ],
            "--host-key",
        ),
        (
            vec![
                "apply",
                good,
                "--target",
                &target,
                "--identity",
                &key,
                "--known-hosts",
                "/nonexistent/kh",
            ],
            "does not exist",
        ),
        (
            vec![
                "apply",
                good,
                "--target",
                &target,
                "--identity",
                &key,
                "--insecure-ignore-host-key",
                "--known-hosts",
                "/x",
            ],
            "cannot be used with",
        ),
        (
            vec![
                "apply",
                good,
                "--target",
                &target,
                "--identity",
                &key,
                "--insecure-ignore-host-key",
                "--region",
                "mars-1",
            ],
            "not an AWS region",
        ),
        (
            vec![
                "apply",
                good,
                "--target",
                &target,
                "--identity",
                &key,
                "--insecure-ignore-host-key",
                "--connect-timeout",
                "soon",
            ],
            "not a duration",
        ),
        (
            vec![
                "apply",
                good,
                "--target",
                &target,
                "--identity",
                &key,
                "--insecure-ignore-host-key",
                "--var",
                "novalue",
            ],
            "novalue",
        ),
        (
            vec![
                "apply",
                good,
                "--target",
                &target,
                "--identity",
                &key,
                "--insecure-ignore-host-key",
                "--bogus",
            ],
            "unexpected argument '--bogus'",
        ),
        (
            vec![
                "apply",
                "tests/fixtures/recipes/none.yaml",
                "--target",
                &target,
                "--identity",
                &key,
                "--insecure-ignore-host-key",
            ],
            "none.yaml",
        ),
    ];
    for (args, expect) in flag_cases {
        let out = run(&args);
        assert_eq!(out.code, 2, "{args:?}: exit {}\n{}", out.code, out.stderr);
        assert!(
            out.stderr.contains(expect),
            "{args:?}: expected {expect:?} in\n{}",
            out.stderr
        );
    }
    assert!(
        !wire.touched(),
        "bad input must be caught before any connection is made"
    );
}

#[test]
fn apply_refuses_builtins_only_known_in_the_cloud() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = crate::support::cli::write(
        dir.path(),
        "r.yaml",
        "version: 1\nname: r\nbase: { ami: ami-0123456789abcdef0, ssh_user: admin }\n\
         steps:\n  - name: echo\n    run: echo {{ base_ami }}\n",
    );
    let wire = Tripwire::new();
    let out = run(&[
        "apply",
        &recipe.display().to_string(),
        "--target",
        &wire.target(),
        "--identity",
        &recipe.display().to_string(),
        "--insecure-ignore-host-key",
    ]);
    out.assert_code(2);
    assert!(out.stderr.contains("{{ base_ami }}"), "{}", out.stderr);
    assert!(!wire.touched());
}

#[test]
fn validate_prints_the_plan() {
    let out = run(&[
        "validate",
        "tests/fixtures/recipes/good/full.yaml",
        "--var",
        "efs_id=fs-0123456789abcdef0",
        "--region",
        "eu-west-1",
    ]);
    out.assert_code(0);
    assert!(out
        .stdout
        .contains("fs-0123456789abcdef0.efs.eu-west-1.amazonaws.com:/ /var/lib/jenkins"));
    assert!(
        out.stdout.contains("<<base_ami>>"),
        "placeholders are marked:\n{}",
        out.stdout
    );
    let json = run(&[
        "validate",
        "tests/fixtures/recipes/good/full.yaml",
        "--var",
        "efs_id=fs-0123456789abcdef0",
        "--output",
        "json",
    ]);
    json.assert_code(0);
    let plan: serde_json::Value = serde_json::from_str(&json.stdout).expect("plan is JSON");
    assert_eq!(plan["name"], "jenkins-controller");
    assert!(plan["steps"].as_array().is_some_and(|s| s.len() >= 5));
}

#[test]
fn validate_never_prints_secret_values() {
    let out = run(&[
        "validate",
        "tests/fixtures/recipes/good/full.yaml",
        "--var",
        "efs_id=fs-0123456789abcdef0",
        "--var",
        "admin_token=s3cr3t-t0ken-value",
    ]);
    out.assert_code(0);
    assert!(!out.stdout.contains("s3cr3t-t0ken-value"), "{}", out.stdout);
    assert!(!out.stderr.contains("s3cr3t-t0ken-value"));
    let json = run(&[
        "validate",
        "tests/fixtures/recipes/good/full.yaml",
        "--var",
        "efs_id=fs-0123456789abcdef0",
        "--var",
        "admin_token=s3cr3t-t0ken-value",
        "--output",
        "json",
    ]);
    json.assert_code(0);
    assert!(
        !json.stdout.contains("s3cr3t-t0ken-value"),
        "{}",
        json.stdout
    );
}

#[test]
fn help_texts() {
    let top = run(&["--help"]);
    top.assert_code(0);
    insta::assert_snapshot!("help", top.stdout);
    let apply = run(&["apply", "--help"]);
    apply.assert_code(0);
    insta::assert_snapshot!("apply_help", apply.stdout);
}
