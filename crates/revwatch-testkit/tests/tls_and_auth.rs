//! TLS and auth clusters: reachable only the secure way.

use etcd_proto::etcdserverpb::RangeRequest;
use etcd_proto::etcdserverpb::kv_client::KvClient;
use revwatch_testkit::etcd::{ClusterOptions, EtcdCluster};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

fn range() -> RangeRequest {
    RangeRequest {
        key: b"/x".to_vec(),
        ..Default::default()
    }
}

#[tokio::test]
async fn tls_cluster_needs_tls_and_a_client_certificate() {
    let cluster = EtcdCluster::start(ClusterOptions {
        tls: true,
        ..Default::default()
    })
    .await
    .expect("start TLS etcd");
    let endpoint = cluster.endpoint(0);
    assert!(endpoint.starts_with("https://127.0.0.1:"), "{endpoint}");
    let files = cluster.tls_files().expect("TLS files").clone();

    // The harness's TLS channel works.
    let mut kv = KvClient::new(cluster.channel(0).await.expect("TLS channel"));
    kv.range(range()).await.expect("range over TLS");

    // Plain HTTP/2 to the TLS port fails.
    let plain = format!("http://{}", cluster.client_addr(0));
    let mut kv = KvClient::new(Channel::from_shared(plain).expect("url").connect_lazy());
    assert!(kv.range(range()).await.is_err(), "plaintext must not work");

    // TLS that trusts the CA but has no client certificate is refused.
    let ca = std::fs::read(&files.ca).expect("read CA");
    let no_cert = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    let result = async {
        let channel = Channel::from_shared(endpoint.clone())?
            .tls_config(no_cert)?
            .connect()
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(KvClient::new(channel).range(range()).await?)
    }
    .await;
    assert!(
        result.is_err(),
        "client-cert-auth must refuse a client without a certificate"
    );

    // etcdctl gets the TLS flags.
    let out = cluster
        .etcdctl()
        .args(["endpoint", "health"])
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn auth_cluster_rejects_unauthenticated_requests() {
    let creds = ("root".to_owned(), "s3cret".to_owned());
    let cluster = EtcdCluster::start(ClusterOptions {
        auth: Some(creds.clone()),
        ..Default::default()
    })
    .await
    .expect("start etcd with auth");
    assert_eq!(cluster.credentials(), Some(&creds));

    let mut kv = KvClient::new(cluster.channel(0).await.expect("channel"));
    let err = kv.range(range()).await.expect_err("no token");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("user name is empty"), "{err}");

    let token = cluster
        .auth_token(0)
        .await
        .expect("authenticate")
        .expect("a token");
    let mut req = tonic::Request::new(range());
    req.metadata_mut()
        .insert("token", token.parse().expect("ascii token"));
    kv.range(req).await.expect("range with a token");

    // The harness's own calls authenticate.
    cluster
        .current_revision()
        .await
        .expect("revision with auth");

    let out = cluster
        .etcdctl()
        .args(["put", "/authed", "1"])
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn tls_and_auth_together() {
    let cluster = EtcdCluster::start(ClusterOptions {
        tls: true,
        auth: Some(("root".into(), "pw".into())),
        ..Default::default()
    })
    .await
    .expect("start etcd with TLS and auth");
    // Without a token etcd takes the certificate's common name as the user;
    // that user does not exist, so the request is refused.
    let mut kv = KvClient::new(cluster.channel(0).await.expect("channel"));
    let err = kv.range(range()).await.expect_err("no token");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(cluster.current_revision().await.expect("revision") >= 1);
}
