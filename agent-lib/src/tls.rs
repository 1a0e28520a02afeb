//! rustls (ring provider) client config for MQTT over TLS.

use anyhow::{bail, Context, Result};
use rumqttc::TlsConfiguration;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// A client certificate (PEM chain, leaf first) and its private key (PEM:
/// PKCS#8, PKCS#1 or SEC1), presented to a broker that requires one (e.g.
/// AWS IoT Core, or mosquitto with `require_certificate true`).
#[derive(Debug, Clone, Copy)]
pub struct ClientCert<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

fn load_client_cert(
    c: ClientCert<'_>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let mut chain = Vec::new();
    for cert in CertificateDer::pem_file_iter(c.cert)
        .with_context(|| format!("reading client certificate {}", c.cert.display()))?
    {
        chain.push(
            cert.with_context(|| format!("parsing client certificate {}", c.cert.display()))?,
        );
    }
    if chain.is_empty() {
        bail!(
            "no certificate in {} (mqtt.client_cert must be a PEM certificate)",
            c.cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(c.key).with_context(|| {
        format!(
            "reading client key {} (mqtt.client_key must be a PEM private key)",
            c.key.display()
        )
    })?;
    Ok((chain, key))
}

pub fn client_config(
    ca_file: Option<&Path>,
    client_cert: Option<ClientCert<'_>>,
) -> Result<rustls::ClientConfig> {
    let Some(ca) = ca_file else {
        bail!("mqtt.tls needs mqtt.ca_file (a PEM bundle of the broker's CA)");
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading CA bundle {}", ca.display()))?
    {
        let cert = cert.with_context(|| format!("parsing CA bundle {}", ca.display()))?;
        roots.add(cert).context("adding CA certificate")?;
    }
    if roots.is_empty() {
        bail!("no certificate in {}", ca.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    match client_cert {
        None => Ok(b.with_no_client_auth()),
        Some(c) => {
            let (chain, key) = load_client_cert(c)?;
            b.with_client_auth_cert(chain, key).with_context(|| {
                format!(
                    "client key {} does not fit certificate {} (or is of an unsupported type)",
                    c.key.display(),
                    c.cert.display()
                )
            })
        }
    }
}

/// An HTTP(S) client (ureq, rustls with ring). `ca_file` replaces the
/// built-in Mozilla roots with a private CA bundle. Non-2xx answers are
/// returned, not turned into errors. No gzip (byte ranges must stay ranges).
pub fn http_agent(
    ca_file: Option<&Path>,
    global_timeout: Option<std::time::Duration>,
) -> Result<ureq::Agent> {
    http_agent_with(ca_file, global_timeout, None)
}

/// [`http_agent`] with a limit on each read as well (`per_read`: a stalled
/// transfer fails after this long without data).
pub fn http_agent_with(
    ca_file: Option<&Path>,
    global_timeout: Option<std::time::Duration>,
    per_read: Option<std::time::Duration>,
) -> Result<ureq::Agent> {
    let mut b = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(std::time::Duration::from_secs(30)))
        .timeout_global(global_timeout)
        .timeout_per_read(per_read);
    if let Some(ca) = ca_file {
        let pem =
            std::fs::read(ca).with_context(|| format!("reading CA bundle {}", ca.display()))?;
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            if let ureq::tls::PemItem::Certificate(c) =
                item.with_context(|| format!("parsing CA bundle {}", ca.display()))?
            {
                certs.push(c);
            }
        }
        if certs.is_empty() {
            bail!("no certificate in {}", ca.display());
        }
        b = b.tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)))
                .build(),
        );
    }
    Ok(b.build().into())
}

pub fn rumqttc_config(
    ca_file: Option<&Path>,
    client_cert: Option<ClientCert<'_>>,
) -> Result<TlsConfiguration> {
    Ok(TlsConfiguration::Rustls(Arc::new(client_config(
        ca_file,
        client_cert,
    )?)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn missing_ca_is_an_error() {
        assert!(super::client_config(None, None).is_err());
        assert!(
            super::client_config(Some(std::path::Path::new("/nonexistent.pem")), None).is_err()
        );
    }
}
