//! Recognises the matchers the casbin index can decide: a conjunction of request/policy field
//! equalities and at most one role check `g(r.sub, p.sub[, domain])`.
//!
//! Anything else (other functions, `||`, `!`, literals, comparisons between two request fields)
//! is not recognised and the caller falls back to casbin's own evaluation.

/// A recognised matcher, with fields named by their position in the `r` / `p` definitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Shape {
    /// `r.<0> == p.<1>` terms.
    pub equalities: Vec<(usize, usize)>,
    pub role: Option<RoleTerm>,
}

/// `g(r.<subject>, p.<role>[, <domain>])`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RoleTerm {
    pub subject: usize,
    pub role: usize,
    /// The request field whose value is the domain: given directly, or a policy field the
    /// matcher also equates with that request field.
    pub domain: Option<usize>,
}

/// `matcher` is casbin's escaped matcher text (`r_sub`, `p_obj`, ...); `role_arity` is the number
/// of `_` in the `g` definition (0 when the model has none).
pub(super) fn recognise(
    matcher: &str,
    r_tokens: &[String],
    p_tokens: &[String],
    role_arity: usize,
) -> Option<Shape> {
    let tokens = tokenize(matcher)?;
    let mut parser = Parser {
        tokens: &tokens,
        at: 0,
    };
    let mut terms = Vec::new();
    parser.conjunction(&mut terms)?;
    if parser.at != tokens.len() {
        return None;
    }
    let field = |name: &str, side: &[String]| side.iter().position(|t| t == name);
    let mut equalities = Vec::new();
    let mut calls = Vec::new();
    for term in terms {
        match term {
            Term::Equal(a, b) => {
                let pair = match (field(a, r_tokens), field(b, p_tokens)) {
                    (Some(r), Some(p)) => (r, p),
                    _ => (field(b, r_tokens)?, field(a, p_tokens)?),
                };
                equalities.push(pair);
            }
            Term::Call(name, args) => calls.push((name, args)),
        }
    }
    let role = match calls.as_slice() {
        [] => None,
        [(name, args)] if *name == "g" && args.len() == role_arity => {
            let subject = field(args[0], r_tokens)?;
            let role = field(args[1], p_tokens)?;
            let domain = match args.get(2) {
                None => None,
                Some(arg) => Some(match field(arg, r_tokens) {
                    Some(r) => r,
                    None => {
                        let p = field(arg, p_tokens)?;
                        equalities.iter().find(|(_, q)| *q == p)?.0
                    }
                }),
            };
            Some(RoleTerm {
                subject,
                role,
                domain,
            })
        }
        _ => return None,
    };
    Some(Shape { equalities, role })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    Ident(&'a str),
    And,
    Equal,
    Open,
    Close,
    Comma,
}

fn tokenize(text: &str) -> Option<Vec<Token<'_>>> {
    let mut tokens = Vec::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let c = bytes[at];
        let (token, len) = match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                at += 1;
                continue;
            }
            b'&' if bytes.get(at + 1) == Some(&b'&') => (Token::And, 2),
            b'=' if bytes.get(at + 1) == Some(&b'=') => (Token::Equal, 2),
            b'(' => (Token::Open, 1),
            b')' => (Token::Close, 1),
            b',' => (Token::Comma, 1),
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let len = bytes[at..]
                    .iter()
                    .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
                    .count();
                (Token::Ident(&text[at..at + len]), len)
            }
            _ => return None,
        };
        tokens.push(token);
        at += len;
    }
    Some(tokens)
}

enum Term<'a> {
    Equal(&'a str, &'a str),
    Call(&'a str, Vec<&'a str>),
}

struct Parser<'t, 'a> {
    tokens: &'t [Token<'a>],
    at: usize,
}

impl<'a> Parser<'_, 'a> {
    fn next(&mut self) -> Option<Token<'a>> {
        let token = self.tokens.get(self.at).copied();
        self.at += 1;
        token
    }

    fn peek(&self) -> Option<Token<'a>> {
        self.tokens.get(self.at).copied()
    }

    fn conjunction(&mut self, terms: &mut Vec<Term<'a>>) -> Option<()> {
        self.atom(terms)?;
        while self.peek() == Some(Token::And) {
            self.at += 1;
            self.atom(terms)?;
        }
        Some(())
    }

    fn atom(&mut self, terms: &mut Vec<Term<'a>>) -> Option<()> {
        match self.next()? {
            Token::Open => {
                self.conjunction(terms)?;
                (self.next()? == Token::Close).then_some(())
            }
            Token::Ident(name) => match self.next()? {
                Token::Equal => match self.next()? {
                    Token::Ident(other) => {
                        terms.push(Term::Equal(name, other));
                        Some(())
                    }
                    _ => None,
                },
                Token::Open => {
                    let mut args = Vec::new();
                    loop {
                        match self.next()? {
                            Token::Ident(arg) => args.push(arg),
                            _ => return None,
                        }
                        match self.next()? {
                            Token::Comma => {}
                            Token::Close => break,
                            _ => return None,
                        }
                    }
                    terms.push(Term::Call(name, args));
                    Some(())
                }
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn recognises_rbac() {
        let shape = recognise(
            "g(r_sub, p_sub) && r_obj == p_obj && r_act == p_act",
            &names(&["r_sub", "r_obj", "r_act"]),
            &names(&["p_sub", "p_obj", "p_act"]),
            2,
        );
        assert_eq!(
            shape,
            Some(Shape {
                equalities: vec![(1, 1), (2, 2)],
                role: Some(RoleTerm {
                    subject: 0,
                    role: 0,
                    domain: None
                }),
            })
        );
    }

    #[test]
    fn recognises_domains_through_either_side() {
        let r = names(&["r_sub", "r_dom", "r_obj", "r_act"]);
        let p = names(&["p_sub", "p_dom", "p_obj", "p_act"]);
        for matcher in [
            "g(r_sub, p_sub, r_dom) && r_dom == p_dom && r_obj == p_obj && r_act == p_act",
            "(p_dom == r_dom && g(r_sub, p_sub, p_dom)) && r_obj == p_obj && r_act == p_act",
        ] {
            let shape = recognise(matcher, &r, &p, 3).expect(matcher);
            assert_eq!(shape.role.map(|g| g.domain), Some(Some(1)), "{matcher}");
        }
    }

    #[test]
    fn rejects_anything_else() {
        let r = names(&["r_sub", "r_obj", "r_act"]);
        let p = names(&["p_sub", "p_obj", "p_act"]);
        for matcher in [
            "g(r_sub, p_sub) && keyMatch(r_obj, p_obj) && r_act == p_act",
            "g(r_sub, p_sub) && r_obj == p_obj || r_sub == p_sub",
            "g(r_sub, p_sub) && r_obj == \"x\"",
            "g(r_sub, p_sub, r_obj) && r_obj == p_obj",
            "g(p_sub, r_sub) && r_obj == p_obj",
            "r_sub == r_obj",
            "g(r_sub, p_sub) && g(r_sub, p_obj)",
            "g(r_sub, p_sub) && !(r_obj == p_obj)",
            "g(r_sub, p_sub) && r_obj == p_missing",
        ] {
            assert_eq!(recognise(matcher, &r, &p, 2), None, "{matcher}");
        }
    }
}
