//! The policy scenarios, written once against a server's endpoints: a real etcd
//! (testkit) or the embedded server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use revwatch_policy::layout::Tree;
use revwatch_policy::publish::{Expect, publish};
use revwatch_policy::{
    Backend, Consistency, DecideError, DegradedReason, Effect, Limits, PolicyConfig, PolicyState,
    Request,
};
use serde_json::json;

use super::fixtures::{self, cedar_request};
use super::{WAIT, del, put, rejection_at, start, wait_ready, writer};

async fn put_tree(etcd: &revwatch::client::Client, prefix: &str, files: &[(&str, &str)]) -> i64 {
    let mut revision = 0;
    for (path, value) in files {
        revision = put(etcd, &format!("{prefix}{path}"), *value).await;
    }
    revision
}

/// Activation, decisions stamped with the active set's revision, read-your-writes
/// with `MinRevision` and `FullyConsistent`, and bad requests.
pub async fn activation_and_consistency(endpoints: Vec<String>) {
    const P: &str = "act/";
    let etcd = writer(endpoints.clone()).await;
    let r0 = put_tree(&etcd, P, &fixtures::cedar_tree()).await;
    let config = PolicyConfig::new(Backend::Cedar).fresh_wait(Duration::from_secs(2));
    let policies = start(endpoints, P, config).await;
    let set = policies.wait_for_revision(r0, WAIT).await.unwrap();
    assert!(set.revision >= r0);

    let d = policies.decide(&cedar_request()).unwrap();
    assert_eq!(d.effect, Effect::Allow);
    assert_eq!(d.policy_ids, ["admins-read"]);
    assert!(d.revision >= r0);
    assert!(d.revision <= policies.active().unwrap().revision);
    wait_ready(&policies).await;
    let status = policies.status();
    assert!(status.active_revision >= d.revision);
    assert_eq!(status.policy_count, 1);

    // A change is reflected by the first decision that asks for its revision.
    let forbid = r#"@id("deny-d1") forbid(principal, action, resource == Doc::"d1");"#;
    let r1 = put(&etcd, &format!("{P}policies/deny.cedar"), forbid).await;
    let d = policies
        .decide_with(&cedar_request(), Consistency::MinRevision(r1))
        .await
        .unwrap();
    assert_eq!(d.effect, Effect::Deny);
    assert_eq!(d.policy_ids, ["deny-d1"]);
    assert!(d.revision >= r1, "decision at {} for min {r1}", d.revision);

    let r2 = del(&etcd, &format!("{P}policies/deny.cedar")).await;
    let d = policies
        .decide_with(&cedar_request(), Consistency::FullyConsistent)
        .await
        .unwrap();
    assert_eq!(d.effect, Effect::Allow);
    assert!(d.revision >= r2);
    assert_ne!(
        d.decision_id,
        policies.decide(&cedar_request()).unwrap().decision_id
    );

    // A revision that does not exist yet: a bounded wait, then a typed error.
    let started = Instant::now();
    match policies
        .decide_with(&cedar_request(), Consistency::MinRevision(r2 + 1000))
        .await
    {
        Err(DecideError::NotFreshEnough {
            wanted,
            active,
            rejected: None,
            ..
        }) => {
            assert_eq!(wanted, r2 + 1000);
            assert!(active >= r2 && active < wanted);
        }
        other => panic!("expected NotFreshEnough, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_secs(2));

    // Bad requests fail alone.
    let bad_principal = Request::new("alice", r#"Action::"read""#, r#"Doc::"d1""#);
    assert!(matches!(
        policies.decide(&bad_principal),
        Err(DecideError::BadRequest {
            field: "principal",
            ..
        })
    ));
    let bad_resource = Request::new(r#"User::"alice""#, r#"Action::"read""#, "Doc::d1");
    assert!(matches!(
        policies.decide(&bad_resource),
        Err(DecideError::BadRequest {
            field: "resource",
            ..
        })
    ));
    let bad_context = cedar_request().with_context(json!([1, 2]));
    assert!(matches!(
        policies.decide(&bad_context),
        Err(DecideError::BadRequest {
            field: "context",
            ..
        })
    ));
    assert!(policies.decide(&cedar_request()).unwrap().is_allowed());
}

/// Each bad input is rejected with its key and revision; the last-known-good set
/// keeps deciding; `MinRevision` of the rejected revision fails at once; removing
/// the bad input activates again.
pub async fn last_known_good(endpoints: Vec<String>, backend: Backend) {
    const LIMIT: usize = 4096;
    let (prefix, tree, request, ids, bad_inputs) = match backend {
        Backend::Cedar => (
            "lkg-cedar/",
            fixtures::cedar_tree(),
            fixtures::cedar_request(),
            vec!["admins-read".to_owned()],
            fixtures::cedar_bad_inputs(LIMIT),
        ),
        Backend::Casbin => (
            "lkg-casbin/",
            fixtures::casbin_tree(),
            fixtures::casbin_request(),
            vec!["rows/main.csv:1".to_owned()],
            fixtures::casbin_bad_inputs(LIMIT),
        ),
    };
    let etcd = writer(endpoints.clone()).await;
    let r0 = put_tree(&etcd, prefix, &tree).await;
    let config = PolicyConfig::new(backend).limits(Limits {
        max_value_bytes: LIMIT,
    });
    let policies = start(endpoints, prefix, config).await;
    policies.wait_for_revision(r0, WAIT).await.unwrap();
    let originals: BTreeMap<&str, &str> = tree.iter().copied().collect();

    for (what, path, value) in bad_inputs {
        let key = format!("{prefix}{path}");
        let good = policies.active().unwrap().revision;
        let r = put(&etcd, &key, value).await;
        let rejection = rejection_at(&policies, r).await;
        assert_eq!(rejection.key, key, "{what}: {rejection}");
        assert_eq!(rejection.revision, r, "{what}: {rejection}");
        assert_eq!(rejection.key_revision, Some(r), "{what}: {rejection}");
        assert!(!rejection.message.is_empty());

        let d = policies.decide(&request).unwrap();
        assert_eq!(d.effect, Effect::Allow, "{what}");
        assert_eq!(d.policy_ids, ids, "{what}");
        assert!(
            d.revision >= good && d.revision < r,
            "{what}: decided at {}",
            d.revision
        );
        let status = policies.status();
        match &status.state {
            PolicyState::Degraded(reasons) => assert!(
                reasons
                    .iter()
                    .any(|x| matches!(x, DegradedReason::NewestRejected(j) if j.revision == r)),
                "{what}: {reasons:?}"
            ),
            other => panic!("{what}: expected degraded, got {other:?}"),
        }
        // The rejected revision cannot be reached: fail at once, saying why.
        let started = Instant::now();
        match policies
            .decide_with(&request, Consistency::MinRevision(r))
            .await
        {
            Err(DecideError::NotFreshEnough {
                rejected: Some(j), ..
            }) => assert_eq!(j.revision, r),
            other => panic!("{what}: expected NotFreshEnough with the rejection, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: it waited"
        );

        let fixed = match originals.get(path) {
            Some(original) => put(&etcd, &key, *original).await,
            None => del(&etcd, &key).await,
        };
        let set = policies.wait_for_revision(fixed, WAIT).await.unwrap();
        assert!(set.revision >= fixed);
        wait_ready(&policies).await;
        assert_eq!(policies.decide(&request).unwrap().policy_ids, ids);
    }
    assert_eq!(policies.status().last_rejection, None);
}

/// A tree of `files` Cedar files, each permitting everything with an id naming
/// its version: a decision lists every file's policy, so a mixture would show.
fn versioned_tree(files: usize, version: usize) -> Tree {
    Tree::from_files((0..files).map(|i| {
        (
            format!("p/{i:03}.cedar"),
            format!("@id(\"f{i}-v{version}\") permit(principal, action, resource);"),
        )
    }))
    .unwrap()
}

/// Publishes of more than 128 keys become visible at once: a reader deciding
/// throughout never sees two versions in one decision, and each decision's
/// version is the one published at or before its revision.
pub async fn atomic_publish_with_concurrent_reader(endpoints: Vec<String>) {
    const P: &str = "atomic/";
    const FILES: usize = 150;
    let etcd = writer(endpoints.clone()).await;
    let first = publish(&etcd, P.as_bytes(), &versioned_tree(FILES, 0), Expect::Any)
        .await
        .unwrap();
    let policies = start(endpoints, P, PolicyConfig::new(Backend::Cedar)).await;
    policies
        .wait_for_revision(first.revision, WAIT)
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let policies = policies.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let request = Request::new(r#"User::"u""#, r#"Action::"a""#, r#"Doc::"d""#);
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let d = policies.decide(&request).unwrap();
                assert_eq!(d.policy_ids.len(), FILES, "at {}", d.revision);
                let versions: std::collections::BTreeSet<&str> = d
                    .policy_ids
                    .iter()
                    .map(|id| id.split_once("-v").unwrap().1)
                    .collect();
                assert_eq!(
                    versions.len(),
                    1,
                    "a mixture at {}: {versions:?}",
                    d.revision
                );
                let version: usize = versions.first().unwrap().parse().unwrap();
                seen.push((d.revision, version));
                tokio::task::yield_now().await;
            }
            seen
        })
    };
    let mut published = vec![(first.revision, 0)];
    for version in 1..=3 {
        let p = publish(
            &etcd,
            P.as_bytes(),
            &versioned_tree(FILES, version),
            Expect::Current,
        )
        .await
        .unwrap();
        policies.wait_for_revision(p.revision, WAIT).await.unwrap();
        published.push((p.revision, version));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let seen = reader.await.unwrap();
    let mut versions_seen = std::collections::BTreeSet::new();
    for (revision, version) in &seen {
        let expected = published
            .iter()
            .rev()
            .find(|(r, _)| r <= revision)
            .map(|(_, v)| *v)
            .unwrap();
        assert_eq!(*version, expected, "decision at {revision}");
        versions_seen.insert(*version);
    }
    assert_eq!(versions_seen.len(), 4, "the reader saw {versions_seen:?}");
}

/// With a maximum staleness, decisions deny (with the reason) once the mirror has
/// been cut off (by `cut_off`) for longer. Returns the policies, failing closed.
pub async fn fails_closed_after_max_staleness(
    endpoints: Vec<String>,
    cut_off: impl std::future::Future<Output = ()>,
) -> revwatch_policy::Policies {
    const P: &str = "stale/";
    let etcd = writer(endpoints.clone()).await;
    let r = put_tree(&etcd, P, &fixtures::cedar_tree()).await;
    let max = Duration::from_millis(800);
    let config = PolicyConfig::new(Backend::Cedar).max_staleness(max);
    let policies = start(endpoints, P, config).await;
    policies.wait_for_revision(r, WAIT).await.unwrap();
    wait_ready(&policies).await;
    assert!(policies.decide(&cedar_request()).unwrap().is_allowed());

    let cut_at = Instant::now();
    cut_off.await;
    let denied = loop {
        let d = policies.decide(&cedar_request()).unwrap();
        if d.effect == Effect::Deny {
            break d;
        }
        assert!(
            cut_at.elapsed() < WAIT,
            "never failed closed: {:?}",
            policies.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(cut_at.elapsed() >= max, "failed closed too early");
    let reason = denied.fail_closed.expect("a fail-closed denial says why");
    assert!(reason.contains("staleness"), "{reason}");
    assert!(denied.policy_ids.is_empty());
    match policies.status().state {
        PolicyState::Degraded(reasons) => assert!(
            reasons
                .iter()
                .any(|x| matches!(x, DegradedReason::FailClosed { .. })),
            "{reasons:?}"
        ),
        other => panic!("expected degraded, got {other:?}"),
    }
    policies
}

/// `decide_batch` decides every request on one set: one revision for all, each
/// request's own error kept apart, the consistency requirements as for one
/// request, and never a mix of two sets while the policies change under it.
pub async fn batch_decisions(endpoints: Vec<String>) {
    const P: &str = "batch/";
    let etcd = writer(endpoints.clone()).await;

    // No set yet (the only file is rejected): the whole batch is not ready.
    let broken = put(&etcd, &format!("{P}policies/main.cedar"), "permit(").await;
    let config = PolicyConfig::new(Backend::Cedar).fresh_wait(Duration::from_secs(1));
    let policies = start(endpoints, P, config).await;
    rejection_at(&policies, broken).await;
    match policies
        .decide_batch([&cedar_request()], Consistency::Default)
        .await
    {
        Err(DecideError::NotReady { rejected: Some(r) }) => assert_eq!(r.revision, broken),
        other => panic!("expected NotReady, got {other:?}"),
    }

    let r0 = put_tree(&etcd, P, &fixtures::cedar_tree()).await;
    policies.wait_for_revision(r0, WAIT).await.unwrap();
    let bad = Request::new("alice", r#"Action::"read""#, r#"Doc::"d1""#);
    let requests = [cedar_request(), bad, cedar_request()];
    let (revision, results) = policies
        .decide_batch(&requests, Consistency::Default)
        .await
        .unwrap();
    assert!(revision >= r0);
    assert_eq!(results.len(), 3);
    let (first, last) = (results[0].as_ref().unwrap(), results[2].as_ref().unwrap());
    assert!(first.is_allowed() && last.is_allowed());
    assert_eq!((first.revision, last.revision), (revision, revision));
    assert_ne!(first.decision_id, last.decision_id);
    assert!(matches!(
        results[1],
        Err(DecideError::BadRequest {
            field: "principal",
            ..
        })
    ));
    let (_, none) = policies
        .decide_batch(&[], Consistency::Default)
        .await
        .unwrap();
    assert!(none.is_empty());

    // Read-your-writes, as for one request.
    let forbid = r#"@id("deny-d1") forbid(principal, action, resource == Doc::"d1");"#;
    let r1 = put(&etcd, &format!("{P}policies/deny.cedar"), forbid).await;
    let (revision, results) = policies
        .decide_batch(&requests[..1], Consistency::MinRevision(r1))
        .await
        .unwrap();
    assert!(revision >= r1);
    assert_eq!(results[0].as_ref().unwrap().policy_ids, ["deny-d1"]);
    let r2 = del(&etcd, &format!("{P}policies/deny.cedar")).await;
    let (revision, results) = policies
        .decide_batch(&requests[..1], Consistency::FullyConsistent)
        .await
        .unwrap();
    assert!(revision >= r2);
    assert!(results[0].as_ref().unwrap().is_allowed());
    match policies
        .decide_batch(&requests[..1], Consistency::MinRevision(r2 + 1000))
        .await
    {
        Err(DecideError::NotFreshEnough { wanted, .. }) => assert_eq!(wanted, r2 + 1000),
        other => panic!("expected NotFreshEnough, got {other:?}"),
    }

    // While the forbid policy comes and goes, each batch sees one set.
    let writing = Arc::new(AtomicBool::new(true));
    let toggler = tokio::spawn({
        let writing = Arc::clone(&writing);
        let key = format!("{P}policies/deny.cedar");
        async move {
            while writing.load(Ordering::SeqCst) {
                put(&etcd, &key, forbid).await;
                del(&etcd, &key).await;
            }
        }
    });
    let many = vec![cedar_request(); 200];
    let mut effects = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let (revision, results) = policies
            .decide_batch(&many, Consistency::Default)
            .await
            .unwrap();
        let first = results[0].as_ref().unwrap();
        for d in &results {
            let d = d.as_ref().unwrap();
            assert_eq!((d.revision, d.effect), (revision, first.effect));
        }
        *effects.entry(format!("{:?}", first.effect)).or_insert(0) += 1;
        tokio::task::yield_now().await;
    }
    writing.store(false, Ordering::SeqCst);
    toggler.await.unwrap();
    assert_eq!(effects.len(), 2, "both sets were decided on: {effects:?}");
}

/// Every load is reported, with its outcome and duration, to load-report
/// receivers (none missed) and as the status's `last_load`, next to the
/// activation and rejection counters.
pub async fn load_reports(endpoints: Vec<String>) {
    const P: &str = "loads/";
    let etcd = writer(endpoints.clone()).await;
    let r0 = put_tree(&etcd, P, &fixtures::cedar_tree()).await;
    let policies = start(endpoints, P, PolicyConfig::new(Backend::Cedar)).await;
    policies.wait_for_revision(r0, WAIT).await.unwrap();
    let before = policies.status();
    let first = before
        .last_load
        .clone()
        .expect("the first activation is a load");
    assert_eq!(first.outcome, revwatch_policy::LoadOutcome::Activated);
    assert!(first.revision >= r0);
    let mut reports = policies.load_reports();

    // Two rejections of different keys, then a correction.
    let bad = format!("{P}policies/bad.cedar");
    let also_bad = format!("{P}policies/also-bad.cedar");
    let r1 = put(&etcd, &bad, "permit(").await;
    rejection_at(&policies, r1).await;
    let r2 = put(&etcd, &also_bad, "forbid(").await;
    rejection_at(&policies, r2).await;
    del(&etcd, &bad).await;
    let r3 = del(&etcd, &also_bad).await;
    policies.wait_for_revision(r3, WAIT).await.unwrap();

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let report = tokio::time::timeout(WAIT, reports.recv())
            .await
            .expect("a load report")
            .unwrap();
        let done = report.outcome == revwatch_policy::LoadOutcome::Activated;
        seen.push(report);
        if done {
            break;
        }
    }
    let rejected_keys: Vec<&str> = seen
        .iter()
        .filter_map(|r| match &r.outcome {
            revwatch_policy::LoadOutcome::Rejected(rejection) => Some(rejection.key.as_str()),
            revwatch_policy::LoadOutcome::Activated => None,
        })
        .collect();
    // The key at fault of each rejection: the newest bad file, then whichever of
    // the two the engine names once both are there (one is left after a delete).
    assert_eq!(rejected_keys.first(), Some(&bad.as_str()), "{seen:?}");
    assert!(rejected_keys.len() >= 2, "{seen:?}");
    let last = seen.last().unwrap();
    assert_eq!(last.outcome, revwatch_policy::LoadOutcome::Activated);
    assert!(last.revision >= r3);
    assert!(seen.iter().all(|r| r.duration > Duration::ZERO));
    let sequences: Vec<u64> = seen.iter().map(|r| r.sequence).collect();
    let next = first.sequence + 1;
    assert_eq!(
        sequences,
        (next..next + seen.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(first.sequence, before.activations + before.rejections);

    let after = policies.status();
    assert_eq!(after.last_load.as_ref(), Some(last));
    assert_eq!(after.activations, before.activations + 1);
    assert_eq!(
        after.rejections,
        before.rejections + rejected_keys.len() as u64
    );
}
