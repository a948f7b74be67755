//! Image names and versions: `<recipe>-<YYYY.MM.DD>-<N>`, N counting the day's images of the
//! recipe. Pure functions; the bake asks EC2 which numbers are taken.
//!
//! The number is planned when the build starts (the recipe can use `{{ version }}`), reserved by
//! the `jbake:version` tag on the build's key pair, security group and instance (so a build of
//! the same recipe starting later plans the next one), and confirmed at CreateImage: if the name
//! is taken there after all (two builds planned in the same instant), the next free number is
//! taken and CreateImage retried.

use std::time::SystemTime;

/// `YYYY.MM.DD` (UTC) of `t`.
pub fn day(t: SystemTime) -> String {
    let text = humantime::format_rfc3339_seconds(t).to_string();
    text.get(..10).unwrap_or("1970-01-01").replace('-', ".")
}

/// `DAY-N`.
pub fn version(day: &str, n: u32) -> String {
    format!("{day}-{n}")
}

/// `RECIPE-VERSION`: the image's name.
pub fn image_name(recipe: &str, version: &str) -> String {
    format!("{recipe}-{version}")
}

/// N of a version `DAY-N` of that day.
pub fn number_of_version(version: &str, day: &str) -> Option<u32> {
    version
        .strip_prefix(day)?
        .strip_prefix('-')?
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
}

/// N of an image name `RECIPE-DAY-N`.
pub fn number_of_name(name: &str, recipe: &str, day: &str) -> Option<u32> {
    number_of_version(name.strip_prefix(recipe)?.strip_prefix('-')?, day)
}

/// One more than the highest taken number (1 when none is); `None` when u32 is exhausted.
pub fn next(taken: impl IntoIterator<Item = u32>) -> Option<u32> {
    taken.into_iter().max().unwrap_or(0).checked_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        let t = humantime::parse_rfc3339("2026-11-29T23:59:59Z").unwrap_or(SystemTime::UNIX_EPOCH);
        assert_eq!(day(t), "2026.11.29");
        assert_eq!(version("2026.11.29", 3), "2026.11.29-3");
        assert_eq!(image_name("r", "2026.11.29-3"), "r-2026.11.29-3");
        assert_eq!(
            number_of_name("r-2026.11.29-12", "r", "2026.11.29"),
            Some(12)
        );
        // Another recipe whose name extends this one, another day, not a number: not ours.
        assert_eq!(number_of_name("r-x-2026.11.29-1", "r", "2026.11.29"), None);
        assert_eq!(number_of_name("r-2026.11.28-1", "r", "2026.11.29"), None);
        assert_eq!(number_of_name("r-2026.11.29-1a", "r", "2026.11.29"), None);
        assert_eq!(number_of_version("2026.11.29-0", "2026.11.29"), None);
        assert_eq!(next([]), Some(1));
        assert_eq!(next([1, 4, 2]), Some(5));
        assert_eq!(next([u32::MAX]), None);
    }
}
