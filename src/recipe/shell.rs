//! Shell safety of `run:` templates.
//!
//! In a `run:` script every `{{ expression }}` is quoted for the POSIX shell when it is
//! rendered (the `sh` auto-escape of [`super::render`]): `{{ home }}` with the value
//! `/srv/a b;x` becomes `'/srv/a b;x'`, one word whatever it holds. Quoting is only safe where
//! the shell reads a plain word, though: inside `"…"` the quotes of a quoted value are literal
//! and `$(…)` in the value would run; inside `'…'` the value would close the quotes; in a
//! comment a newline in the value would end the comment; in a here-document the value is
//! expanded. [`check_placement`] reads the template like a shell reads a script (quotes,
//! escapes, `$( … )`, backquotes, `$(( … ))`, `${ … }`, comments, here-documents) and refuses
//! an expression in any of those places, so that an unsafe placement is an error at
//! `jbake validate`, never a command on the machine.
//!
//! An expression whose last filter is `safe` (`{{ flags | safe }}`) is inserted as it is, and
//! is not checked: the recipe author takes responsibility (and should give the variable a
//! `pattern:` of safe characters).

/// An expression written where auto-quoting cannot make it safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Misplaced {
    /// 1-based line and column of the `{{` in the template.
    pub line: usize,
    pub column: usize,
    /// The expression as written, `{{ … }}` included.
    pub expr: String,
    /// Where it is: "inside double quotes", ...
    pub place: &'static str,
}

impl Misplaced {
    /// The message for a recipe error.
    pub fn message(&self) -> String {
        let e = &self.expr;
        let advice = match self.place {
            "inside double quotes" | "inside single quotes" => {
                format!("write it outside the quotes (\"text \"{e}\" more\" is one word), or ")
            }
            "inside backquotes" => "use $( … ) instead of backquotes, or ".to_string(),
            "in a comment" => "take it out of the comment, or ".to_string(),
            _ => String::new(),
        };
        format!(
            "{e} is {}: run: scripts quote every value for the shell, which is safe only in a \
             plain word; {advice}set a shell variable first (x={e}) and use \"$x\" there \
             (`| safe` inserts a value unquoted, at your own risk)",
            self.place
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// Plain shell words. `parens` counts unmatched `(` of subshells inside it.
    Normal {
        parens: u32,
    },
    /// `$( … )`: plain words until the matching `)`.
    Subst {
        parens: u32,
    },
    Double,
    Single,
    Backquote,
    /// `$(( … ))`
    Arith {
        parens: u32,
    },
    /// `${ … }`
    Brace,
    Comment,
}

impl Ctx {
    fn place(self) -> Option<&'static str> {
        match self {
            Ctx::Normal { .. } | Ctx::Subst { .. } => None,
            Ctx::Double => Some("inside double quotes"),
            Ctx::Single => Some("inside single quotes"),
            Ctx::Backquote => Some("inside backquotes"),
            Ctx::Arith { .. } => Some("inside $(( … ))"),
            Ctx::Brace => Some("inside ${ … }"),
            Ctx::Comment => Some("in a comment"),
        }
    }
}

struct Heredoc {
    delimiter: String,
    strip_tabs: bool,
}

/// Checks every `{{ … }}` of a `run:` template (see the module documentation).
pub(crate) fn check_placement(source: &str) -> Result<(), Misplaced> {
    let bytes = source.as_bytes();
    let mut stack = vec![Ctx::Normal { parens: 0 }];
    let mut pending: Vec<Heredoc> = Vec::new();
    let mut heredoc: Option<Heredoc> = None;
    let mut word_start = true;
    let mut i = 0;
    while i < bytes.len() {
        let rest = &source[i..];
        // Template syntax first: it is not shell.
        if rest.starts_with("{{") {
            let end = rest.find("}}").map_or(source.len(), |e| i + e + 2);
            let expr = &source[i..end];
            let place = if heredoc.is_some() {
                Some("in a here-document")
            } else {
                stack.last().and_then(|c| c.place())
            };
            if let Some(place) = place {
                if !opts_out(expr) {
                    let (line, column) = line_col(source, i);
                    return Err(Misplaced {
                        line,
                        column,
                        expr: expr.to_string(),
                        place,
                    });
                }
            }
            i = end;
            word_start = false;
            continue;
        }
        if rest.starts_with("{%") || rest.starts_with("{#") {
            let close = if rest.starts_with("{%") { "%}" } else { "#}" };
            i = rest.find(close).map_or(source.len(), |e| i + e + 2);
            continue;
        }
        let c = bytes[i];
        if let Some(h) = &heredoc {
            // A here-document body, line by line: only its end line matters.
            let line_end = rest.find('\n').map_or(source.len(), |e| i + e);
            let line = &source[i..line_end];
            let body_line = if h.strip_tabs {
                line.trim_start_matches('\t')
            } else {
                line
            };
            if body_line == h.delimiter {
                heredoc = if pending.is_empty() {
                    None
                } else {
                    Some(pending.remove(0))
                };
                i = line_end + 1;
                continue;
            }
            // Look for an expression on this line (the loop above handles it).
            match line.find("{{") {
                Some(at) => i += at,
                None => i = line_end + 1,
            }
            continue;
        }
        let top = stack.last().copied().unwrap_or(Ctx::Normal { parens: 0 });
        match top {
            Ctx::Normal { parens } | Ctx::Subst { parens } => {
                let subst = matches!(top, Ctx::Subst { .. });
                match c {
                    b'\\' => {
                        i += 2;
                        word_start = false;
                        continue;
                    }
                    b'\'' => stack.push(Ctx::Single),
                    b'"' => stack.push(Ctx::Double),
                    b'`' => stack.push(Ctx::Backquote),
                    b'#' if word_start => stack.push(Ctx::Comment),
                    b'$' if rest.starts_with("$((") => {
                        stack.push(Ctx::Arith { parens: 0 });
                        i += 3;
                        word_start = false;
                        continue;
                    }
                    b'$' if rest.starts_with("$(") => {
                        stack.push(Ctx::Subst { parens: 0 });
                        i += 2;
                        word_start = true;
                        continue;
                    }
                    b'$' if rest.starts_with("${") => {
                        stack.push(Ctx::Brace);
                        i += 2;
                        word_start = false;
                        continue;
                    }
                    b'(' => set_parens(&mut stack, parens + 1),
                    b')' if parens > 0 => set_parens(&mut stack, parens - 1),
                    b')' if subst => {
                        stack.pop();
                    }
                    b'<' if rest.starts_with("<<") && !rest.starts_with("<<<") => {
                        let (h, used) = heredoc_operator(&rest[2..]);
                        if let Some(h) = h {
                            pending.push(h);
                        }
                        i += 2 + used;
                        word_start = true;
                        continue;
                    }
                    b'\n' if !pending.is_empty() => heredoc = Some(pending.remove(0)),
                    _ => {}
                }
                word_start = matches!(
                    c,
                    b' ' | b'\t' | b'\n' | b';' | b'&' | b'|' | b'(' | b')' | b'<' | b'>'
                );
            }
            Ctx::Double => match c {
                b'\\' => {
                    i += 2;
                    continue;
                }
                b'"' => {
                    stack.pop();
                }
                b'`' => stack.push(Ctx::Backquote),
                b'$' if rest.starts_with("$((") => {
                    stack.push(Ctx::Arith { parens: 0 });
                    i += 3;
                    continue;
                }
                b'$' if rest.starts_with("$(") => {
                    stack.push(Ctx::Subst { parens: 0 });
                    i += 2;
                    word_start = true;
                    continue;
                }
                b'$' if rest.starts_with("${") => {
                    stack.push(Ctx::Brace);
                    i += 2;
                    continue;
                }
                _ => {}
            },
            Ctx::Single => {
                if c == b'\'' {
                    stack.pop();
                    word_start = false;
                }
            }
            Ctx::Backquote => match c {
                b'\\' => {
                    i += 2;
                    continue;
                }
                b'`' => {
                    stack.pop();
                }
                _ => {}
            },
            Ctx::Arith { parens } => {
                if rest.starts_with("))") && parens == 0 {
                    stack.pop();
                    i += 2;
                    continue;
                }
                match c {
                    b'(' => set_parens(&mut stack, parens + 1),
                    b')' if parens > 0 => set_parens(&mut stack, parens - 1),
                    _ => {}
                }
            }
            Ctx::Brace => match c {
                b'\\' => {
                    i += 2;
                    continue;
                }
                b'}' => {
                    stack.pop();
                }
                b'\'' => stack.push(Ctx::Single),
                b'"' => stack.push(Ctx::Double),
                _ => {}
            },
            Ctx::Comment => {
                if c == b'\n' {
                    stack.pop();
                    word_start = true;
                    if !pending.is_empty() {
                        heredoc = Some(pending.remove(0));
                    }
                }
            }
        }
        // Multi-byte characters are never shell syntax: skip a whole character.
        i += source[i..].chars().next().map_or(1, char::len_utf8);
    }
    Ok(())
}

fn set_parens(stack: &mut [Ctx], n: u32) {
    if let Some(Ctx::Normal { parens } | Ctx::Subst { parens } | Ctx::Arith { parens }) =
        stack.last_mut()
    {
        *parens = n;
    }
}

/// `{{ x | safe }}`: the author opted out of quoting.
fn opts_out(expr: &str) -> bool {
    let inner = expr
        .trim_start_matches("{{")
        .trim_end_matches("}}")
        .trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
    inner
        .rsplit_once('|')
        .is_some_and(|(_, last)| last.trim() == "safe")
}

/// After `<<`: an optional `-`, blanks, then the delimiter word (quotes removed). Returns the
/// here-document and the bytes read.
fn heredoc_operator(after: &str) -> (Option<Heredoc>, usize) {
    let mut used = 0;
    let strip_tabs = after.starts_with('-');
    if strip_tabs {
        used += 1;
    }
    let blanks = after[used..].len() - after[used..].trim_start_matches([' ', '\t']).len();
    used += blanks;
    let mut delimiter = String::new();
    let mut quote: Option<char> = None;
    let mut chars = after[used..].char_indices().peekable();
    let mut end = after.len() - used;
    while let Some((at, ch)) = chars.next() {
        match (quote, ch) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => delimiter.push(c),
            (None, '\'' | '"') => quote = Some(ch),
            (None, '\\') => {
                if let Some((_, next)) = chars.next() {
                    delimiter.push(next);
                }
            }
            (None, c) if c.is_whitespace() || ";&|<>()".contains(c) => {
                end = at;
                break;
            }
            (None, c) => delimiter.push(c),
        }
    }
    used += end;
    if delimiter.is_empty() {
        (None, used)
    } else {
        (
            Some(Heredoc {
                delimiter,
                strip_tabs,
            }),
            used,
        )
    }
}

/// 1-based line and column of a byte offset.
fn line_col(source: &str, pos: usize) -> (usize, usize) {
    let before = &source[..pos.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(src: &str) -> Option<&'static str> {
        check_placement(src).err().map(|m| m.place)
    }

    #[test]
    fn plain_words_are_fine() {
        for ok in [
            "echo {{ x }}",
            "apt-get install -y {{ pkgs | split }}",
            "curl -o \"$tmp\" {{ mirror }}/{{ version }}/jenkins.war",
            "echo \"prefix \"{{ x }}\" suffix\"",
            "x={{ x }}; echo \"$x\"",
            "echo \"$(id -u {{ user }})\"",
            "v=$(echo {{ x }} | tr a b)",
            "( cd /; echo {{ x }} )",
            "echo hi # a comment\necho {{ x }}",
            "cat <<EOF\nhello $x\nEOF\necho {{ x }}",
            "cat <<-'END' >f\n\tline\n\tEND\necho {{ x }}",
            "echo don\\'t {{ x }}",
            "{% if x == \"a\" %}echo {{ x }}{% endif %}",
            "echo '{{ x | safe }}'",
            "echo a#b {{ x }}",
            "echo ${HOME} {{ x }}",
            "echo $((1 + 2)) {{ x }}",
            "case {{ x }} in a) echo a ;; esac",
            "echo 'ünïcode' {{ x }}",
        ] {
            assert_eq!(check_placement(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn unsafe_places_are_refused() {
        for (bad, want) in [
            ("echo \"{{ x }}\"", "inside double quotes"),
            ("echo '{{ x }}'", "inside single quotes"),
            ("echo `ls {{ x }}`", "inside backquotes"),
            ("echo $(( {{ x }} + 1 ))", "inside $(( … ))"),
            ("echo ${y:-{{ x }}}", "inside ${ … }"),
            ("# set {{ x }}\necho", "in a comment"),
            ("echo hi  # {{ x }}", "in a comment"),
            ("cat <<EOF\n{{ x }}\nEOF", "in a here-document"),
            ("cat <<'EOF' > f\nv={{ x }}\nEOF", "in a here-document"),
            ("echo \"$(echo \"{{ x }}\")\"", "inside double quotes"),
            ("echo \"a\nb {{ x }}\"", "inside double quotes"),
        ] {
            assert_eq!(place(bad), Some(want), "{bad}");
        }
        let m = check_placement("echo ok\n  echo \"{{ home }}\"").unwrap_err();
        assert_eq!((m.line, m.column, m.expr.as_str()), (2, 9, "{{ home }}"));
        assert!(
            m.message().contains("outside the quotes"),
            "{}",
            m.message()
        );
    }

    #[test]
    fn after_a_construct_words_are_plain_again() {
        assert_eq!(check_placement("echo \"a\" {{ x }}"), Ok(()));
        assert_eq!(check_placement("echo $(echo \"a\") {{ x }}"), Ok(()));
        assert_eq!(check_placement("echo `a` {{ x }}"), Ok(()));
        assert_eq!(
            check_placement("cat <<EOF\nbody\nEOF\necho {{ x }} \"$(x)\""),
            Ok(())
        );
    }
}
