//! Random casbin worlds: RBAC and RBAC-with-domains models under each of casbin's four effects,
//! random `p` rows (allow, deny and unknown effects, repeated rows) and `g` links (nested roles,
//! cycles, self links, a chain deeper than casbin's hierarchy limit), plus models with a matcher
//! the index must decline.

use std::fmt::Write as _;

use casbin::CoreApi;

use super::rng::Rng;
use super::{Mismatch, Mismatches, worlds};
use crate::index::casbin::{CasbinIndex, Row, plain_enforcer};

/// Decides `requests` random requests with [`CasbinIndex`] and with `casbin::Enforcer::enforce_ex`
/// on the same model and rows, and reports every difference in decision or explaining rows.
pub fn differential_casbin(seed: u64, requests: usize) -> Mismatches {
    let mut out = Mismatches::default();
    for (world_number, count) in worlds(requests) {
        let mut rng = Rng::derive(seed, world_number as u64);
        let world = World::draw(&mut rng);
        out.worlds += 1;
        let mismatch = |request: usize, input: String, indexed: String, engine: String| Mismatch {
            seed,
            world: world_number,
            request,
            input,
            indexed,
            engine,
            rules: world.describe(),
        };
        let engine =
            match futures::executor::block_on(plain_enforcer(&world.model_text, &world.rows)) {
                Ok(engine) => engine,
                Err(error) => {
                    out.record(|| {
                        mismatch(
                            0,
                            "engine did not load".into(),
                            String::new(),
                            error.to_string(),
                        )
                    });
                    continue;
                }
            };
        let index = CasbinIndex::build(&world.model_text, &world.rows);
        match (&index, world.indexable) {
            (Some(_), true) => {}
            (None, false) => out.fallback_worlds += 1,
            (built, _) => {
                let said = if built.is_some() {
                    "indexed"
                } else {
                    "declined"
                };
                out.record(|| mismatch(0, "model recognition".into(), said.into(), String::new()));
                continue;
            }
        }
        for request_number in 0..count {
            let request = world.request(&mut rng);
            let fields: Vec<&str> = request.iter().map(String::as_str).collect();
            out.requests += 1;
            let engine_answer = match engine.enforce_ex(fields.clone()) {
                Ok((allowed, rows)) => format!("{allowed} {rows:?}"),
                Err(casbin::Error::RequestError(
                    casbin::error::RequestError::UnmatchRequestDefinition(expected, got),
                )) => format!("arity error {expected} {got}"),
                Err(error) => format!("error {error}"),
            };
            // A declined world is decided by the engine alone, as the caller would.
            let Some(index) = &index else {
                continue;
            };
            let indexed_answer = match index.enforce(&fields) {
                Ok(decision) => {
                    let rows: Vec<&Vec<String>> = decision
                        .explain
                        .iter()
                        .map(|&at| &world.rows[at].values)
                        .collect();
                    format!("{} {rows:?}", decision.allowed)
                }
                Err(error) => format!("arity error {} {}", error.expected, error.got),
            };
            if indexed_answer != engine_answer {
                out.record(|| {
                    mismatch(
                        request_number,
                        format!("{request:?}"),
                        indexed_answer,
                        engine_answer,
                    )
                });
            }
        }
    }
    out
}

const EFFECTS: [&str; 4] = [
    "some(where (p.eft == allow))",
    "!some(where (p.eft == deny))",
    "some(where (p.eft == allow)) && !some(where (p.eft == deny))",
    "priority(p.eft) || deny",
];

/// Matchers casbin's index recognises, over `sub, obj, act`.
const RBAC_MATCHERS: [&str; 3] = [
    "g(r.sub, p.sub) && r.obj == p.obj && r.act == p.act",
    "r.obj == p.obj && p.act == r.act && g(r.sub, p.sub)",
    "(g(r.sub, p.sub) && r.obj == p.obj) && r.act == p.act",
];

/// Matchers over `sub, dom, obj, act` with a domain role check.
const DOMAIN_MATCHERS: [&str; 2] = [
    "g(r.sub, p.sub, r.dom) && r.dom == p.dom && r.obj == p.obj && r.act == p.act",
    "g(r.sub, p.sub, p.dom) && r.obj == p.obj && r.dom == p.dom && r.act == p.act",
];

/// Matchers the index must decline (the caller then uses the engine).
const OTHER_MATCHERS: [&str; 2] = [
    "g(r.sub, p.sub) && keyMatch(r.obj, p.obj) && r.act == p.act",
    "g(r.sub, p.sub) && r.obj == p.obj && r.act == p.act || r.sub == \"root\"",
];

struct World {
    model_text: String,
    domains: bool,
    indexable: bool,
    users: usize,
    roles: usize,
    objects: usize,
    rows: Vec<Row>,
}

const ACTIONS: [&str; 3] = ["read", "write", "delete"];
/// Longer than casbin's hierarchy limit (10).
const CHAIN: usize = 14;

impl World {
    fn draw(rng: &mut Rng) -> World {
        let domains = rng.chance(35);
        let indexable = !rng.chance(8);
        let with_effect = rng.chance(75);
        let effect = if with_effect {
            *rng.pick(&EFFECTS)
        } else {
            EFFECTS[0]
        };
        let matcher = match (indexable, domains) {
            (false, _) => *rng.pick(&OTHER_MATCHERS),
            (true, true) => *rng.pick(&DOMAIN_MATCHERS),
            (true, false) => *rng.pick(&RBAC_MATCHERS),
        };
        let domains = domains && indexable;
        let (request, policy, role) = if domains {
            ("sub, dom, obj, act", "sub, dom, obj, act", "_, _, _")
        } else {
            ("sub, obj, act", "sub, obj, act", "_, _")
        };
        let eft = if with_effect { ", eft" } else { "" };
        let model_text = format!(
            "[request_definition]\nr = {request}\n\n[policy_definition]\np = {policy}{eft}\n\n\
             [role_definition]\ng = {role}\n\n[policy_effect]\ne = {effect}\n\n[matchers]\nm = {matcher}\n"
        );
        let mut world = World {
            model_text,
            domains,
            indexable,
            users: 3 + rng.below(20),
            roles: 1 + rng.below(8),
            objects: 1 + rng.below(8),
            rows: Vec::new(),
        };
        world.draw_rows(rng, with_effect);
        world
    }

    fn subject(&self, rng: &mut Rng) -> String {
        match rng.below(10) {
            0..=2 => format!("u{}", rng.below(self.users)),
            3 => format!("c{}", rng.below(CHAIN + 1)),
            _ => format!("r{}", rng.below(self.roles)),
        }
    }

    fn domain(&self, rng: &mut Rng) -> String {
        format!("d{}", rng.below(3))
    }

    fn draw_rows(&mut self, rng: &mut Rng, with_effect: bool) {
        let mut rows: Vec<Row> = Vec::new();
        let p_rows = if rng.chance(5) { 0 } else { 1 + rng.below(60) };
        for _ in 0..p_rows {
            if !rows.is_empty() && rng.chance(6) {
                // casbin drops the repeat and moves the kept copy to the back.
                let again: Row = rows[rng.below(rows.len())].clone();
                rows.push(again);
                continue;
            }
            let mut values = vec![self.subject(rng)];
            if self.domains {
                values.push(self.domain(rng));
            }
            values.push(format!("o{}", rng.below(self.objects)));
            values.push(rng.pick(&ACTIONS).to_string());
            if with_effect {
                let eft = match rng.below(20) {
                    0..=12 => "allow",
                    13..=18 => "deny",
                    _ => "maybe",
                };
                values.push(eft.to_string());
            }
            rows.push(Row::new("p", values));
        }
        let link = |rng: &mut Rng, rows: &mut Vec<Row>, user: String, role: String| {
            let mut values = vec![user, role];
            if self.domains {
                values.push(self.domain(rng));
            }
            rows.push(Row::new("g", values));
        };
        for _ in 0..rng.below(3 * self.users) {
            let user = format!("u{}", rng.below(self.users));
            let role = format!("r{}", rng.below(self.roles));
            link(rng, &mut rows, user, role);
        }
        for _ in 0..rng.below(2 * self.roles) {
            // Role to role, cycles included.
            let (a, b) = (rng.below(self.roles), rng.below(self.roles));
            link(rng, &mut rows, format!("r{a}"), format!("r{b}"));
        }
        if rng.chance(40) {
            for c in 0..CHAIN {
                link(rng, &mut rows, format!("c{c}"), format!("c{}", c + 1));
            }
            // `u0` sits at the bottom of the chain; grants near its top test the depth limit.
            link(rng, &mut rows, "u0".into(), "c0".into());
            for c in CHAIN - 6..=CHAIN {
                let mut values = vec![format!("c{c}")];
                if self.domains {
                    values.push(self.domain(rng));
                }
                values.push(format!("o{}", rng.below(self.objects)));
                values.push(rng.pick(&ACTIONS).to_string());
                if with_effect {
                    values.push("allow".into());
                }
                rows.push(Row::new("p", values));
            }
        }
        if rng.chance(20) {
            let user = format!("u{}", rng.below(self.users));
            link(rng, &mut rows, user.clone(), user);
        }
        // Rows of both types interleave in a policy file.
        for i in (1..rows.len()).rev() {
            let j = rng.below(i + 1);
            rows.swap(i, j);
        }
        self.rows = rows;
    }

    fn request(&self, rng: &mut Rng) -> Vec<String> {
        if self.rows.iter().all(|r| r.ptype != "p") && rng.chance(30) {
            // Without rows casbin matches against empty policy fields.
            let len = if self.domains { 4 } else { 3 };
            return vec![String::new(); len];
        }
        let subject = match rng.below(12) {
            0 => "ghost".to_string(),
            1 => String::new(),
            2 => "u0".to_string(),
            _ => self.subject(rng),
        };
        let mut request = vec![subject];
        if self.domains {
            request.push(if rng.chance(5) {
                "nowhere".into()
            } else {
                self.domain(rng)
            });
        }
        request.push(if rng.chance(5) {
            "ghost".into()
        } else {
            format!("o{}", rng.below(self.objects))
        });
        request.push(rng.pick(&ACTIONS).to_string());
        if rng.chance(1) {
            request.pop();
        }
        request
    }

    fn describe(&self) -> String {
        let mut text = self.model_text.clone();
        for row in &self.rows {
            let _ = writeln!(text, "{}, {}", row.ptype, row.values.join(", "));
        }
        text
    }
}
