//! The `line` step's logic, pure: the line ends up present exactly once.

use regex::Regex;

/// Returns the new content, or `None` when the file already holds `line` exactly once and no
/// other line matches `regexp`.
///
/// - With `regexp`: the first matching line is replaced by `line`, every other matching line and
///   every other copy of `line` is removed; if nothing matches, `line` is appended.
/// - Without: duplicates of `line` are removed; if absent it is appended.
pub fn ensure_line(content: &str, line: &str, regexp: Option<&Regex>) -> Option<String> {
    let lines: Vec<&str> = if content.is_empty() {
        Vec::new()
    } else {
        content
            .strip_suffix('\n')
            .unwrap_or(content)
            .split('\n')
            .collect()
    };
    let hits = |l: &str| l == line || regexp.is_some_and(|re| re.is_match(l));
    let mut out: Vec<&str> = Vec::with_capacity(lines.len() + 1);
    let mut placed = false;
    for l in &lines {
        if hits(l) {
            if !placed {
                out.push(line);
                placed = true;
            }
        } else {
            out.push(l);
        }
    }
    if !placed {
        out.push(line);
    }
    let mut new = out.join("\n");
    new.push('\n');
    (new != content).then_some(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn re(s: &str) -> Regex {
        Regex::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn appends_when_absent() {
        assert_eq!(
            ensure_line("a\nb\n", "c", None).as_deref(),
            Some("a\nb\nc\n")
        );
        assert_eq!(ensure_line("", "c", None).as_deref(), Some("c\n"));
        assert_eq!(ensure_line("a", "c", None).as_deref(), Some("a\nc\n"));
    }

    #[test]
    fn unchanged_when_present_once() {
        assert_eq!(ensure_line("a\nc\nb\n", "c", None), None);
    }

    #[test]
    fn duplicates_are_removed() {
        assert_eq!(
            ensure_line("c\na\nc\n", "c", None).as_deref(),
            Some("c\na\n")
        );
    }

    #[test]
    fn regexp_replaces_in_place() {
        let r = re(r"^fs-\S+ /var/lib/jenkins ");
        let old = "proc /proc proc 0 0\nfs-1.efs /var/lib/jenkins nfs4 old 0 0\n";
        let new = ensure_line(old, "fs-2.efs /var/lib/jenkins nfs4 new 0 0", Some(&r));
        assert_eq!(
            new.as_deref(),
            Some("proc /proc proc 0 0\nfs-2.efs /var/lib/jenkins nfs4 new 0 0\n")
        );
        // Applying it again changes nothing: idempotent.
        let again = ensure_line(
            new.as_deref().unwrap_or_default(),
            "fs-2.efs /var/lib/jenkins nfs4 new 0 0",
            Some(&r),
        );
        assert_eq!(again, None);
    }

    #[test]
    fn regexp_without_match_appends() {
        let r = re("^nomatch");
        assert_eq!(ensure_line("a\n", "b", Some(&r)).as_deref(), Some("a\nb\n"));
    }
}
