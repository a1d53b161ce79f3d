//! Job-token authentication: HMAC-SHA256 over nonces (the token never crosses the wire).
//!
//! * Coordinator handshake: the client sends its registration (or rejoin, or status request)
//!   with a random client nonce; a coordinator with a token answers with a random server nonce
//!   ([`super::proto::Challenge`]); the client proves it knows the token with
//!   `HMAC(token, "braid-client" | server nonce | client nonce)`; the coordinator proves it too
//!   in its acknowledgement with `HMAC(token, "braid-coordinator" | client nonce | server
//!   nonce)`, so a member never trusts an impostor coordinator either.
//! * Data connections (collective and push/pull): the acceptor sends a fresh random challenge
//!   first; the connector's hello carries `HMAC(view_key, label | challenge | hello fields)`
//!   with [`view_key`] = `HMAC(token or "", "braid-view" | view nonce)`. The view nonce is
//!   random per view and reaches only the view's members (status and view replies carry 0),
//!   so a stranger cannot compute the key, and the challenge makes every hello single-use.
//!   Collective hellos with a token carry a second MAC keyed by the token itself, checked at
//!   accept time (before the view is known, and before the shm transport maps anything).
//! * Readers (push/pull, not members) get a ticket from the coordinator ([`reader_ticket`]),
//!   which a server recomputes from its own view key.
//! * Rejoins prove the member's per-member secret issued at registration (even without a
//!   token), so a stranger cannot take over a live member's coordinator connection.

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

/// The key that authenticates data connections of one view (collective and push/pull hellos):
/// `HMAC(token, "braid-view" | nonce)` with a job token, else `HMAC("", "braid-view" | nonce)`.
/// The view nonce is random per view and reaches only the view's members (over their
/// coordinator connection; status replies never carry it), so without a token the key is still
/// unknown to a stranger who did not register; with one it is unknown to anyone without it.
pub(crate) fn view_key(token: Option<&[u8]>, nonce: u64) -> [u8; MAC_LEN] {
    mac(token.unwrap_or(b""), &[b"braid-view", &nonce.to_le_bytes()])
}

/// The ticket the coordinator issues to reader `id` of `group` for view `epoch`:
/// `HMAC(view_key, "braid-reader" | group | id | epoch)`. A push/pull server recomputes it
/// from its own view to admit the reader; the reader MACs its hello with it.
pub(crate) fn reader_ticket(view_key: &[u8], group: &str, id: u64, epoch: u64) -> [u8; MAC_LEN] {
    mac(
        view_key,
        &[
            b"braid-reader",
            group.as_bytes(),
            &id.to_le_bytes(),
            &epoch.to_le_bytes(),
        ],
    )
}

/// A rejoining member's proof that it is member `id` of `group`: `HMAC(member secret,
/// "braid-rejoin" | group | id | server nonce | client nonce)`, hex. The secret is issued at
/// registration (in the acknowledgement) and never sent again, so a stranger who learnt the
/// id cannot take the member's place, with or without a job token.
pub(crate) fn rejoin_mac(
    secret: &[u8],
    group: &str,
    id: u64,
    server_nonce: &str,
    client_nonce: &str,
) -> String {
    super::to_hex(&mac(
        secret,
        &[
            b"braid-rejoin",
            group.as_bytes(),
            &id.to_le_bytes(),
            server_nonce.as_bytes(),
            client_nonce.as_bytes(),
        ],
    ))
}

/// Checks a rejoin proof (constant time).
pub(crate) fn check_rejoin(
    secret: &[u8],
    group: &str,
    id: u64,
    server_nonce: &str,
    client_nonce: &str,
    hex: &str,
) -> bool {
    match super::from_hex(hex) {
        Some(tag) => verify(
            secret,
            &[
                b"braid-rejoin",
                group.as_bytes(),
                &id.to_le_bytes(),
                server_nonce.as_bytes(),
                client_nonce.as_bytes(),
            ],
            &tag,
        ),
        None => false,
    }
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
        let r = rejoin_mac(b"k", "g", 5, "s", "c");
        assert!(check_rejoin(b"k", "g", 5, "s", "c", &r));
        assert!(!check_rejoin(b"k", "g", 6, "s", "c", &r));
        assert!(!check_rejoin(b"other", "g", 5, "s", "c", &r));
        assert!(!check_rejoin(b"k", "g", 5, "s2", "c", &r));
        // Part boundaries matter.
        assert_ne!(mac(t, &[b"ab", b"c"]), mac(t, &[b"a", b"bc"]));
    }
}
