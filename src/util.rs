//! Small helpers shared by several modules.

use std::time::Duration;

/// `1.2s`, `340ms`, `2m05s`, `1h02m`: short, human durations for progress and errors.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else if ms < 3_600_000 {
        let s = d.as_secs();
        format!("{}m{:02}s", s / 60, s % 60)
    } else if ms < 86_400_000 {
        let m = d.as_secs() / 60;
        format!("{}h{:02}m", m / 60, m % 60)
    } else {
        let h = d.as_secs() / 3600;
        format!("{}d{:02}h", h / 24, h % 24)
    }
}

/// Quotes a string for a POSIX shell: `'it'\''s'`. A word of only `[A-Za-z0-9_./:,+@%-]` is
/// left as it is (no `=`: a bare `A=b` in command position would be an assignment).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Replaces every occurrence of each secret with `****`. `secrets` should come from
/// [`secret_forms`] (as [`crate::recipe::Plan::secrets`] does), so that a secret is found in
/// every form it is printed in.
pub fn mask(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if !s.is_empty() && out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "****");
        }
    }
    out
}

/// Masks every string (and key) of a JSON value in place, before it is serialised: after
/// serialisation a secret with a quote, a backslash or a newline is escaped and no longer
/// found as written.
pub fn mask_json(value: &mut serde_json::Value, secrets: &[String]) {
    use serde_json::Value;
    match value {
        Value::String(s) => {
            if secrets.iter().any(|x| s.contains(x.as_str())) {
                *s = mask(s, secrets);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| mask_json(v, secrets)),
        Value::Object(map) => {
            let masked: serde_json::Map<String, Value> = std::mem::take(map)
                .into_iter()
                .map(|(k, mut v)| {
                    mask_json(&mut v, secrets);
                    (mask(&k, secrets), v)
                })
                .collect();
            *map = masked;
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// A line of a multi-line secret is masked on its own when it is at least this long (output
/// is shown line by line, so a PEM key is never seen whole); shorter lines would mask common
/// text and tell little.
const MIN_SECRET_LINE: usize = 4;

/// Every form in which a secret value may be printed, longest first: the value; each line of
/// a multi-line value (a PEM key's lines are printed one by one); the value escaped as in JSON
/// and in Rust's `Debug`; quoted for the shell (how a `run:` script carries it). Masking all of
/// them finds the secret in step output, JSON events, rendered scripts and debug logs.
pub fn secret_forms(values: &[String]) -> Vec<String> {
    let mut forms: Vec<String> = Vec::new();
    let add = |f: &str, forms: &mut Vec<String>| {
        if !f.is_empty() && !forms.iter().any(|x| x == f) {
            forms.push(f.to_string());
        }
    };
    let inner = |quoted: String| {
        quoted
            .get(1..quoted.len().saturating_sub(1))
            .unwrap_or_default()
            .to_string()
    };
    for v in values.iter().filter(|v| !v.is_empty()) {
        // As written, quoted for the shell (a run: script), and the inside of that quoting.
        for base in [v.clone(), shell_quote(v), v.replace('\'', r"'\''")] {
            // Each of them also JSON-escaped and Debug-escaped.
            let json = inner(serde_json::to_string(&base).unwrap_or_default());
            let debug = inner(format!("{base:?}"));
            for form in [base, json, debug] {
                add(&form, &mut forms);
                if form.contains('\n') {
                    for line in form.lines() {
                        for l in [line.trim_end_matches('\r'), line.trim()] {
                            if l.chars().count() >= MIN_SECRET_LINE {
                                add(l, &mut forms);
                            }
                        }
                    }
                }
            }
        }
    }
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    forms
}

/// Secrets known to this process, for output that is not tied to one command's progress: the
/// final error line and internal logs (`JBAKE_LOG=debug`).
static REGISTERED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Remembers secret values (in all their [`secret_forms`]) for [`mask_registered`].
pub fn register_secrets(values: &[String]) {
    if values.iter().all(String::is_empty) {
        return;
    }
    let forms = secret_forms(values);
    let mut known = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    for f in forms {
        if !known.contains(&f) {
            known.push(f);
        }
    }
    known.sort_by_key(|f| std::cmp::Reverse(f.len()));
}

/// [`mask`] with every secret [`register_secrets`] was told about.
pub fn mask_registered(text: &str) -> String {
    let known = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    if known.is_empty() {
        return text.to_string();
    }
    mask(text, &known)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(Duration::from_millis(340)), "340ms");
        assert_eq!(fmt_duration(Duration::from_millis(1234)), "1.2s");
        assert_eq!(fmt_duration(Duration::from_secs(125)), "2m05s");
        assert_eq!(fmt_duration(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/etc/fstab"), "/etc/fstab");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn masking() {
        let s = vec!["hunter2".to_string()];
        assert_eq!(mask("token=hunter2;", &s), "token=****;");
    }

    #[test]
    fn every_form_of_a_secret_is_masked() {
        let pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nQyNTUxOQAAACDk\n-----END OPENSSH PRIVATE KEY-----\n";
        let odd = "it's \"q\" \\ n\u{e9}\nline2";
        let forms = secret_forms(&[pem.to_string(), odd.to_string()]);
        // The JSON text of an event holding the secret.
        let event = serde_json::json!({ "line": odd, "key": pem }).to_string();
        let masked = mask(&event, &forms);
        assert!(!masked.contains("b3BlbnNzaC1rZXktdjEAAAAA"), "{masked}");
        assert!(
            !masked.contains("line2") && !masked.contains("\\\"q\\\""),
            "{masked}"
        );
        // A PEM key printed line by line.
        for line in pem.lines().filter(|l| l.len() >= MIN_SECRET_LINE) {
            assert_eq!(mask(&format!("  | {line}"), &forms), "  | ****");
        }
        // Quoted for the shell, and in Debug output.
        assert!(!mask(&shell_quote(odd), &forms).contains("line2"));
        assert!(!mask(&format!("{odd:?}"), &forms).contains("line2"));
        // In a JSON value before it is serialised.
        let mut v = serde_json::json!({ "a": [odd], odd: 1 });
        mask_json(&mut v, &forms);
        assert!(!v.to_string().contains("line2"), "{v}");
    }
}
