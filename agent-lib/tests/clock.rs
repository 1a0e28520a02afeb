//! A broker certificate that is not yet valid by this machine's clock (issue 23
//! item 11; in the field an RTC a month fast made every certificate look
//! expired or not yet valid): the agent keeps retrying with backoff and says in
//! its log that the certificate's validity and the local clock disagree,
//! instead of failing with a bare TLS error. Real mosquitto, real rustls.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn a_not_yet_valid_broker_certificate_is_blamed_on_the_clock() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    // Valid only from 2099 on: to this machine's clock, not yet valid.
    params.not_before = rcgen::date_time_ymd(2099, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let cert = params.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    let port = free_port();
    std::fs::write(
        dir.join("mosquitto.conf"),
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence false\n\
             cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let mut broker = Command::new("mosquitto")
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("mosquitto to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let mut agent = AgentProc::new(
        dir,
        "dev-clock",
        port,
        AgentOpts {
            mqtt_extra: format!("tls = true\nca_file = \"{}\"", dir.join("ca.pem").display()),
            ..Default::default()
        },
    );
    agent.start_nowait("");
    wait_until("the clock hint in the log", Duration::from_secs(30), || {
        agent.count_log("certificate looks not yet valid") > 0
    });
    let log = agent.log_text();
    assert!(
        log.contains("check this machine's clock") && log.contains("retrying with backoff"),
        "{log}"
    );
    // Still retrying, not dead.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        agent.count_log("certificate looks not yet valid") >= 2,
        "{log}"
    );
    agent.kill9();
    let _ = broker.kill();
    let _ = broker.wait();
}
