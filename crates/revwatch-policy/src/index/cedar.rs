//! Index for Cedar policy sets.
//!
//! Cedar evaluates a policy as `principal scope && action scope && resource scope && conditions`,
//! left to right and short-circuiting, so a policy whose scope does not hold for a request is
//! neither satisfied nor erroring: it cannot change the response. A scope only compares entity
//! uids, entity types and the request's ancestors in the entity store, so the index can decide it
//! exactly, with the same data Cedar's `in` uses ([`Entities::ancestors`]).
//!
//! At build time every policy is filed in one bucket per scope it accepts (one per entity of an
//! `action in [..]` list). A request enumerates the few scopes that hold for it (its principal,
//! action and resource, their ancestors, their types, "any"), and visits only those buckets.
//! Policies without `when`/`unless` are satisfied by their scope alone; the rest are evaluated by
//! Cedar's own [`Authorizer`], one precompiled single-policy set each, so errors and skipped
//! policies are reported exactly as the full evaluation reports them.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use cedar_policy::{
    ActionConstraint, Authorizer, Decision, Effect, Entities, EntityTypeName, EntityUid, Policy,
    PolicyId, PolicySet, PrincipalConstraint, Request, ResourceConstraint, Response,
};
use smallvec::SmallVec;

use super::PersistentMap;

/// Dimension ids are packed three to a `u64` bucket key.
const DIMENSION_BITS: u32 = 21;
const MAX_DIMENSIONS: usize = 1 << DIMENSION_BITS;

/// Scope candidates of one request component; a few fit on the stack.
type Candidates = SmallVec<[u32; 8]>;

/// A Cedar policy set prepared for fast decisions.
///
/// [`CedarIndex::is_authorized`] returns the same decision, the same determining policy ids and
/// the same evaluation errors as `Authorizer::new().is_authorized(request, &set, entities)`.
///
/// The index is persistent: [`CedarIndex::with_changes`] shares every unchanged policy and
/// bucket with the index it starts from, so changing a few policies of a large set costs
/// O(changed), not O(set).
#[derive(Debug, Clone)]
pub struct CedarIndex {
    /// The full set, for requests whose components are not all known and for sets the index
    /// cannot represent. Given by [`CedarIndex::build`]; after [`CedarIndex::with_changes`]
    /// assembled from the indexed policies on first use (decisions of complete requests never
    /// need it).
    full: OnceLock<PolicySet>,
    authorizer: Authorizer,
    /// `None` when the set could not be indexed (see [`CedarIndex::is_indexed`]).
    index: Option<ScopeIndex>,
}

impl CedarIndex {
    /// Prepares `set`. Never fails: a set the index cannot represent is decided by the full
    /// evaluation, which [`CedarIndex::is_indexed`] reports.
    pub fn build(set: &PolicySet) -> CedarIndex {
        CedarIndex::from_set(set.clone())
    }

    /// As [`CedarIndex::build`], taking the set (no copy of it).
    pub fn from_set(set: PolicySet) -> CedarIndex {
        let index = ScopeIndex::build(&set);
        CedarIndex {
            full: OnceLock::from(set),
            authorizer: Authorizer::new(),
            index,
        }
    }

    /// This index without its copy of the full set when the index decides every complete
    /// request (the set is assembled again if a partial request needs it). A compiler keeps
    /// indexes this way so that the activation replacing one later does not free a whole
    /// set on its path.
    pub fn without_set(mut self) -> CedarIndex {
        if self.index.as_ref().is_some_and(|i| !i.has_templates) {
            self.full = OnceLock::new();
        }
        self
    }

    /// This index without the policies `removed` (by id) and with the static policies
    /// `added`, deciding exactly as [`CedarIndex::build`] on the resulting set would. The
    /// unchanged policies keep their buckets, shared with this index: the cost is O(changed).
    /// `None` (build the index instead) when this index is not indexed or holds template
    /// links, a removed id is unknown, an added id is already in the set, an added policy is
    /// template-linked, or the scope ids no longer fit a bucket key.
    pub fn with_changes<'p>(
        &self,
        removed: impl IntoIterator<Item = &'p PolicyId>,
        added: impl IntoIterator<Item = &'p Policy>,
    ) -> Option<CedarIndex> {
        let mut index = self.index.clone()?;
        if index.has_templates {
            return None;
        }
        for id in removed {
            index.remove(id)?;
        }
        for policy in added {
            if policy.template_id().is_some() {
                return None;
            }
            index.add(None, policy)?;
        }
        if !index.fits() {
            return None;
        }
        Some(CedarIndex {
            full: OnceLock::new(),
            authorizer: Authorizer::new(),
            index: Some(index),
        })
    }

    /// Whether decisions use the index (`false`: every request evaluates the full set).
    pub fn is_indexed(&self) -> bool {
        self.index.is_some()
    }

    /// Number of policies (static and template-linked) in the set.
    pub fn len(&self) -> usize {
        match &self.index {
            Some(index) => index.policies.len(),
            None => self.policy_set().policies().count(),
        }
    }

    /// Whether the set has no policies.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The policy set this index decides (assembled on first call after
    /// [`CedarIndex::with_changes`]: O(set) once).
    pub fn policy_set(&self) -> &PolicySet {
        self.full.get_or_init(|| {
            let mut set = PolicySet::new();
            if let Some(index) = &self.index {
                // Ids are unique in the index and every policy is static (`with_changes`
                // refuses the rest), so no add can fail.
                for policy in index.policies.values() {
                    let _ = set.add(policy.policy.clone());
                }
            }
            set
        })
    }

    /// Decides `request` as Cedar's authorizer would on the whole set.
    pub fn is_authorized(&self, request: &Request, entities: &Entities) -> Response {
        let (Some(index), Some(principal), Some(action), Some(resource)) = (
            self.index.as_ref(),
            request.principal(),
            request.action(),
            request.resource(),
        ) else {
            return self
                .authorizer
                .is_authorized(request, self.policy_set(), entities);
        };
        let scopes = RequestScopes {
            principal: index
                .principal
                .candidates(principal, entities, &index.uids, &index.types),
            action: index
                .action
                .candidates(action, entities, &index.uids, &index.types),
            resource: index
                .resource
                .candidates(resource, entities, &index.uids, &index.types),
        };
        let mut outcome = Outcome::default();
        let mut conditioned: SmallVec<[&IndexedPolicy; 16]> = SmallVec::new();
        let mut conditioned_may_repeat = false;
        for &p in &scopes.principal {
            for &a in &scopes.action {
                for &r in &scopes.resource {
                    let Some(bucket) = index.buckets.get(&bucket_key(p, a, r)) else {
                        continue;
                    };
                    outcome.permits.extend(bucket.permits.iter().map(|p| &**p));
                    outcome.forbids.extend(bucket.forbids.iter().map(|p| &**p));
                    conditioned.extend(bucket.conditioned.iter().map(|p| &**p));
                    conditioned_may_repeat |= bucket.has_shared_conditioned;
                }
            }
        }
        if conditioned_may_repeat {
            conditioned.sort_unstable_by_key(|p| p.position);
            conditioned.dedup_by_key(|p| p.position);
        }
        let mut errors = Vec::new();
        for policy in conditioned {
            let Some(single) = &policy.single else {
                continue;
            };
            let response = self.authorizer.is_authorized(request, single, entities);
            errors.extend(response.diagnostics().errors().cloned());
            if response.diagnostics().reason().next().is_some() {
                match policy.effect {
                    Effect::Permit => outcome.permits.push(policy),
                    Effect::Forbid => outcome.forbids.push(policy),
                }
            }
        }
        outcome.into_response(errors)
    }
}

/// Satisfied policies of one request.
#[derive(Default)]
struct Outcome<'i> {
    permits: SmallVec<[&'i IndexedPolicy; 8]>,
    forbids: SmallVec<[&'i IndexedPolicy; 8]>,
}

impl Outcome<'_> {
    /// Cedar's rule: any satisfied forbid denies and is the reason; else any satisfied permit
    /// allows and is the reason; else the default deny has no reason.
    fn into_response(self, errors: Vec<cedar_policy::AuthorizationError>) -> Response {
        let (decision, determining) = if !self.forbids.is_empty() {
            (Decision::Deny, &self.forbids)
        } else if !self.permits.is_empty() {
            (Decision::Allow, &self.permits)
        } else {
            (Decision::Deny, &self.forbids)
        };
        let reason: HashSet<PolicyId> = determining.iter().map(|p| p.id.clone()).collect();
        Response::new(decision, reason, errors)
    }
}

struct RequestScopes {
    principal: Candidates,
    action: Candidates,
    resource: Candidates,
}

#[derive(Debug, Clone)]
struct ScopeIndex {
    /// Every entity uid named by a scope, interned (never forgotten: a stale id files nothing).
    uids: PersistentMap<EntityUid, u32>,
    /// Every entity type named by an `is` scope, interned.
    types: PersistentMap<EntityTypeName, u32>,
    principal: Dimension,
    action: Dimension,
    resource: Dimension,
    buckets: PersistentMap<u64, Arc<Bucket>>,
    /// Every policy of the set, by id.
    policies: PersistentMap<PolicyId, Arc<IndexedPolicy>>,
    /// The next policy's position (positions only order conditioned policies).
    next_position: u32,
    /// Whether the set holds templates (a delta would have to carry them).
    has_templates: bool,
}

#[derive(Debug)]
struct IndexedPolicy {
    /// Unique in its index; orders a request's conditioned policies.
    position: u32,
    id: PolicyId,
    effect: Effect,
    /// The policy, to assemble the full set when it is needed.
    policy: Policy,
    /// A set holding only this policy, for policies with conditions.
    single: Option<PolicySet>,
    /// The keys of the buckets it is filed in.
    keys: SmallVec<[u64; 1]>,
}

#[derive(Debug, Clone, Default)]
struct Bucket {
    /// Condition-free policies, satisfied whenever the bucket's scope holds.
    permits: Vec<Arc<IndexedPolicy>>,
    forbids: Vec<Arc<IndexedPolicy>>,
    /// Policies whose conditions Cedar must evaluate.
    conditioned: Vec<Arc<IndexedPolicy>>,
    /// Whether a conditioned policy here is (or was) filed in other buckets too (an
    /// `action in [..]` list), so one request may reach it twice.
    has_shared_conditioned: bool,
}

/// What a scope requires of one request component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Anchor {
    Any,
    /// `== uid`
    Eq(u32),
    /// `in uid`: equal to it or one of its descendants.
    In(u32),
}

/// A scope of one request component: an anchor and an optional `is` type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Scope {
    anchor: Anchor,
    entity_type: Option<u32>,
}

/// The distinct scopes used for one request component (principal, action or resource).
#[derive(Debug, Clone, Default)]
struct Dimension {
    ids: PersistentMap<Scope, u32>,
    /// Which kinds of scope occur (or occurred), so a request skips the lookups that cannot
    /// succeed.
    typed: bool,
    has_any: bool,
    has_eq: bool,
    has_in: bool,
}

impl Dimension {
    fn id(&mut self, scope: Scope) -> u32 {
        self.typed |= scope.entity_type.is_some();
        match scope.anchor {
            Anchor::Any => self.has_any = true,
            Anchor::Eq(_) => self.has_eq = true,
            Anchor::In(_) => self.has_in = true,
        }
        let next = u32::try_from(self.ids.len()).unwrap_or(u32::MAX);
        *self.ids.entry(scope).or_insert(next)
    }

    /// Ids of the scopes of this dimension that hold for `uid`.
    fn candidates(
        &self,
        uid: &EntityUid,
        entities: &Entities,
        uids: &PersistentMap<EntityUid, u32>,
        types: &PersistentMap<EntityTypeName, u32>,
    ) -> Candidates {
        let mut anchors: SmallVec<[Anchor; 8]> = SmallVec::new();
        if self.has_any {
            anchors.push(Anchor::Any);
        }
        if (self.has_eq || self.has_in)
            && let Some(&own) = uids.get(uid)
        {
            anchors.push(Anchor::Eq(own));
            anchors.push(Anchor::In(own));
        }
        // Cedar's `in`: equal, or an ancestor in the entity store (an entity missing from the
        // store has none).
        if self.has_in
            && let Some(ancestors) = entities.ancestors(uid)
        {
            anchors.extend(
                ancestors
                    .filter_map(|a| uids.get(a))
                    .map(|&a| Anchor::In(a)),
            );
        }
        let own_type = if self.typed {
            types.get(uid.type_name()).copied()
        } else {
            None
        };
        let mut found = Candidates::new();
        for anchor in anchors {
            for entity_type in [None, own_type] {
                if let Some(&id) = self.ids.get(&Scope {
                    anchor,
                    entity_type,
                }) {
                    found.push(id);
                }
                if own_type.is_none() {
                    break;
                }
            }
        }
        // An entity listed as its own ancestor would otherwise visit a bucket twice.
        found.sort_unstable();
        found.dedup();
        found
    }
}

fn bucket_key(principal: u32, action: u32, resource: u32) -> u64 {
    (u64::from(principal) << (2 * DIMENSION_BITS))
        | (u64::from(action) << DIMENSION_BITS)
        | u64::from(resource)
}

impl ScopeIndex {
    /// `None` when a single-policy set cannot be rebuilt or there are too many distinct scopes
    /// to pack; the caller then evaluates the full set.
    fn build(set: &PolicySet) -> Option<ScopeIndex> {
        let mut index = ScopeIndex {
            uids: PersistentMap::default(),
            types: PersistentMap::default(),
            principal: Dimension::default(),
            action: Dimension::default(),
            resource: Dimension::default(),
            buckets: PersistentMap::default(),
            policies: PersistentMap::default(),
            next_position: 0,
            has_templates: set.templates().next().is_some(),
        };
        for policy in set.policies() {
            index.add(Some(set), policy)?;
        }
        index.fits().then_some(index)
    }

    /// Whether every dimension's scope ids fit their share of a bucket key.
    fn fits(&self) -> bool {
        let widest = self
            .principal
            .ids
            .len()
            .max(self.action.ids.len())
            .max(self.resource.ids.len());
        widest < MAX_DIMENSIONS
    }

    /// Unfiles the policy `id`. `None` if unknown.
    fn remove(&mut self, id: &PolicyId) -> Option<()> {
        let policy = self.policies.remove(id)?;
        for key in &policy.keys {
            let bucket = self.buckets.get_mut(key)?;
            let bucket = Arc::make_mut(bucket);
            for list in [
                &mut bucket.permits,
                &mut bucket.forbids,
                &mut bucket.conditioned,
            ] {
                list.retain(|p| p.position != policy.position);
            }
            if bucket.permits.is_empty()
                && bucket.forbids.is_empty()
                && bucket.conditioned.is_empty()
            {
                self.buckets.remove(key);
            }
        }
        Some(())
    }

    /// Files `policy`; `set` holds its template when it is template-linked. `None` when its
    /// id is already filed or its single-policy set cannot be built.
    fn add(&mut self, set: Option<&PolicySet>, policy: &Policy) -> Option<()> {
        if self.policies.contains_key(policy.id()) {
            return None;
        }
        let position = self.next_position;
        self.next_position = position.checked_add(1)?;
        let conditioned = policy.has_non_scope_constraint();
        let single = if conditioned {
            Some(single_policy_set(set, policy)?)
        } else {
            None
        };

        let principal = match policy.principal_constraint() {
            PrincipalConstraint::Any => self.scope(Anchor::Any, None),
            PrincipalConstraint::Eq(uid) => self.uid_scope(uid, false, None),
            PrincipalConstraint::In(uid) => self.uid_scope(uid, true, None),
            PrincipalConstraint::Is(t) => self.scope(Anchor::Any, Some(t)),
            PrincipalConstraint::IsIn(t, uid) => self.uid_scope(uid, true, Some(t)),
        };
        let resource = match policy.resource_constraint() {
            ResourceConstraint::Any => self.scope(Anchor::Any, None),
            ResourceConstraint::Eq(uid) => self.uid_scope(uid, false, None),
            ResourceConstraint::In(uid) => self.uid_scope(uid, true, None),
            ResourceConstraint::Is(t) => self.scope(Anchor::Any, Some(t)),
            ResourceConstraint::IsIn(t, uid) => self.uid_scope(uid, true, Some(t)),
        };
        // `action in []` holds for no request: such a policy is filed nowhere.
        let mut actions: SmallVec<[Scope; 4]> = match policy.action_constraint() {
            ActionConstraint::Any => [self.scope(Anchor::Any, None)].into_iter().collect(),
            ActionConstraint::Eq(uid) => [self.uid_scope(uid, false, None)].into_iter().collect(),
            ActionConstraint::In(list) => list
                .into_iter()
                .map(|uid| self.uid_scope(uid, true, None))
                .collect(),
        };
        actions.sort_unstable();
        actions.dedup();

        let principal = self.principal.id(principal);
        let resource = self.resource.id(resource);
        let shared = actions.len() > 1;
        let keys: SmallVec<[u64; 1]> = actions
            .into_iter()
            .map(|action| bucket_key(principal, self.action.id(action), resource))
            .collect();
        let indexed = Arc::new(IndexedPolicy {
            position,
            id: policy.id().clone(),
            effect: policy.effect(),
            policy: policy.clone(),
            single,
            keys,
        });
        for key in &indexed.keys {
            let bucket = Arc::make_mut(self.buckets.entry(*key).or_default());
            match (conditioned, indexed.effect) {
                (true, _) => {
                    bucket.conditioned.push(Arc::clone(&indexed));
                    bucket.has_shared_conditioned |= shared;
                }
                (false, Effect::Permit) => bucket.permits.push(Arc::clone(&indexed)),
                (false, Effect::Forbid) => bucket.forbids.push(Arc::clone(&indexed)),
            }
        }
        self.policies.insert(indexed.id.clone(), indexed);
        Some(())
    }

    fn scope(&mut self, anchor: Anchor, entity_type: Option<EntityTypeName>) -> Scope {
        let entity_type = entity_type.map(|t| {
            let next = u32::try_from(self.types.len()).unwrap_or(u32::MAX);
            *self.types.entry(t).or_insert(next)
        });
        Scope {
            anchor,
            entity_type,
        }
    }

    fn uid_scope(&mut self, uid: EntityUid, is_in: bool, t: Option<EntityTypeName>) -> Scope {
        let next = u32::try_from(self.uids.len()).unwrap_or(u32::MAX);
        let id = *self.uids.entry(uid).or_insert(next);
        let anchor = if is_in {
            Anchor::In(id)
        } else {
            Anchor::Eq(id)
        };
        self.scope(anchor, t)
    }
}

/// A set with only `policy` (and its template, from `set`, when it is linked), keeping its id.
fn single_policy_set(set: Option<&PolicySet>, policy: &Policy) -> Option<PolicySet> {
    let mut single = PolicySet::new();
    match (policy.template_id(), policy.template_links()) {
        (Some(template_id), Some(links)) => {
            let template = set?.template(template_id)?.clone();
            single.add_template(template).ok()?;
            single
                .link(template_id.clone(), policy.id().clone(), links)
                .ok()?;
        }
        _ => single.add(policy.clone()).ok()?,
    }
    Some(single)
}
