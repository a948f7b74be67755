//! What the build instance is told at launch (cloud-config user-data) and what is scrubbed from
//! it before the snapshot (image hygiene).

use base64::Engine;
use russh::keys::ssh_key::LineEnding;
use russh::keys::PrivateKey;

use crate::util::shell_quote;

/// Cloud-config that (a) installs a one-time SSH host key that jbake generated, so the first
/// connection verifies the host key strictly, and (b) schedules a watchdog shutdown after `ttl`
/// (with shutdown behaviour "terminate", even a jbake killed with SIGKILL cannot leave the
/// instance running past it). `bootcmd` runs at every boot, so a `reboot` step re-arms it.
pub fn user_data(
    host_key: &PrivateKey,
    ttl_minutes: u64,
) -> Result<String, russh::keys::ssh_key::Error> {
    let private = host_key.to_openssh(LineEnding::LF)?;
    let public = host_key.public_key().to_openssh()?;
    let mut private_block = String::new();
    for line in private.lines() {
        private_block.push_str("    ");
        private_block.push_str(line);
        private_block.push('\n');
    }
    let text = format!(
        "#cloud-config\n\
         ssh_deletekeys: true\n\
         ssh_genkeytypes: []\n\
         ssh_keys:\n  ed25519_private: |\n{private_block}  ed25519_public: {public}\n\
         bootcmd:\n  - [sh, -c, \"shutdown -h +{ttl_minutes} 'jbake: build TTL expired' || true\"]\n"
    );
    Ok(base64::engine::general_purpose::STANDARD.encode(text))
}

/// The image hygiene script, run as root as the last thing on the instance: the image must not
/// carry the build's access. `client_key_b64` is the base64 part of the temporary public key,
/// `host_key_b64` that of the one-time host key jbake gave the instance in its user data: the
/// script scrubs a machine only if its sshd's own ed25519 host key is that one (a machine
/// reached by mistake — a test's sshd on the developer's machine, a wrong `--ssh-host` behind
/// a tunnel presenting the right key — is refused, not wiped).
pub fn hygiene_script(client_key_b64: &str, host_key_b64: &str) -> String {
    let key = shell_quote(client_key_b64);
    let host = shell_quote(host_key_b64);
    format!(
        r#"set -e
# Only the instance jbake launched: cloud-init wrote the user data's host key here.
if ! grep -qF {host} /etc/ssh/ssh_host_ed25519_key.pub 2>/dev/null; then
  echo "refusing to scrub this machine: /etc/ssh/ssh_host_ed25519_key.pub is not the one-time host key jbake gave the instance it launched (is SSH reaching another machine, e.g. through --ssh-host?)" >&2
  exit 3
fi
# The build's temporary login key, wherever cloud-init put it.
for f in /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys; do
  [ -f "$f" ] || continue
  grep -vF {key} "$f" > "$f.jbake" || true
  cat "$f.jbake" > "$f"; rm -f "$f.jbake"
done
# The one-time host keys: every instance launched from the image makes its own. The drop-in
# makes sshd generate missing keys even on an image without cloud-init.
rm -f /etc/ssh/ssh_host_*
if [ -d /etc/systemd/system ]; then
  mkdir -p /etc/systemd/system/ssh.service.d
  printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' > /etc/systemd/system/ssh.service.d/jbake-host-keys.conf
fi
# The TTL watchdog of this build.
shutdown -c >/dev/null 2>&1 || true
# cloud-init's per-instance state (user-data, the key, the watchdog's bootcmd).
if command -v cloud-init >/dev/null 2>&1; then cloud-init clean --logs --seed >/dev/null 2>&1 || cloud-init clean --logs; fi
rm -rf /var/lib/cloud/instances /var/lib/cloud/instance /var/lib/cloud/data/* 2>/dev/null || true
# Identity of this machine: systemd makes a new one at first boot.
if [ -e /etc/machine-id ]; then : > /etc/machine-id; fi
rm -f /var/lib/dbus/machine-id
# The build's journal: instances from the image start their own (journald keeps writing to
# the removed files until it stops; nothing of it is on the disk that is snapshotted).
if command -v journalctl >/dev/null 2>&1; then
  journalctl --rotate >/dev/null 2>&1 || true
  journalctl --vacuum-time=1s >/dev/null 2>&1 || true
fi
rm -rf /var/log/journal/* /run/log/journal/* 2>/dev/null || true
# The random seed, which every instance from the image would share. Stopping the service saves
# a seed, so it is stopped first; stopped, it saves none at shutdown.
systemctl stop systemd-random-seed.service >/dev/null 2>&1 || true
rm -f /var/lib/systemd/random-seed
# DHCP leases of the build's network.
for d in /var/lib/dhcp /var/lib/dhclient /var/lib/NetworkManager /var/lib/dhcpcd /var/lib/dhcpcd5 /var/lib/systemd/network; do
  [ -d "$d" ] && find "$d" -maxdepth 1 -type f -name '*lease*' -delete 2>/dev/null || true
done
# Shell history, caches and temporary files (but not the folder this script runs from).
rm -f /root/.bash_history /home/*/.bash_history /root/.lesshst /root/.viminfo
if command -v apt-get >/dev/null 2>&1; then apt-get clean; fi
find /tmp /var/tmp -mindepth 1 -maxdepth 1 ! -path "$JBAKE_TMP" -exec rm -rf {{}} + 2>/dev/null || true
sync
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PrivateKey {
        russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[7u8; 32]).into()
    }

    #[test]
    fn user_data_is_cloud_config_with_the_host_key_and_watchdog() {
        let b64 = user_data(&key(), 120).unwrap_or_default();
        let text = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_default(),
        )
        .unwrap_or_default();
        assert!(text.starts_with("#cloud-config\n"));
        assert!(text.contains("  ed25519_private: |\n    -----BEGIN OPENSSH PRIVATE KEY-----\n"));
        assert!(text.contains("  ed25519_public: ssh-ed25519 AAAA"));
        assert!(text.contains("shutdown -h +120"));
    }

    #[test]
    fn hygiene_removes_the_build_key_only() {
        let s = hygiene_script(
            "AAAAC3NzaC1lZDI1NTE5AAAAIJdD",
            "AAAAC3NzaC1lZDI1NTE5AAAAHost",
        );
        assert!(
            s.starts_with("set -e\n# Only the instance jbake launched")
                && s.contains(
                    "grep -qF AAAAC3NzaC1lZDI1NTE5AAAAHost /etc/ssh/ssh_host_ed25519_key.pub"
                ),
            "{s}"
        );
        assert!(s.contains("grep -vF AAAAC3NzaC1lZDI1NTE5AAAAIJdD"));
        assert!(s.contains("rm -f /etc/ssh/ssh_host_*"));
        assert!(s.contains("! -path \"$JBAKE_TMP\""));
        for gone in [
            "/var/log/journal/*",
            "/var/lib/systemd/random-seed",
            "*lease*",
        ] {
            assert!(s.contains(gone), "{gone}");
        }
    }
}
