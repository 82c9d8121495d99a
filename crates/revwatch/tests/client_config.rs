//! Configuration, TLS and auth: good settings work against real etcd, bad ones fail
//! fast with a clear error (never a panic or a hang).

mod client_support;

use std::net::TcpListener;
use std::time::Duration;

use client_support::{assert_all_healthy, bounded, config_for, get, put};
use revwatch::client::{Client, ClientConfig, Error, Pem, TlsConfig};
use revwatch_testkit::etcd::{ClusterOptions, EtcdCluster};

/// Every bad-config connect must return within this.
const FAIL_FAST: Duration = Duration::from_secs(20);
const LIMIT: Duration = Duration::from_secs(90);

async fn connect_err(config: ClientConfig) -> Error {
    match tokio::time::timeout(FAIL_FAST, Client::connect(config)).await {
        Ok(Ok(_)) => panic!("connect succeeded with a bad configuration"),
        Ok(Err(e)) => e,
        Err(_) => panic!("connect hung for {FAIL_FAST:?}"),
    }
}

fn tls_cluster_options(auth: Option<(&str, &str)>) -> ClusterOptions {
    ClusterOptions {
        tls: true,
        auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
        ..Default::default()
    }
}

#[tokio::test]
async fn invalid_endpoint_urls_are_rejected() {
    bounded(LIMIT, async {
        for bad in [
            "http://127.0.0.1:notaport",
            "ftp://127.0.0.1:2379",
            "",
            "http://",
            "http://127.0.0.1:2379/v3/kv",
        ] {
            let err = connect_err(ClientConfig::new([bad])).await;
            assert!(matches!(err, Error::InvalidConfig(_)), "{bad:?}: {err}");
            assert!(
                err.to_string().contains("invalid endpoint"),
                "{bad:?}: {err}"
            );
            println!("{bad:?}: {err}");
        }
        let err = connect_err(ClientConfig::new(Vec::<String>::new())).await;
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");

        let cfg =
            ClientConfig::new(["127.0.0.1:2379"]).with_keepalive_interval(Duration::from_secs(2));
        let err = connect_err(cfg).await;
        assert!(err.to_string().contains("keepalive_interval"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn unreachable_endpoints_are_each_named() {
    bounded(LIMIT, async {
        // Reserve ports, then free them, so nothing listens there.
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                let l = TcpListener::bind("127.0.0.1:0").expect("bind");
                l.local_addr().expect("addr").port()
            })
            .collect();
        let endpoints: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let err = connect_err(ClientConfig::new(endpoints.clone())).await;
        println!("{err}");
        let Error::AllEndpointsUnreachable(failures) = &err else {
            panic!("expected AllEndpointsUnreachable, got {err}");
        };
        assert_eq!(failures.len(), 2);
        let msg = err.to_string();
        assert!(msg.starts_with("all 2 endpoints unreachable"), "{msg}");
        for e in &endpoints {
            assert!(msg.contains(&format!("{e} (connection refused)")), "{msg}");
        }
    })
    .await;
}

/// A listener whose accept queue is full: the kernel drops further SYNs, so a TCP
/// connect to it never completes. The returned streams keep the queue full.
async fn black_hole() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(1).expect("listen");
    let addr = listener.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..64 {
        let probe = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await;
        match probe {
            Ok(Ok(stream)) => fillers.push(stream),
            Ok(Err(e)) => panic!("filling the accept queue: {e}"),
            // A connect that hangs: the queue is full.
            Err(_) => return (listener, fillers),
        }
    }
    panic!("the accept queue of {addr} never filled");
}

#[tokio::test]
async fn connect_timeout_bounds_an_endpoint_that_never_accepts() {
    bounded(LIMIT, async {
        let (listener, _fillers) = black_hole().await;
        let endpoint = listener.local_addr().expect("addr").to_string();
        let cfg = ClientConfig::new([endpoint.clone()])
            .with_connect_timeout(Duration::from_millis(500))
            // Far above the connect timeout, so only the connect timeout can end this soon.
            .with_request_timeout(Duration::from_secs(30));

        let started = std::time::Instant::now();
        let err = connect_err(cfg).await;
        let took = started.elapsed();
        println!("connect to a black hole failed after {took:?}: {err}");
        assert!(
            took < Duration::from_secs(10),
            "connect timeout of 500ms took {took:?} to fire"
        );
        let Error::AllEndpointsUnreachable(failures) = &err else {
            panic!("expected AllEndpointsUnreachable, got {err}");
        };
        assert_eq!(failures.len(), 1, "{err}");
        assert_eq!(failures[0].endpoint, endpoint, "{err}");
        assert_eq!(failures[0].reason, "connect timed out", "{err}");
        assert!(err.is_retryable(), "{err}");
    })
    .await;
}

#[tokio::test]
async fn endpoint_that_accepts_but_never_answers_times_out() {
    bounded(LIMIT, async {
        // Accepts connections and holds them open without reading or writing a byte.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = listener.local_addr().expect("addr").to_string();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let cfg = ClientConfig::new([endpoint.clone()])
            .with_connect_timeout(Duration::from_millis(500))
            .with_request_timeout(Duration::from_secs(2));

        let started = std::time::Instant::now();
        let err = connect_err(cfg).await;
        let took = started.elapsed();
        println!("connect to a silent server failed after {took:?}: {err}");
        assert!(
            took < Duration::from_secs(10),
            "request timeout of 2s took {took:?} to fire"
        );
        let Error::AllEndpointsUnreachable(failures) = &err else {
            panic!("expected AllEndpointsUnreachable, got {err}");
        };
        assert_eq!(failures.len(), 1, "{err}");
        assert_eq!(failures[0].endpoint, endpoint, "{err}");
        assert!(failures[0].reason.contains("timed out"), "{err}");
        holder.abort();
    })
    .await;
}

#[tokio::test]
async fn tls_with_client_certificates_works() {
    bounded(LIMIT, async {
        let cluster = EtcdCluster::start(tls_cluster_options(None))
            .await
            .expect("start etcd");
        assert!(cluster.endpoint(0).starts_with("https://"));
        let client = Client::connect(config_for(&cluster))
            .await
            .expect("connect over TLS");
        assert_all_healthy(&client);
        put(&client, "/tls/k", "v").await;
        assert_eq!(get(&client, "/tls/k").await.as_deref(), Some(&b"v"[..]));
        let mut stream = client
            .watch(revwatch::client::WatchCreateRequest {
                key: "/tls/k".into(),
                ..Default::default()
            })
            .await
            .expect("watch over TLS");
        assert!(
            stream
                .message()
                .await
                .expect("created")
                .expect("open")
                .created
        );
    })
    .await;
}

#[tokio::test]
async fn bad_tls_files_give_clear_errors() {
    bounded(LIMIT, async {
        let cluster = EtcdCluster::start(tls_cluster_options(None))
            .await
            .expect("start etcd");
        let files = cluster.tls_files().expect("tls files").clone();
        let dir = tempfile::tempdir().expect("tempdir");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").expect("write");
        let missing = dir.path().join("missing.pem");

        let with = |tls: TlsConfig| ClientConfig::new(cluster.endpoints()).with_tls(tls);

        let err = connect_err(with(TlsConfig::from_files(
            &missing,
            &files.cert,
            &files.key,
        )))
        .await;
        assert!(matches!(err, Error::Tls(_)), "{err}");
        assert!(err.to_string().contains("missing.pem"), "{err}");
        println!("missing CA: {err}");

        let err = connect_err(with(TlsConfig::from_files(
            &garbage,
            &files.cert,
            &files.key,
        )))
        .await;
        assert!(matches!(err, Error::Tls(_)), "{err}");
        assert!(err.to_string().contains("garbage.pem"), "{err}");
        println!("garbage CA: {err}");

        let err = connect_err(with(TlsConfig::from_files(
            &files.ca,
            &files.cert,
            &garbage,
        )))
        .await;
        assert!(matches!(err, Error::Tls(_)), "{err}");
        assert!(err.to_string().contains("private key"), "{err}");
        println!("garbage key: {err}");

        // A valid certificate that is not the CA that signed the server's certificate.
        let err = connect_err(with(TlsConfig::from_files(
            &files.cert,
            &files.cert,
            &files.key,
        )))
        .await;
        println!("wrong CA: {err}");
        assert!(matches!(err, Error::AllEndpointsUnreachable(_)), "{err}");
        assert!(
            err.to_string().to_lowercase().contains("certificate"),
            "{err}"
        );

        // No client certificate for a server that requires one.
        let err = connect_err(with(TlsConfig::with_ca_file(&files.ca))).await;
        println!("no client certificate: {err}");
        assert!(matches!(err, Error::AllEndpointsUnreachable(_)), "{err}");

        // Plain http against a TLS configuration is a configuration error.
        let plain = cluster.endpoint(0).replace("https://", "http://");
        let err =
            connect_err(ClientConfig::new([plain]).with_tls(TlsConfig::with_ca_file(&files.ca)))
                .await;
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");

        // Inline PEM works as well as files.
        let inline = TlsConfig {
            ca: Pem::Bytes(std::fs::read(&files.ca).expect("read ca")),
            identity: Some((Pem::Path(files.cert.clone()), Pem::Path(files.key.clone()))),
            domain_name: None,
        };
        let client = Client::connect(with(inline))
            .await
            .expect("connect with inline CA");
        put(&client, "/tls/inline", "v").await;
    })
    .await;
}

#[tokio::test]
async fn auth_accepts_right_and_rejects_wrong_credentials() {
    bounded(LIMIT, async {
        let opts = ClusterOptions {
            auth: Some(("root".into(), "s3cret".into())),
            ..Default::default()
        };
        let cluster = EtcdCluster::start(opts).await.expect("start etcd");

        let client = Client::connect(config_for(&cluster))
            .await
            .expect("connect with credentials");
        assert_all_healthy(&client);
        put(&client, "/auth/k", "v").await;
        assert_eq!(get(&client, "/auth/k").await.as_deref(), Some(&b"v"[..]));

        let wrong = ClientConfig::new(cluster.endpoints()).with_credentials("root", "wrong");
        let err = connect_err(wrong).await;
        println!("wrong password: {err}");
        assert!(matches!(err, Error::Auth(_)), "{err}");
        assert!(err.to_string().contains("root"), "{err}");
        assert!(
            !err.to_string().contains("wrong"),
            "the password must not be echoed: {err}"
        );

        let unknown = ClientConfig::new(cluster.endpoints()).with_credentials("nobody", "x");
        assert!(matches!(connect_err(unknown).await, Error::Auth(_)));

        // Without credentials, the server's refusal comes back as a typed error.
        let anonymous = Client::connect(ClientConfig::new(cluster.endpoints()))
            .await
            .expect("connect without credentials");
        let err = anonymous
            .range(revwatch::client::RangeRequest {
                key: "/auth/k".into(),
                ..Default::default()
            })
            .await
            .expect_err("anonymous read");
        println!("anonymous read: {err}");
        assert!(matches!(err, Error::Grpc { .. }), "{err}");
    })
    .await;
}

#[tokio::test]
async fn expired_token_is_refreshed() {
    bounded(LIMIT, async {
        let opts = ClusterOptions {
            auth: Some(("root".into(), "s3cret".into())),
            // Simple tokens expire after this much idle time.
            extra_args: vec!["--auth-token-ttl=1".into()],
            ..Default::default()
        };
        let cluster = EtcdCluster::start(opts).await.expect("start etcd");
        let client = Client::connect(config_for(&cluster))
            .await
            .expect("connect");
        put(&client, "/token/k", "v1").await;
        let other_token = cluster.auth_token(0).await.expect("login").expect("token");
        tokio::time::sleep(Duration::from_secs(3)).await;

        // Tokens idle this long are really dead on the server...
        let mut req = tonic::Request::new(etcd_proto::etcdserverpb::RangeRequest {
            key: "/token/k".into(),
            ..Default::default()
        });
        req.metadata_mut()
            .insert("token", other_token.parse().expect("ascii token"));
        let channel = cluster.channel(0).await.expect("channel");
        let status = etcd_proto::etcdserverpb::kv_client::KvClient::new(channel)
            .range(req)
            .await
            .expect_err("expired token");
        assert!(
            status.message().contains("invalid auth token"),
            "{status:?}"
        );

        // The token is now invalid on the server: the client must log in again and
        // retry, even for a put.
        put(&client, "/token/k", "v2").await;
        assert_eq!(get(&client, "/token/k").await.as_deref(), Some(&b"v2"[..]));
    })
    .await;
}
