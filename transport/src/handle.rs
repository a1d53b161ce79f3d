//! Connect handles: small versioned blobs that tell a peer how to connect.
//!
//! Layout: magic `b"BRDH"`, version (u16 LE), transport name length (u8) and name, then the
//! transport-specific address bytes. Decoding checks everything and never panics.

use crate::{NetError, NetResult};

const MAGIC: &[u8; 4] = b"BRDH";
/// Version of the handle layout.
pub const HANDLE_VERSION: u16 = 1;
/// Largest encoded handle accepted.
pub const MAX_HANDLE: usize = 1024;

/// A connect handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectHandle {
    /// Transport name ("tcp", "mem").
    pub transport: String,
    /// Transport-specific address bytes.
    pub addr: Vec<u8>,
}

impl ConnectHandle {
    /// Encodes the handle.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + self.transport.len() + self.addr.len());
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&HANDLE_VERSION.to_le_bytes());
        v.push(self.transport.len() as u8);
        v.extend_from_slice(self.transport.as_bytes());
        v.extend_from_slice(&self.addr);
        v
    }

    /// Decodes a handle, checking magic, version and lengths.
    pub fn decode(b: &[u8]) -> NetResult<ConnectHandle> {
        if b.len() > MAX_HANDLE {
            return Err(NetError::Protocol(format!(
                "connect handle of {} bytes is larger than {MAX_HANDLE}",
                b.len()
            )));
        }
        if b.len() < 7 || &b[..4] != MAGIC {
            return Err(NetError::Protocol("not a braid connect handle".into()));
        }
        let ver = u16::from_le_bytes([b[4], b[5]]);
        if ver != HANDLE_VERSION {
            return Err(NetError::Protocol(format!(
                "connect handle version {ver}, this build speaks {HANDLE_VERSION}"
            )));
        }
        let n = b[6] as usize;
        let name = b
            .get(7..7 + n)
            .ok_or_else(|| NetError::Protocol("truncated connect handle".into()))?;
        let transport = String::from_utf8(name.to_vec())
            .map_err(|_| NetError::Protocol("connect handle transport name is not UTF-8".into()))?;
        Ok(ConnectHandle {
            transport,
            addr: b[7 + n..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let h = ConnectHandle {
            transport: "tcp".into(),
            addr: vec![1, 2, 3],
        };
        assert_eq!(ConnectHandle::decode(&h.encode()).unwrap(), h);
        assert!(ConnectHandle::decode(b"").is_err());
        assert!(ConnectHandle::decode(b"BRDH\x02\x00\x03tcp").is_err());
        assert!(ConnectHandle::decode(b"BRDH\x01\x00\x09tcp").is_err());
        assert!(ConnectHandle::decode(&[0xff; 40]).is_err());
    }
}
