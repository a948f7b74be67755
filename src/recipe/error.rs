//! Errors a user can act on: every error that comes from a file says where (file:line:col) and,
//! where it concerns a field, which field (`steps[3].upload.mode`).

use std::path::PathBuf;

use super::plan::Origin;

/// Everything that can go wrong while loading a recipe. `Display` is one complete message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not something jbake reads as text (a folder, a device, too large, not UTF-8).
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: FileProblem },
    /// The file is not valid YAML.
    #[error("{origin}: YAML syntax error: {message}")]
    Syntax { origin: Origin, message: String },
    /// A value in a file is wrong (type, unknown key, bad mode, undefined template variable, ...).
    #[error("{origin}: {}{message}", field_prefix(field))]
    Invalid {
        origin: Origin,
        /// e.g. `steps[3].upload.mode`; empty for the whole document.
        field: String,
        message: String,
    },
}

/// Why a file given as a recipe, an include, a var file or a template cannot be read as one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileProblem {
    #[error("is a directory, not a file")]
    Directory,
    #[error("is not a regular file (a device, a FIFO or a socket): give a file")]
    NotRegular,
    #[error("is {size} bytes; more than the {limit} bytes jbake reads from a recipe, an include, a var file or a template")]
    TooLarge { size: u64, limit: u64 },
    #[error("is not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

impl Error {
    /// Where the error is, when it comes from a file.
    pub fn location(&self) -> Option<&Origin> {
        match self {
            Error::Syntax { origin, .. } | Error::Invalid { origin, .. } => Some(origin),
            Error::Io { .. } | Error::File { .. } => None,
        }
    }

    /// The field path (`steps[3].upload.mode`) the error is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::Invalid { field, .. } if !field.is_empty() => Some(field),
            _ => None,
        }
    }

    pub(crate) fn invalid(origin: &Origin, field: &str, message: impl Into<String>) -> Error {
        Error::Invalid {
            origin: origin.clone(),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Levenshtein distance, for "did you mean" hints.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Names people bring from Ansible/Packer, and what they are called here.
const ALIASES: &[(&str, &str)] = &[
    ("shell", "run"),
    ("command", "run"),
    ("cmd", "run"),
    ("script", "run"),
    ("copy", "upload"),
    ("template", "upload"),
    ("lineinfile", "line"),
    ("retry", "retries"),
];

/// The closest candidate to `word`, if it is close enough to be a plausible typo.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let candidates: Vec<&str> = candidates.into_iter().collect();
    let lower = word.to_lowercase();
    if let Some((_, to)) = ALIASES.iter().find(|(from, _)| *from == lower) {
        if let Some(c) = candidates.iter().find(|c| *c == to) {
            return Some(c);
        }
    }
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let cl = c.to_lowercase();
        let d = edit_distance(&lower, &cl);
        let longest = lower.chars().count().max(cl.chars().count());
        let prefix = lower
            .chars()
            .zip(cl.chars())
            .take_while(|(a, b)| a == b)
            .count();
        let close = d <= 1.max(longest / 3) || (prefix >= 3 && d <= longest / 2);
        if close && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// `" (did you mean 'x'?)"` or nothing.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> String {
    match closest(word, candidates) {
        Some(c) => format!(" (did you mean '{c}'?)"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_and_suggestions() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(
            closest("retry", ["run", "retries", "delay"]),
            Some("retries")
        );
        assert_eq!(closest("efs_idd", ["efs_id", "region"]), Some("efs_id"));
        assert_eq!(closest("zzzzzz", ["run", "name"]), None);
        assert_eq!(closest("shell", ["name", "run", "when"]), Some("run"));
        assert_eq!(closest("retires", ["retries", "run"]), Some("retries"));
        assert_eq!(closest("stepz", ["steps", "name"]), Some("steps"));
        assert_eq!(closest("foo", ["run", "name", "env"]), None);
    }
}
