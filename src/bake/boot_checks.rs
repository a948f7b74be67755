//! The boot test's own checks, run on every test instance before the recipe's `test:` checks:
//! what image hygiene promises, seen on a machine booted from the image. They compare the
//! instance with the build's one-time identities: known to the bake itself, and written on the
//! image at creation (`jbake:build-*` tags) for `jbake test` of an existing image.
//!
//! - a machine id of its own: a machine id, not the build instance's (hygiene empties the file
//!   so that systemd, or the container manager, makes one at first boot);
//! - host keys of its own: some host key, none the build instance's one-time key;
//! - no build key authorized: the build's one-time login key is in no `authorized_keys` of any
//!   user, nor in `/etc/ssh/authorized_keys/` (the agents' folder).
//!
//! Pure: scripts in, scripts out (unit-tested here; run on real images by the instance tier).

use std::time::Duration;

use russh::keys::ssh_key::HashAlg;
use russh::keys::PublicKey;
use sha2::{Digest, Sha256};

use crate::aws::ec2::ImageInfo;
use crate::recipe::{Phase, Step};
use crate::util::shell_quote;

use super::stages::machine::internal_step;
use super::tags;

/// What the test knows about the build that made the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildIdentity {
    /// The build's id: its one-time keys are named after it.
    pub build_id: String,
    /// The build instance's host key fingerprint (`SHA256:…`).
    pub host_key: Option<String>,
    /// The build's login key fingerprint (`SHA256:…`).
    pub login_key: Option<String>,
    /// `sha256:` and the SHA-256 of the build instance's machine id (the file's content).
    pub machine_id: Option<String>,
}

impl BuildIdentity {
    /// As the image's tags say (an image baked before boot tests has only its build id).
    pub fn of_image(image: &ImageInfo) -> BuildIdentity {
        let tag = |k| image.tag(k).map(str::to_string);
        BuildIdentity {
            build_id: image.tag(tags::BUILD_ID).unwrap_or_default().to_string(),
            host_key: tag(tags::BUILD_HOST_KEY),
            login_key: tag(tags::BUILD_KEY),
            machine_id: tag(tags::BUILD_MACHINE_ID),
        }
    }

    /// The tags that put it on the image at creation.
    pub fn tags(&self) -> Vec<(String, String)> {
        [
            (tags::BUILD_HOST_KEY, &self.host_key),
            (tags::BUILD_KEY, &self.login_key),
            (tags::BUILD_MACHINE_ID, &self.machine_id),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
        .collect()
    }
}

/// `SHA256:…`, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// How a machine id is kept on the image: `sha256:` and the SHA-256 of the file's content (the
/// id and a newline), never the id itself.
pub fn machine_id_hash(id: &str) -> String {
    format!("sha256:{:x}", Sha256::digest(format!("{id}\n").as_bytes()))
}

/// Values in the scripts are fingerprints, hashes and build ids; quoted anyway, as they come
/// from tags anyone who may tag can write.
fn q(s: &str) -> String {
    shell_quote(s)
}

fn check(number: usize, name: &str, script: String) -> Step {
    Step {
        number,
        phase: Phase::Test,
        timeout: Some(Duration::from_secs(120)),
        ..internal_step(name, script)
    }
}

fn machine_id_script(known: &BuildIdentity) -> String {
    let mut s = String::from(
        r#"id=$(cat /etc/machine-id 2>/dev/null || true)
if ! printf '%s\n' "$id" | grep -Eqx '[0-9a-f]{32}'; then
  echo "/etc/machine-id is '$id', not a machine id: none was made at first boot" >&2
  exit 1
fi
"#,
    );
    if let Some(hash) = &known.machine_id {
        s.push_str(&format!(
            r#"if [ "sha256:$(printf '%s\n' "$id" | sha256sum | cut -d' ' -f1)" = {} ]; then
  echo "/etc/machine-id is the build instance's: the image carries it, so every instance launched from it has the same (an empty /etc/machine-id on the image makes each one its own)" >&2
  exit 1
fi
"#,
            q(hash)
        ));
    }
    s.push_str("echo \"a machine id of its own\"\n");
    s
}

fn host_keys_script(known: &BuildIdentity) -> String {
    let build_fp = known.host_key.as_deref().unwrap_or("");
    format!(
        r#"build_fp={fp} build_name={name}
found=0
for f in /etc/ssh/ssh_host_*_key.pub; do
  [ -f "$f" ] || continue
  found=$((found+1))
  fp=$(ssh-keygen -lf "$f" | cut -d' ' -f2)
  if [ -n "$build_fp" ] && [ "$fp" = "$build_fp" ]; then
    echo "$f is the build instance's host key ($fp): the image carries it, and every instance launched from it would answer with it" >&2
    exit 1
  fi
  if awk -v n="$build_name" '$3 == n {{ f = 1 }} END {{ exit !f }}' "$f"; then
    echo "$f is the build's one-time host key ($build_name): the image carries it" >&2
    exit 1
  fi
  echo "$f: $fp"
done
if [ "$found" = 0 ]; then
  echo "no host key in /etc/ssh: sshd cannot answer on an instance of the image" >&2
  exit 1
fi
"#,
        fp = q(build_fp),
        name = q(&format!("jbake-host-{}", known.build_id)),
    )
}

fn login_keys_script(known: &BuildIdentity) -> String {
    let build_fp = known.login_key.as_deref().unwrap_or("");
    format!(
        r#"build_fp={fp} build_name={name}
bad=0
files=$(getent passwd | cut -d: -f6 | sort -u | while IFS= read -r h; do
  for f in "$h/.ssh/authorized_keys" "$h/.ssh/authorized_keys2"; do
    if [ -n "$h" ] && [ -f "$f" ]; then echo "$f"; fi
  done
done
for f in /etc/ssh/authorized_keys/*; do if [ -f "$f" ]; then echo "$f"; fi; done)
for f in $files; do
  while IFS= read -r line; do
    case $line in ''|'#'*) continue ;; esac
    fp=$(printf '%s\n' "$line" | ssh-keygen -lf - 2>/dev/null | cut -d' ' -f2) || fp=
    if [ -n "$build_fp" ] && [ "$fp" = "$build_fp" ]; then
      echo "$f authorizes the build's login key ($fp)" >&2
      bad=1
    fi
    case $line in
      *" $build_name") echo "$f authorizes a key named $build_name (the build's login key)" >&2; bad=1 ;;
    esac
  done < "$f"
done
[ "$bad" = 0 ] || exit 1
echo "checked: $(echo $files)"
"#,
        fp = q(build_fp),
        name = q(&format!("jbake-{}", known.build_id)),
    )
}

/// jbake's own checks, numbered from 1 (the recipe's follow).
pub fn checks(known: &BuildIdentity) -> Vec<Step> {
    vec![
        check(1, "a machine id of its own", machine_id_script(known)),
        check(2, "host keys of its own", host_keys_script(known)),
        check(3, "no build key is authorized", login_keys_script(known)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::Action;

    fn script(s: &Step) -> &str {
        match &s.action {
            Action::Run { script } => script,
            _ => "",
        }
    }

    #[test]
    fn the_checks_compare_with_what_is_known_of_the_build() {
        let known = BuildIdentity {
            build_id: "20261130-120000-abcdef".into(),
            host_key: Some("SHA256:hostfp".into()),
            login_key: Some("SHA256:loginfp".into()),
            machine_id: Some(machine_id_hash("0123456789abcdef0123456789abcdef")),
        };
        let c = checks(&known);
        assert_eq!(c.len(), 3);
        assert!(c.iter().all(|s| s.phase == Phase::Test));
        assert!(script(&c[0]).contains(&known.machine_id.clone().unwrap_or_default()));
        assert!(script(&c[1]).contains("build_fp=SHA256:hostfp"));
        assert!(script(&c[1]).contains("build_name=jbake-host-20261130-120000-abcdef"));
        assert!(script(&c[2]).contains("build_fp=SHA256:loginfp"));
        assert!(script(&c[2]).contains("build_name=jbake-20261130-120000-abcdef"));
        assert!(script(&c[2]).contains("/etc/ssh/authorized_keys/*"));
        // Unknown (an image baked before boot tests): the comparisons by value go.
        let bare = checks(&BuildIdentity {
            build_id: "20261130-120000-abcdef".into(),
            ..BuildIdentity::default()
        });
        assert!(!script(&bare[0]).contains("sha256:"));
        assert!(script(&bare[1]).contains("build_fp=''"));
    }

    #[test]
    fn tag_values_cannot_become_commands() {
        let known = BuildIdentity {
            build_id: "x".into(),
            host_key: Some("'; rm -rf / #".into()),
            ..BuildIdentity::default()
        };
        let s = host_keys_script(&known);
        assert!(s.contains(r#"build_fp=''\''; rm -rf / #'"#), "{s}");
    }

    #[test]
    fn identity_round_trips_through_tags() {
        let known = BuildIdentity {
            build_id: "b".into(),
            host_key: Some("SHA256:h".into()),
            login_key: None,
            machine_id: Some("sha256:00".into()),
        };
        let mut tags = known.tags();
        tags.push((tags::BUILD_ID.into(), "b".into()));
        let image = ImageInfo {
            id: "ami-1".into(),
            name: "r-1".into(),
            state: "available".into(),
            creation_date: String::new(),
            root_device: None,
            snapshots: vec![],
            tags,
        };
        assert_eq!(BuildIdentity::of_image(&image), known);
        // What `printf '%s\n' "$id" | sha256sum` prints on the machine.
        assert_eq!(
            machine_id_hash("0123456789abcdef0123456789abcdef"),
            "sha256:6ed6653dba3d6aee8110c6e23de37f15c609b8a6e29aa164d1acace604e5cb7e"
        );
    }
}
