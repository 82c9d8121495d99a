//! Random Cedar worlds: users in nested groups, actions in nested action groups, documents in
//! nested folders; static policies and template links, permits and forbids, every scope form
//! (`==`, `in`, `is`, `is .. in`, action lists), and conditions that hold, fail or error.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Entities, EntityUid, PolicyId, PolicySet, Request, SlotId,
};
use serde_json::{Value, json};

use super::rng::Rng;
use super::{Mismatch, Mismatches, cedar_outcome, worlds};
use crate::index::cedar::CedarIndex;

/// Decides `requests` random requests with [`CedarIndex`] and with Cedar's authorizer on the
/// whole set, and reports every difference in decision, determining policies or errors.
pub fn differential_cedar(seed: u64, requests: usize) -> Mismatches {
    let mut out = Mismatches::default();
    let authorizer = Authorizer::new();
    for (world_number, count) in worlds(requests) {
        let mut rng = Rng::derive(seed, world_number as u64);
        let world = World::draw(&mut rng);
        out.worlds += 1;
        let Some((set, entities)) = world.compile() else {
            // A generator bug, not an index bug: report it so it cannot pass silently.
            out.record(|| Mismatch {
                seed,
                world: world_number,
                request: 0,
                input: "world did not compile".into(),
                indexed: String::new(),
                engine: String::new(),
                rules: world.describe(),
            });
            continue;
        };
        let index = CedarIndex::build(&set);
        if !index.is_indexed() {
            out.fallback_worlds += 1;
        }
        for request_number in 0..count {
            let Some((request, input)) = world.request(&mut rng) else {
                out.record(|| Mismatch {
                    seed,
                    world: world_number,
                    request: request_number,
                    input: "request did not build".into(),
                    indexed: String::new(),
                    engine: String::new(),
                    rules: world.describe(),
                });
                continue;
            };
            out.requests += 1;
            let indexed = cedar_outcome(&index.is_authorized(&request, &entities));
            let engine = cedar_outcome(&authorizer.is_authorized(&request, &set, &entities));
            if indexed != engine {
                out.record(|| Mismatch {
                    seed,
                    world: world_number,
                    request: request_number,
                    input,
                    indexed,
                    engine,
                    rules: world.describe(),
                });
            }
        }
    }
    out
}

struct World {
    users: usize,
    groups: usize,
    actions: usize,
    action_groups: usize,
    docs: usize,
    folders: usize,
    entities: Value,
    policies: String,
    /// `(template position, link id, principal, resource)`
    links: Vec<(usize, String, String, String)>,
}

impl World {
    fn draw(rng: &mut Rng) -> World {
        let mut world = World {
            users: 3 + rng.below(10),
            groups: 1 + rng.below(6),
            actions: 2 + rng.below(4),
            action_groups: 1 + rng.below(3),
            docs: 2 + rng.below(8),
            folders: 1 + rng.below(4),
            entities: Value::Null,
            policies: String::new(),
            links: Vec::new(),
        };
        world.entities = world.draw_entities(rng);
        let statics = 1 + rng.below(40);
        let templates = rng.below(3);
        for _ in 0..statics {
            let policy = world.draw_policy(rng, false);
            world.policies.push_str(&policy);
        }
        for t in 0..templates {
            let policy = world.draw_policy(rng, true);
            world.policies.push_str(&policy);
            for l in 0..1 + rng.below(3) {
                let principal = if rng.chance(70) {
                    world.group(rng)
                } else {
                    world.user(rng)
                };
                let resource = if rng.chance(50) {
                    world.folder(rng)
                } else {
                    world.doc(rng)
                };
                world
                    .links
                    .push((statics + t, format!("link{t}-{l}"), principal, resource));
            }
        }
        world
    }

    fn user(&self, rng: &mut Rng) -> String {
        format!(r#"User::"u{}""#, rng.below(self.users))
    }
    fn group(&self, rng: &mut Rng) -> String {
        format!(r#"Group::"g{}""#, rng.below(self.groups))
    }
    fn action(&self, rng: &mut Rng) -> String {
        format!(r#"Action::"a{}""#, rng.below(self.actions))
    }
    fn action_group(&self, rng: &mut Rng) -> String {
        format!(r#"Action::"ag{}""#, rng.below(self.action_groups))
    }
    fn doc(&self, rng: &mut Rng) -> String {
        format!(r#"Doc::"d{}""#, rng.below(self.docs))
    }
    fn folder(&self, rng: &mut Rng) -> String {
        format!(r#"Folder::"f{}""#, rng.below(self.folders))
    }

    fn draw_entities(&self, rng: &mut Rng) -> Value {
        let uid = |t: &str, id: String| json!({"type": t, "id": id});
        // Parents only among lower numbers keeps every hierarchy acyclic.
        let parents = |rng: &mut Rng, t: &str, prefix: &str, below: usize, max: usize| {
            let mut list = Vec::new();
            for _ in 0..rng.below(max + 1) {
                if below > 0 {
                    list.push(uid(t, format!("{prefix}{}", rng.below(below))));
                }
            }
            Value::Array(list)
        };
        let mut all = Vec::new();
        for g in 0..self.groups {
            let p = parents(rng, "Group", "g", g, 2);
            all.push(json!({"uid": uid("Group", format!("g{g}")), "attrs": {}, "parents": p}));
        }
        for u in 0..self.users {
            let p = parents(rng, "Group", "g", self.groups, 2);
            let mut attrs = json!({});
            if rng.chance(80) {
                attrs["level"] = json!(rng.below(5));
            }
            all.push(json!({"uid": uid("User", format!("u{u}")), "attrs": attrs, "parents": p}));
        }
        for a in 0..self.action_groups {
            let p = parents(rng, "Action", "ag", a, 1);
            all.push(json!({"uid": uid("Action", format!("ag{a}")), "attrs": {}, "parents": p}));
        }
        for a in 0..self.actions {
            let p = parents(rng, "Action", "ag", self.action_groups, 2);
            all.push(json!({"uid": uid("Action", format!("a{a}")), "attrs": {}, "parents": p}));
        }
        for f in 0..self.folders {
            let p = parents(rng, "Folder", "f", f, 1);
            all.push(json!({"uid": uid("Folder", format!("f{f}")), "attrs": {}, "parents": p}));
        }
        for d in 0..self.docs {
            let p = parents(rng, "Folder", "f", self.folders, 2);
            let owner = format!("u{}", rng.below(self.users));
            let attrs =
                json!({"owner": {"__entity": uid("User", owner)}, "public": rng.chance(50)});
            all.push(json!({"uid": uid("Doc", format!("d{d}")), "attrs": attrs, "parents": p}));
        }
        Value::Array(all)
    }

    fn draw_policy(&self, rng: &mut Rng, template: bool) -> String {
        let effect = if rng.chance(70) { "permit" } else { "forbid" };
        let principal = if template {
            if rng.chance(50) {
                "principal == ?principal".to_string()
            } else {
                "principal in ?principal".to_string()
            }
        } else {
            match rng.below(9) {
                0 | 1 => "principal".to_string(),
                2 => format!("principal == {}", self.user(rng)),
                3 | 4 => format!("principal in {}", self.group(rng)),
                5 => format!("principal == {}", self.group(rng)),
                6 => "principal is User".to_string(),
                7 => format!("principal is User in {}", self.group(rng)),
                _ => format!("principal in {}", self.user(rng)),
            }
        };
        let action = match rng.below(6) {
            0 => "action".to_string(),
            1 | 2 => format!("action == {}", self.action(rng)),
            3 => format!(
                "action in [{}, {}]",
                self.action(rng),
                self.action_group(rng)
            ),
            4 => format!("action in {}", self.action_group(rng)),
            _ => format!("action in [{}]", self.action(rng)),
        };
        let resource = if template {
            "resource in ?resource".to_string()
        } else {
            match rng.below(8) {
                0 | 1 => "resource".to_string(),
                2 => format!("resource == {}", self.doc(rng)),
                3 | 4 => format!("resource in {}", self.folder(rng)),
                5 => "resource is Doc".to_string(),
                6 => format!("resource is Doc in {}", self.folder(rng)),
                _ => format!("resource == {}", self.folder(rng)),
            }
        };
        let condition = if rng.chance(35) {
            *rng.pick(&[
                " when { principal has level && principal.level >= 2 }",
                // Errors for principals without `level` (groups, unknown users).
                " when { principal.level >= 3 }",
                // Errors for folders and unknown resources.
                " when { resource.public }",
                " unless { context.hour < 9 }",
                " when { resource has owner && resource.owner == principal }",
                " when { context.hour > 100 }",
                // Overflows (an error) whenever the hour is positive.
                " when { 9223372036854775807 + context.hour > 0 }",
            ])
        } else {
            ""
        };
        let annotation = if rng.chance(30) {
            format!("@id(\"a{}\") ", rng.below(1000))
        } else {
            String::new()
        };
        format!("{annotation}{effect}({principal}, {action}, {resource}){condition};\n")
    }

    fn compile(&self) -> Option<(PolicySet, Entities)> {
        let mut set = PolicySet::from_str(&self.policies).ok()?;
        for (template, id, principal, resource) in &self.links {
            let values = HashMap::from([
                (SlotId::principal(), EntityUid::from_str(principal).ok()?),
                (SlotId::resource(), EntityUid::from_str(resource).ok()?),
            ]);
            set.link(
                PolicyId::new(format!("policy{template}")),
                PolicyId::new(id),
                values,
            )
            .ok()?;
        }
        let entities = Entities::from_json_value(self.entities.clone(), None).ok()?;
        Some((set, entities))
    }

    fn request(&self, rng: &mut Rng) -> Option<(Request, String)> {
        let principal = match rng.below(10) {
            0 => r#"User::"ghost""#.to_string(),
            1 => self.group(rng),
            _ => self.user(rng),
        };
        let action = match rng.below(12) {
            0 => r#"Action::"ghost""#.to_string(),
            1 => self.action_group(rng),
            _ => self.action(rng),
        };
        let resource = match rng.below(10) {
            0 => r#"Doc::"ghost""#.to_string(),
            1 | 2 => self.folder(rng),
            _ => self.doc(rng),
        };
        let hour = rng.below(24) as i64 - 1;
        let input = format!("{principal} {action} {resource} hour={hour}");
        let context = Context::from_json_value(json!({"hour": hour}), None).ok()?;
        let request = Request::new(
            EntityUid::from_str(&principal).ok()?,
            EntityUid::from_str(&action).ok()?,
            EntityUid::from_str(&resource).ok()?,
            context,
            None,
        )
        .ok()?;
        Some((request, input))
    }

    fn describe(&self) -> String {
        let mut text = self.policies.clone();
        for (template, id, principal, resource) in &self.links {
            let _ = writeln!(
                text,
                "// link {id} = policy{template}[?principal={principal}, ?resource={resource}]"
            );
        }
        let _ = write!(text, "// entities: {}", self.entities);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_worlds_compile() {
        for world in 0..50 {
            let mut rng = Rng::derive(7, world);
            let world = World::draw(&mut rng);
            assert!(world.compile().is_some(), "{}", world.describe());
            assert!(world.request(&mut rng).is_some());
        }
    }
}
