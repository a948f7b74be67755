//! `jbake apply` on the instance tier: a real Debian bookworm booted with systemd-nspawn.
//! The demo recipe installs Java with apt (through the harness's proxy), enables a systemd unit
//! and reboots; validate proves the unit came back.

use crate::support::cli::{jbake, Run};
use crate::support::instance::Instance;
use crate::support::prereq;

#[test]
fn demo_recipe_installs_java_enables_a_unit_and_survives_a_reboot() {
    if !prereq::instance_tier() {
        return;
    }
    let vm = Instance::builder("apply-demo").up();
    let boot_before = vm.exec_ok("cat /proc/sys/kernel/random/boot_id");
    let run = |extra: &[&str]| {
        Run::from_output(
            jbake()
                .args(["apply", "recipes/demo.yaml", "--target", &vm.target()])
                .args(["--identity", &vm.identity.display().to_string()])
                .args(["--host-key", &vm.host_key, "--output", "json"])
                .args(extra)
                .output()
                .expect("run jbake"),
        )
    };
    let out = run(&[]);
    out.assert_code(0);
    let statuses: Vec<String> = out.statuses().into_iter().map(|(_, s)| s).collect();
    assert_eq!(
        statuses,
        ["changed", "changed", "changed", "changed", "changed", "changed", "ok", "ok"],
        "{}",
        out.stdout
    );

    // Java really is installed, the unit is enabled and active after the reboot.
    let java = vm.exec_ok("java -version 2>&1");
    assert!(java.contains("version \"17"), "{java}");
    assert_eq!(
        vm.exec_ok("systemctl is-enabled jbake-demo.service").trim(),
        "enabled"
    );
    assert_eq!(
        vm.exec_ok("systemctl is-active jbake-demo.service").trim(),
        "active"
    );
    let boot_after = vm.exec_ok("cat /proc/sys/kernel/random/boot_id");
    assert_ne!(
        boot_before.trim(),
        boot_after.trim(),
        "the reboot step really rebooted"
    );
    let motd = vm.exec_ok("cat /etc/motd");
    assert_eq!(motd.matches("jbake-demo ").count(), 1, "{motd}");

    // A second run changes nothing that is already right: Java is skipped (creates:), the
    // greeting and the unit file are "ok"; the motd line names the new run's build id, so it is
    // replaced, not added.
    let again = run(&[]);
    again.assert_code(0);
    let statuses: Vec<String> = again.statuses().into_iter().map(|(_, s)| s).collect();
    assert_eq!(statuses[0], "skipped");
    assert_eq!(statuses[1], "ok");
    assert_eq!(statuses[2], "ok");
    assert_eq!(statuses[4], "changed", "{}", again.stdout);
    let motd = vm.exec_ok("cat /etc/motd");
    assert_eq!(motd.matches("jbake-demo ").count(), 1, "{motd}");
}
