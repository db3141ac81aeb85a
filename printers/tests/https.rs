//! The printer client over https: a TLS front (rustls, a certificate made by `openssl` for
//! `localhost`) relaying to the local Lob test server. The client trusts the certificate
//! through `SSL_CERT_FILE`, as an operator would trust a private CA. (Its own test binary: the
//! trust store is loaded once per process.)

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use broadside_printers::lob::{Creative, LobClient, LobConfig, MailPiece, RunScope};
use broadside_printers::Address;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::lob_server::LobServer;

const KEY: &str = "test_https_key";

fn piece(i: usize) -> MailPiece {
    MailPiece {
        key: RunScope {
            workspace_id: "acme".into(),
            campaign_id: "https-test".into(),
            run_id: "run-1".into(),
        }
        .key(&format!("acct-{i}"), "postcard"),
        description: None,
        to: Address {
            name: Some(format!("Grace Hopper {i}")),
            address_line1: Some("1 Navy Way".into()),
            address_city: Some("Arlington".into()),
            address_state: Some("VA".into()),
            address_zip: Some("22202".into()),
            address_country: Some("US".into()),
            ..Address::default()
        },
        from: None,
        creative: Creative::Postcard {
            front: "<html>front</html>".into(),
            back: "<html>back</html>".into(),
            size: None,
        },
        merge_variables: serde_json::Map::new(),
        metadata: Default::default(),
    }
}

/// Accepts TLS on a free port and relays each connection to `backend` in plain TCP.
async fn tls_front(cert: &std::path::Path, key: &std::path::Path, backend: String) -> u16 {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let backend = backend.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut plain = tokio::net::TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_printers_are_reached_through_a_verified_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n);
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    // A private CA, and a certificate for localhost it signs.
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-days", "2", "-subj", "/CN=Broadside test CA"],
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        path("leaf.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
        "-out",
        "cert.pem",
    ]);
    let (cert, key) = (path("cert.pem"), path("key.pem"));
    // Trusted the way an operator trusts a private CA (rustls-native-certs reads it).
    std::env::set_var("SSL_CERT_FILE", path("ca.pem"));

    let server = LobServer::start(KEY, Duration::ZERO).await;
    let backend = server.base_url.trim_start_matches("http://").to_string();
    let port = tls_front(&cert, &key, backend).await;
    let cfg = |host: &str| LobConfig {
        base_url: format!("https://{host}:{port}"),
        max_attempts: 1,
        requests_per_second: None,
        ..LobConfig::default()
    };

    let client = LobClient::new(cfg("localhost"), KEY).unwrap();
    let created = client.create(&piece(1)).await.unwrap();
    let pieces = server.pieces();
    assert_eq!(pieces.len(), 1);
    assert_eq!(pieces[0].id, created.id);

    // The certificate names localhost, not 127.0.0.1: the handshake is refused, nothing made.
    let client = LobClient::new(cfg("127.0.0.1"), KEY).unwrap();
    let err = client.create(&piece(2)).await.unwrap_err().to_string();
    assert!(err.contains("TLS"), "{err}");
    assert_eq!(server.pieces().len(), 1);
}
