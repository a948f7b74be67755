//! Small value syntaxes shared by the recipe and the CLI: durations, `k=v`, modes, user names.

use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;

static DURATION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(?:[0-9]+(?:ms|d|h|m|s))+$").expect("static regex"));
static DURATION_PART: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"([0-9]+)(ms|d|h|m|s)").expect("static regex"));
static USER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z_][a-z0-9_-]*[$]?$").expect("static regex"));
static IDENT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z_][A-Za-z0-9_]*$").expect("static regex"));

/// Parse a duration such as `500ms`, `30s`, `10m`, `1h30m`, `2h`.
///
/// The error is a complete sentence fragment: `"10 minutes" is not a duration (use e.g. "30s", "10m", "1h30m")`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("\"{s}\" is not a duration (use e.g. \"30s\", \"10m\", \"1h30m\", \"7d\")");
    if !DURATION.is_match(s) {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    for c in DURATION_PART.captures_iter(s) {
        let n: u64 = c[1].parse().map_err(|_| bad())?;
        let d = match &c[2] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
            _ => Duration::from_secs(n.checked_mul(86_400).ok_or_else(bad)?),
        };
        total = total.checked_add(d).ok_or_else(bad)?;
    }
    Ok(total)
}

/// Format a duration the way [`parse_duration`] reads it (`1h30m`, `5s`, `500ms`).
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    let ms = d.subsec_millis();
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out += &format!("{h}h");
    }
    if m > 0 {
        out += &format!("{m}m");
    }
    if s > 0 {
        out += &format!("{s}s");
    }
    if ms > 0 {
        out += &format!("{ms}ms");
    }
    out
}

/// Parse a `--var k=v` argument (for clap's `value_parser`).
pub fn parse_var_arg(s: &str) -> Result<(String, String), String> {
    let Some((k, v)) = s.split_once('=') else {
        return Err(format!(
            "'{s}' is not name=value (write it like --var efs_id=fs-12345678)"
        ));
    };
    let k = k.trim();
    if !is_identifier(k) {
        return Err(format!(
            "'{k}' is not a variable name (letters, digits and _, not starting with a digit)"
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

/// A template variable or environment variable name.
pub(crate) fn is_identifier(s: &str) -> bool {
    IDENT.is_match(s)
}

/// A Unix user or group name, or a numeric id.
pub(crate) fn check_user(s: &str) -> Result<(), String> {
    if (s.len() <= 32 && USER.is_match(s))
        || (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
    {
        Ok(())
    } else {
        Err(format!(
            "\"{s}\" is not a user or group name (lowercase letters, digits, _ and -, up to 32 characters) or a numeric id"
        ))
    }
}

/// A file mode written as `"0644"`, `"755"` or the YAML integer `644` (read as octal digits).
pub(crate) fn parse_mode(raw: &str) -> Result<u32, String> {
    let digits = raw.strip_prefix("0o").unwrap_or(raw);
    if (3..=4).contains(&digits.len()) && digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        if let Ok(m) = u32::from_str_radix(digits, 8) {
            return Ok(m);
        }
    }
    Err(format!(
        "\"{raw}\" is not an octal mode (write it like \"0644\")"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(
            parse_duration("99999999999999999d").is_err(),
            "overflow is an error"
        );
        assert_eq!(
            parse_duration("10 minutes").unwrap_err(),
            "\"10 minutes\" is not a duration (use e.g. \"30s\", \"10m\", \"1h30m\", \"7d\")"
        );
        for bad in ["", "10", "m", "1.5h", "-1s", "1w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        for d in ["500ms", "30s", "10m", "1h30m", "2h", "1h0m5s"] {
            let parsed = parse_duration(d).unwrap();
            assert_eq!(parse_duration(&format_duration(parsed)).unwrap(), parsed);
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
    }

    #[test]
    fn var_args() {
        assert_eq!(parse_var_arg("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_var_arg("a="), Ok(("a".into(), String::new())));
        assert!(parse_var_arg("a").is_err());
        assert!(parse_var_arg("1a=b").is_err());
    }

    #[test]
    fn modes_and_users() {
        assert_eq!(parse_mode("0644"), Ok(0o644));
        assert_eq!(parse_mode("755"), Ok(0o755));
        assert_eq!(parse_mode("644"), Ok(0o644));
        assert!(parse_mode("755x").is_err());
        assert!(parse_mode("0888").is_err());
        assert!(parse_mode("12").is_err());
        assert!(check_user("jenkins").is_ok());
        assert!(check_user("1000").is_ok());
        assert!(check_user("Jenkins").is_err());
        assert!(check_user("").is_err());
    }
}
