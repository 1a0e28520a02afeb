//! rustls (ring provider) client config for MQTT over TLS.

use anyhow::{bail, Context, Result};
use rumqttc::TlsConfiguration;
use rustls::pki_types::{pem::PemObject, CertificateDer};
use std::path::Path;
use std::sync::Arc;

pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig> {
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
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An HTTP(S) client (ureq, rustls with ring). `ca_file` replaces the
/// built-in Mozilla roots with a private CA bundle. Non-2xx answers are
/// returned, not turned into errors. No gzip (byte ranges must stay ranges).
pub fn http_agent(
    ca_file: Option<&Path>,
    global_timeout: Option<std::time::Duration>,
) -> Result<ureq::Agent> {
    let mut b = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(std::time::Duration::from_secs(30)))
        .timeout_global(global_timeout);
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

pub fn rumqttc_config(ca_file: Option<&Path>) -> Result<TlsConfiguration> {
    Ok(TlsConfiguration::Rustls(Arc::new(client_config(ca_file)?)))
}

#[cfg(test)]
mod tests {
    #[test]
    fn missing_ca_is_an_error() {
        assert!(super::client_config(None).is_err());
        assert!(super::client_config(Some(std::path::Path::new("/nonexistent.pem"))).is_err());
    }
}
