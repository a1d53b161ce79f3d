//! Job-token authentication: HMAC-SHA256 over nonces (the token never crosses the wire).
//!
//! * Coordinator handshake: the client sends its registration (or rejoin, or status request)
//!   with a random client nonce; a coordinator with a token answers with a random server nonce
//!   ([`super::proto::Challenge`]); the client proves it knows the token with
//!   `HMAC(token, "braid-client" | server nonce | client nonce)`; the coordinator proves it too
//!   in its acknowledgement with `HMAC(token, "braid-coordinator" | client nonce | server
//!   nonce)`, so a member never trusts an impostor coordinator either.
//! * Data connections: the hello a rank sends to a peer carries
//!   `HMAC(token, "braid-data" | hello fields)`. The hello fields include the view's nonce,
//!   which is random per view and known only to members (the coordinator sends it over the
//!   authenticated connection), so the MAC cannot be precomputed by a stranger.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of a MAC in bytes.
pub(crate) const MAC_LEN: usize = 32;

/// HMAC-SHA256 of the concatenation of `parts` (each prefixed by its length, so part
/// boundaries are unambiguous).
pub(crate) fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    let mut m = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        // HMAC accepts keys of any length; this arm is unreachable in practice.
        Err(_) => return [0u8; MAC_LEN],
    };
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Checks `tag` against the MAC of `parts` in constant time.
pub(crate) fn verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let Ok(mut m) = HmacSha256::new_from_slice(key) else {
        return false;
    };
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m.verify_slice(tag).is_ok()
}

/// The client's answer to a challenge.
pub(crate) fn client_mac(token: &[u8], server_nonce: &str, client_nonce: &str) -> String {
    super::to_hex(&mac(
        token,
        &[
            b"braid-client",
            server_nonce.as_bytes(),
            client_nonce.as_bytes(),
        ],
    ))
}

/// Checks a client's answer.
pub(crate) fn check_client(
    token: &[u8],
    server_nonce: &str,
    client_nonce: &str,
    hex: &str,
) -> bool {
    match super::from_hex(hex) {
        Some(tag) => verify(
            token,
            &[
                b"braid-client",
                server_nonce.as_bytes(),
                client_nonce.as_bytes(),
            ],
            &tag,
        ),
        None => false,
    }
}

/// The coordinator's proof.
pub(crate) fn server_mac(token: &[u8], client_nonce: &str, server_nonce: &str) -> String {
    super::to_hex(&mac(
        token,
        &[
            b"braid-coordinator",
            client_nonce.as_bytes(),
            server_nonce.as_bytes(),
        ],
    ))
}

/// Checks the coordinator's proof.
pub(crate) fn check_server(
    token: &[u8],
    client_nonce: &str,
    server_nonce: &str,
    hex: &str,
) -> bool {
    match super::from_hex(hex) {
        Some(tag) => verify(
            token,
            &[
                b"braid-coordinator",
                client_nonce.as_bytes(),
                server_nonce.as_bytes(),
            ],
            &tag,
        ),
        None => false,
    }
}

/// MAC of a data-connection hello.
pub fn data_mac(token: &[u8], hello: &[u8]) -> [u8; MAC_LEN] {
    mac(token, &[b"braid-data", hello])
}

/// Checks the MAC of a data-connection hello.
pub fn check_data(token: &[u8], hello: &[u8], tag: &[u8]) -> bool {
    verify(token, &[b"braid-data", hello], tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_verify_and_reject() {
        let t = b"secret";
        let m = client_mac(t, "s1", "c1");
        assert!(check_client(t, "s1", "c1", &m));
        assert!(!check_client(b"other", "s1", "c1", &m));
        assert!(!check_client(t, "s2", "c1", &m));
        assert!(!check_client(t, "s1", "c1", "zz"));
        let p = server_mac(t, "c1", "s1");
        assert!(check_server(t, "c1", "s1", &p));
        assert_ne!(p, m, "client and coordinator MACs are domain-separated");
        let d = data_mac(t, b"hello");
        assert!(check_data(t, b"hello", &d));
        assert!(!check_data(t, b"hellO", &d));
        // Part boundaries matter.
        assert_ne!(mac(t, &[b"ab", b"c"]), mac(t, &[b"a", b"bc"]));
    }
}
