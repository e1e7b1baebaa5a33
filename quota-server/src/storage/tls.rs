//! TLS to Redis (`rediss://`): the server's certificate is checked against
//! the system roots, or against the CA file given as
//! `storage.redis.tls_ca_file` (for self-signed servers).

use std::path::{Path, PathBuf};

use redis::TlsCertificates;

/// Why the CA file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("storage.redis.tls_ca_file {path}: {source}; give a readable PEM file")]
    Read {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        source: std::io::Error,
    },
    /// The file holds no PEM certificate.
    #[error(
        "storage.redis.tls_ca_file {0}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it; \
         give the CA certificate that signed Redis's certificate"
    )]
    NoCertificate(PathBuf),
}

/// The roots in the PEM file at `path`, to trust instead of the system's.
pub fn ca_certificates(path: &Path) -> Result<TlsCertificates, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // The redis crate skips what is not a certificate without a word; an
    // empty trust store would only show up as failed handshakes later.
    if !contains(&pem, b"-----BEGIN CERTIFICATE-----") {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_a_certificate_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let e = ca_certificates(&path).err().unwrap().to_string();
        assert!(
            e.contains("ca.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = ca_certificates(&dir.path().join("missing.pem"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\nAA==\n").unwrap();
        assert!(ca_certificates(&path).unwrap().root_cert.is_some());
    }
}
