//! XDR (RFC 4506) encoding and decoding: big-endian 4-byte units, opaque data
//! padded to a multiple of 4 bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A decoding failure: the message is shorter than its contents claim, or a
/// value is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("XDR decode error: {0}")]
pub struct XdrError(pub String);

/// Result of a decoding step.
pub type XdrResult<T> = Result<T, XdrError>;

fn pad(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Appends XDR items to a growable buffer.
#[derive(Debug, Default)]
pub struct Encoder {
    buf: BytesMut,
}

impl Encoder {
    /// An empty encoder with room for `cap` bytes.
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            buf: BytesMut::with_capacity(cap),
        }
    }

    /// Bytes encoded so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True if nothing was encoded yet.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Overwrites a 4-byte unit at `pos` (used for the record mark).
    pub fn patch_u32(&mut self, pos: usize, v: u32) {
        self.buf[pos..pos + 4].copy_from_slice(&v.to_be_bytes());
    }

    /// Appends already-encoded XDR data as is.
    pub fn raw(&mut self, data: &[u8]) -> &mut Self {
        self.buf.put_slice(data);
        self
    }

    /// `unsigned int`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.put_u32(v);
        self
    }

    /// `unsigned hyper`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.put_u64(v);
        self
    }

    /// `bool`.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u32(u32::from(v))
    }

    /// Fixed-length `opaque[n]` (`n` = `data.len()`).
    pub fn fixed(&mut self, data: &[u8]) -> &mut Self {
        self.buf.put_slice(data);
        self.buf.put_bytes(0, pad(data.len()));
        self
    }

    /// Variable-length `opaque<>`.
    pub fn opaque(&mut self, data: &[u8]) -> &mut Self {
        // Lengths above u32::MAX cannot be encoded; callers split data far below that.
        self.u32(u32::try_from(data.len()).unwrap_or(u32::MAX));
        self.fixed(data)
    }

    /// `string<>`.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.opaque(s.as_bytes())
    }

    /// An array of `unsigned int` (e.g. `bitmap4`).
    pub fn u32_array(&mut self, v: &[u32]) -> &mut Self {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        for &x in v {
            self.u32(x);
        }
        self
    }

    /// The encoded bytes.
    pub fn finish(self) -> Bytes {
        self.buf.freeze()
    }
}

/// Reads XDR items from a received message. Opaque data is returned as
/// zero-copy slices of the message.
#[derive(Debug, Clone)]
pub struct Decoder {
    buf: Bytes,
}

impl Decoder {
    /// Decodes `buf` from its start.
    pub fn new(buf: Bytes) -> Self {
        Self { buf }
    }

    /// Bytes not consumed yet.
    pub fn remaining(&self) -> usize {
        self.buf.remaining()
    }

    fn need(&self, n: usize, what: &str) -> XdrResult<()> {
        if self.buf.remaining() < n {
            return Err(XdrError(format!(
                "truncated message reading {what}: need {n} bytes, have {}",
                self.buf.remaining()
            )));
        }
        Ok(())
    }

    /// `unsigned int`.
    pub fn u32(&mut self) -> XdrResult<u32> {
        self.need(4, "u32")?;
        Ok(self.buf.get_u32())
    }

    /// `unsigned hyper`.
    pub fn u64(&mut self) -> XdrResult<u64> {
        self.need(8, "u64")?;
        Ok(self.buf.get_u64())
    }

    /// `hyper`.
    pub fn i64(&mut self) -> XdrResult<i64> {
        self.need(8, "i64")?;
        Ok(self.buf.get_i64())
    }

    /// `bool`.
    pub fn bool(&mut self) -> XdrResult<bool> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(XdrError(format!("invalid bool {v}"))),
        }
    }

    /// Fixed-length `opaque[n]`.
    pub fn fixed(&mut self, n: usize) -> XdrResult<Bytes> {
        let padded = n + pad(n);
        self.need(padded, "opaque")?;
        let out = self.buf.split_to(n);
        self.buf.advance(pad(n));
        Ok(out)
    }

    /// Fixed-length `opaque[N]` into an array.
    pub fn array<const N: usize>(&mut self) -> XdrResult<[u8; N]> {
        let b = self.fixed(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&b);
        Ok(out)
    }

    /// Variable-length `opaque<>`, at most `max` bytes.
    pub fn opaque(&mut self, max: usize) -> XdrResult<Bytes> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(XdrError(format!("opaque length {n} exceeds limit {max}")));
        }
        self.fixed(n)
    }

    /// `string<>` (lossy UTF-8).
    pub fn string(&mut self, max: usize) -> XdrResult<String> {
        let b = self.opaque(max)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// An array of `unsigned int` of at most `max` elements.
    pub fn u32_array(&mut self, max: usize) -> XdrResult<Vec<u32>> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(XdrError(format!("array length {n} exceeds limit {max}")));
        }
        (0..n).map(|_| self.u32()).collect()
    }

    /// Skips `n` bytes (no padding).
    pub fn skip(&mut self, n: usize) -> XdrResult<()> {
        self.need(n, "skipped data")?;
        self.buf.advance(n);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut e = Encoder::default();
        e.u32(7)
            .u64(0x0102_0304_0506_0708)
            .bool(true)
            .opaque(b"abcde")
            .str("xy")
            .u32_array(&[1, 2])
            .fixed(&[9; 3]);
        let b = e.finish();
        assert_eq!(b.len(), 4 + 8 + 4 + (4 + 8) + (4 + 4) + (4 + 8) + 4);
        let mut d = Decoder::new(b);
        assert_eq!(d.u32().unwrap(), 7);
        assert_eq!(d.u64().unwrap(), 0x0102_0304_0506_0708);
        assert!(d.bool().unwrap());
        assert_eq!(&d.opaque(100).unwrap()[..], b"abcde");
        assert_eq!(d.string(100).unwrap(), "xy");
        assert_eq!(d.u32_array(4).unwrap(), vec![1, 2]);
        assert_eq!(&d.fixed(3).unwrap()[..], &[9, 9, 9]);
        assert_eq!(d.remaining(), 0);
        assert!(d.u32().is_err());
    }

    #[test]
    fn limits() {
        let mut e = Encoder::default();
        e.opaque(&[1; 10]);
        let mut d = Decoder::new(e.finish());
        assert!(d.clone().opaque(9).is_err());
        assert!(d.opaque(10).is_ok());
        let mut d = Decoder::new(Bytes::from_static(&[0, 0, 0, 2]));
        assert!(d.bool().is_err());
    }
}
