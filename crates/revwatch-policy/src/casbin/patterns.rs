//! Row values that casbin-rs 2.20 turns into regular expressions, checked before
//! activation: its matching functions `unwrap` the compiled pattern (or a capture),
//! so one bad row would panic every decision that reaches it.
//!
//! Each function's pattern argument is rewritten exactly as casbin does it before
//! compiling, so a pattern passes here exactly when casbin compiles it.

use std::sync::LazyLock;

use regex::Regex;

/// A matching function whose second argument is a pattern casbin compiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PatternFn {
    /// `regexMatch(key, pattern)`: the pattern as it is.
    RegexMatch,
    /// `keyMatch2(key, pattern)`: `/*` and `:name` rewritten.
    KeyMatch2,
    /// `keyMatch3(key, pattern)`: `/*` and `{name}` rewritten.
    KeyMatch3,
    /// `keyGet3(key, pattern, name)`: as keyMatch3, with capture groups.
    KeyGet3,
    /// `keyMatch4(key, pattern)`: an invalid pattern only never matches, but every
    /// capture group must be one of its `{name}` tokens and take part in a match.
    KeyMatch4,
    /// `keyMatch5(key, pattern)`: `/*` and `{name}` rewritten.
    KeyMatch5,
}

impl PatternFn {
    const ALL: [(PatternFn, &'static str); 6] = [
        (PatternFn::RegexMatch, "regexMatch"),
        (PatternFn::KeyMatch2, "keyMatch2"),
        (PatternFn::KeyMatch3, "keyMatch3"),
        (PatternFn::KeyGet3, "keyGet3"),
        (PatternFn::KeyMatch4, "keyMatch4"),
        (PatternFn::KeyMatch5, "keyMatch5"),
    ];

    pub(super) fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(f, _)| *f == self)
            .map_or("?", |(_, name)| name)
    }

    /// Why casbin would panic on `pattern`, if it would.
    pub(super) fn check(self, pattern: &str) -> Result<(), String> {
        let compiled = match self {
            PatternFn::RegexMatch => pattern.to_owned(),
            PatternFn::KeyMatch2 => anchored(&COLON_TOKEN.replace_all(&star(pattern), "[^/]+")),
            PatternFn::KeyMatch3 => anchored(&BRACE_TOKEN.replace_all(&star(pattern), "[^/]+")),
            PatternFn::KeyGet3 => {
                let starred = star(pattern);
                let groups = LAZY_BRACE_TOKEN.replace_all(&starred, "([^/]+?)");
                anchored(&groups.replace('{', "\\{"))
            }
            PatternFn::KeyMatch4 => return key_match4(pattern),
            PatternFn::KeyMatch5 => {
                anchored(&LAZY_BRACE_TOKEN.replace_all(&star(pattern), "[^/]+"))
            }
        };
        Regex::new(&compiled)
            .map(drop)
            .map_err(|e| format!("not a valid {} pattern: {e}", self.name()))
    }
}

/// casbin's `:name` token (keyMatch2).
static COLON_TOKEN: LazyLock<Regex> = LazyLock::new(|| Regex::new(r":[^/]*").expect("literal"));
/// casbin's greedy `{name}` token (keyMatch3).
static BRACE_TOKEN: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\{[^/]*\}").expect("literal"));
/// casbin's lazy `{name}` token (keyGet3, keyMatch4, keyMatch5).
static LAZY_BRACE_TOKEN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\{[^/]+?\}").expect("literal"));

fn star(pattern: &str) -> String {
    pattern.replace("/*", "/.*")
}

fn anchored(pattern: &str) -> String {
    format!("^{pattern}$")
}

/// keyMatch4 unwraps every capture of a match and panics unless there is one per
/// token: so no groups of the pattern's own, and no token a match can skip.
fn key_match4(pattern: &str) -> Result<(), String> {
    let rewritten = star(pattern);
    let tokens = LAZY_BRACE_TOKEN.find_iter(&rewritten).count();
    let rest = LAZY_BRACE_TOKEN.replace_all(&rewritten, "");
    if let Some(c) = rest.chars().find(|c| matches!(c, '(' | ')' | '|' | '?')) {
        return Err(format!(
            "not a valid keyMatch4 pattern: `{c}` outside a {{name}} token (casbin-rs \
             panics on groups, alternatives and optional parts of its own)"
        ));
    }
    let optional_token = LAZY_BRACE_TOKEN
        .find_iter(&rewritten)
        .any(|m| rewritten[m.end()..].starts_with('*'));
    if optional_token {
        return Err(
            "not a valid keyMatch4 pattern: a {name} token followed by `*` may match \
             nothing, which casbin-rs panics on"
                .into(),
        );
    }
    let groups = LAZY_BRACE_TOKEN.replace_all(&rewritten, "([^/]+)");
    // An invalid pattern never matches in casbin; it does not panic.
    if let Ok(re) = Regex::new(&anchored(&groups))
        && re.captures_len() != tokens + 1
    {
        return Err("not a valid keyMatch4 pattern: its groups are not its tokens".into());
    }
    Ok(())
}

/// The pattern argument (the second, as written: e.g. `p_obj`) of each call of a
/// pattern-compiling function in a matcher.
pub(super) fn pattern_args(matcher: &str) -> Vec<(PatternFn, String)> {
    let mut found = Vec::new();
    for (function, name) in PatternFn::ALL {
        let call = format!("{name}(");
        let mut rest = matcher;
        while let Some(at) = rest.find(&call) {
            // `xkeyMatch2(` is another function.
            let preceded = rest[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
            rest = &rest[at + call.len()..];
            if preceded {
                continue;
            }
            if let Some(pattern) = call_args(rest).get(1) {
                found.push((function, pattern.trim().to_owned()));
            }
        }
    }
    found
}

/// The top-level arguments of a call whose text starts right after its `(`.
fn call_args(text: &str) -> Vec<String> {
    let mut depth = 0usize;
    let mut args = vec![String::new()];
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => break,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                args.push(String::new());
                continue;
            }
            _ => {}
        }
        if let Some(last) = args.last_mut() {
            last.push(c);
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use casbin::function_map;
    use std::panic::catch_unwind;

    /// Whether casbin's own function panics on `pattern` for `key`.
    fn casbin_panics(f: PatternFn, key: &str, pattern: &str) -> bool {
        let (key, pattern) = (key.to_owned(), pattern.to_owned());
        catch_unwind(move || match f {
            PatternFn::RegexMatch => {
                function_map::regex_match(&key, &pattern);
            }
            PatternFn::KeyMatch2 => {
                function_map::key_match2(&key, &pattern);
            }
            PatternFn::KeyMatch3 => {
                function_map::key_match3(&key, &pattern);
            }
            PatternFn::KeyGet3 => {
                function_map::key_get3(&key, &pattern, "id");
            }
            PatternFn::KeyMatch4 => {
                function_map::key_match4(&key, &pattern);
            }
            PatternFn::KeyMatch5 => {
                function_map::key_match5(&key, &pattern);
            }
        })
        .is_err()
    }

    /// Every pattern here that casbin panics on, for some key, fails the check.
    #[test]
    fn the_checks_agree_with_casbins_own_functions() {
        let patterns = [
            "/users/:id",
            "/users/:id/*",
            "/users/{id}",
            "/parent/{id}/child/{id}",
            "/a/(b",
            "/a/[",
            "/users/:id)",
            "/x/{id}?",
            "/x/{id}*",
            "/x/(y)/{id}",
            "/x/{id}|/y",
            "/x/{a}{b}",
            "^/ok$",
            "*",
            "(",
        ];
        let keys = [
            "/users/1",
            "/users/1/x",
            "/parent/1/child/1",
            "/x/",
            "/x/1",
            "/x/y/1",
            "/y",
            "/a/(b",
            "",
        ];
        let _quiet = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        for (f, _) in PatternFn::ALL {
            for pattern in patterns {
                let panics = keys.iter().any(|k| casbin_panics(f, k, pattern));
                let checked = f.check(pattern);
                if panics {
                    assert!(
                        checked.is_err(),
                        "{f:?} {pattern:?} panics in casbin but passes"
                    );
                }
                // Only keyMatch4's check is stricter than casbin: its panic depends on
                // the key, the others' on the pattern alone.
                if f != PatternFn::KeyMatch4 {
                    assert_eq!(checked.is_err(), panics, "{f:?} {pattern:?}");
                }
            }
        }
        let _ = std::panic::take_hook();
    }

    #[test]
    fn sound_patterns_pass() {
        assert!(PatternFn::KeyMatch2.check("/users/:id/*").is_ok());
        assert!(PatternFn::KeyMatch3.check("/users/{id}").is_ok());
        assert!(PatternFn::KeyGet3.check("/users/{id}").is_ok());
        assert!(
            PatternFn::KeyMatch4
                .check("/parent/{id}/child/{id}")
                .is_ok()
        );
        assert!(PatternFn::KeyMatch5.check("/parent/*").is_ok());
        assert!(PatternFn::RegexMatch.check("^/a/.*$").is_ok());
    }

    #[test]
    fn bad_patterns_are_named_with_their_function() {
        let e = PatternFn::KeyMatch2.check("/a/(b").unwrap_err();
        assert!(e.contains("keyMatch2"), "{e}");
        assert!(PatternFn::KeyMatch4.check("/x/(y)/{id}").is_err());
        assert!(PatternFn::KeyMatch4.check("/x/{id}?").is_err());
    }

    #[test]
    fn pattern_arguments_are_found_per_function() {
        let args = pattern_args(
            "g(r_sub, p_sub) && keyMatch2(r_obj, p_obj) && regexMatch(r_act, p_act) && \
             my_keyMatch2(r_obj, p_sub) && keyGet3(r_obj, p_obj, \"id\")",
        );
        assert_eq!(
            args,
            [
                (PatternFn::RegexMatch, "p_act".to_owned()),
                (PatternFn::KeyMatch2, "p_obj".to_owned()),
                (PatternFn::KeyGet3, "p_obj".to_owned()),
            ]
        );
    }
}
