//! Which roles a subject holds, exactly as casbin's `DefaultRoleManager::has_link` answers.
//!
//! `has_link(user, role, domain)` walks the links of that domain breadth first from `user`, but
//! stops after its depth counter reaches the enforcer's maximum hierarchy level (10). That
//! counter grows by one each time the walk's queue drains, which happens at most once per BFS
//! level, so a subject whose farthest reachable role is at most `MAX_HIERARCHY_LEVEL - 1` links
//! away reaches everything. For deeper subjects the result depends on casbin's edge order, so
//! the index asks casbin's own role manager (fed the same links in the same order).

use std::collections::VecDeque;

use casbin::{DefaultRoleManager, RoleManager};

/// The role manager `casbin::Enforcer` creates (`DefaultRoleManager::new(10)`).
pub(super) const MAX_HIERARCHY_LEVEL: usize = 10;

/// `(domain, user)` by interned name; the domain is `None` for a `g = _, _` definition.
pub(super) type Holder = (Option<u32>, u32);

/// The links of one role definition, in the enforcer's load order.
#[derive(Default)]
pub(super) struct RoleGraph {
    /// `(user, role, domain)` by interned name; `domain` is `None` for a `g = _, _` definition.
    links: Vec<(u32, u32, Option<u32>)>,
}

impl RoleGraph {
    pub(super) fn add_link(&mut self, user: u32, role: u32, domain: Option<u32>) {
        // casbin ignores a link from a name to itself (`add_link` returns before creating nodes).
        if user != role {
            self.links.push((user, role, domain));
        }
    }

    /// For every `(domain, user)` with at least one link, the roles `has_link` grants it (the
    /// user itself excluded), restricted to names `keep` accepts.
    pub(super) fn closures(
        &self,
        name_of: &dyn Fn(u32) -> String,
        keep: &dyn Fn(u32) -> bool,
    ) -> Vec<(Holder, Vec<u32>)> {
        let mut adjacency: foldhash::HashMap<Holder, Vec<u32>> = foldhash::HashMap::default();
        for &(user, role, domain) in &self.links {
            let next = adjacency.entry((domain, user)).or_default();
            if !next.contains(&role) {
                next.push(role);
            }
        }
        let mut casbin_manager: Option<DefaultRoleManager> = None;
        let mut out = Vec::with_capacity(adjacency.len());
        for &(domain, user) in adjacency.keys() {
            let (reached, farthest) = reach(&adjacency, domain, user);
            let mut roles: Vec<u32> = reached.into_iter().filter(|&r| keep(r)).collect();
            if farthest >= MAX_HIERARCHY_LEVEL {
                let manager = casbin_manager.get_or_insert_with(|| self.casbin_manager(name_of));
                let domain_name = domain.map(name_of);
                let user_name = name_of(user);
                roles.retain(|&role| {
                    manager.has_link(&user_name, &name_of(role), domain_name.as_deref())
                });
            }
            roles.sort_unstable();
            out.push(((domain, user), roles));
        }
        out
    }

    fn casbin_manager(&self, name_of: &dyn Fn(u32) -> String) -> DefaultRoleManager {
        let mut manager = DefaultRoleManager::new(MAX_HIERARCHY_LEVEL);
        for &(user, role, domain) in &self.links {
            let domain = domain.map(name_of);
            manager.add_link(&name_of(user), &name_of(role), domain.as_deref());
        }
        manager
    }
}

/// Everything reachable from `user` (itself excluded) and the largest BFS distance.
fn reach(
    adjacency: &foldhash::HashMap<Holder, Vec<u32>>,
    domain: Option<u32>,
    user: u32,
) -> (Vec<u32>, usize) {
    let mut seen: foldhash::HashSet<u32> = foldhash::HashSet::default();
    seen.insert(user);
    let mut queue = VecDeque::from([(user, 0usize)]);
    let mut reached = Vec::new();
    let mut farthest = 0;
    while let Some((node, distance)) = queue.pop_front() {
        farthest = farthest.max(distance);
        for &next in adjacency
            .get(&(domain, node))
            .map_or(&[][..], Vec::as_slice)
        {
            if seen.insert(next) {
                reached.push(next);
                queue.push_back((next, distance + 1));
            }
        }
    }
    (reached, farthest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(len: u32) -> RoleGraph {
        let mut graph = RoleGraph::default();
        for i in 0..len {
            graph.add_link(i, i + 1, None);
        }
        graph
    }

    fn roles_of(graph: &RoleGraph, user: u32) -> Vec<u32> {
        let name_of = |id: u32| format!("n{id}");
        graph
            .closures(&name_of, &|_| true)
            .into_iter()
            .find(|((_, u), _)| *u == user)
            .map(|(_, roles)| roles)
            .unwrap_or_default()
    }

    #[test]
    fn shallow_chains_reach_everything() {
        assert_eq!(roles_of(&chain(9), 0), (1..=9).collect::<Vec<_>>());
    }

    #[test]
    fn deep_chains_stop_where_casbin_stops() {
        // casbin yields the start and nine more links of a chain before its counter reaches 10.
        assert_eq!(roles_of(&chain(14), 0), (1..=9).collect::<Vec<_>>());
        assert_eq!(roles_of(&chain(14), 5), (6..=14).collect::<Vec<_>>());
    }

    #[test]
    fn self_links_are_ignored() {
        let mut graph = RoleGraph::default();
        graph.add_link(3, 3, None);
        assert!(graph.closures(&|id| id.to_string(), &|_| true).is_empty());
    }

    #[test]
    fn domains_are_separate() {
        let mut graph = RoleGraph::default();
        graph.add_link(0, 1, Some(7));
        graph.add_link(1, 2, Some(8));
        assert_eq!(roles_of(&graph, 0), vec![1]);
    }
}
