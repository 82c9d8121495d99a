//! Turning raw etcd values into the mirror's value type.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::Bytes;

/// The error a [`Decoder`] returns; its `Display` text is what status reports.
pub type DecodeError = Box<dyn std::error::Error + Send + Sync>;

/// Decodes a value read from etcd. Called once per put (and per listed key), on the
/// mirror's task: keep it cheap. It should not panic, but return an error instead;
/// a decoder that panics anyway is isolated like one that returns an error (the
/// panic message becomes the reported error) and the watch goes on.
///
/// Closures `Fn(&[u8], &[u8]) -> Result<T, E>` (key, value) implement it:
///
/// ```
/// use revwatch::mirror::Decoder;
///
/// let utf8 = |_key: &[u8], value: &[u8]| String::from_utf8(value.to_vec());
/// assert_eq!(utf8.decode(b"k", &b"v".to_vec().into()).unwrap(), "v");
/// assert!(utf8.decode(b"k", &vec![0xff].into()).is_err());
/// ```
pub trait Decoder<T>: Send + Sync + 'static {
    /// Decodes `value`, stored under `key`.
    fn decode(&self, key: &[u8], value: &Bytes) -> Result<T, DecodeError>;
}

/// The default decoder: the raw bytes, without copying.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawBytes;

impl Decoder<Bytes> for RawBytes {
    fn decode(&self, _key: &[u8], value: &Bytes) -> Result<Bytes, DecodeError> {
        Ok(value.clone())
    }
}

impl<T, E, F> Decoder<T> for F
where
    F: Fn(&[u8], &[u8]) -> Result<T, E> + Send + Sync + 'static,
    E: Into<DecodeError>,
{
    fn decode(&self, key: &[u8], value: &Bytes) -> Result<T, DecodeError> {
        self(key, value).map_err(Into::into)
    }
}

/// Runs one decode, turning a panic into a [`DecodeError`] ("decoder panicked: ...")
/// so that a bad value is isolated (reported with its key, revision and error)
/// instead of unwinding through the mirror's task and ending the watch.
///
/// `AssertUnwindSafe`: nothing the mirror owns is borrowed by the decode, so a
/// panic cannot leave mirror state half-updated; the decoder's own state is the
/// decoder's business.
pub(crate) fn guard<T>(decode: impl FnOnce() -> Result<T, DecodeError>) -> Result<T, DecodeError> {
    catch_unwind(AssertUnwindSafe(decode)).unwrap_or_else(|payload| {
        Err(format!("decoder panicked: {}", panic_message(&*payload)).into())
    })
}

/// The text of a panic payload (`panic!` with a literal or a format string).
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}

/// What to do with a key whose new value fails to decode. Either way the failure is
/// reported (status and metrics) with the key, revision and error, and the watch
/// goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodePolicy {
    /// Remove the key from the mirror (subscribers see a delete) until a value
    /// that decodes arrives.
    #[default]
    DropKey,
    /// Keep the key's last good entry (subscribers see no change).
    KeepLastGood,
}

/// A key whose current value in etcd could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeFailure {
    /// The key.
    pub key: super::Key,
    /// The revision of the bad value.
    pub revision: i64,
    /// The decoder's error.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_closure_decoder_is_an_error_with_the_panic_message() {
        let decoder = |_key: &[u8], value: &[u8]| -> Result<String, std::str::Utf8Error> {
            if value == b"boom" {
                panic!("cannot decode {}", String::from_utf8_lossy(value));
            }
            std::str::from_utf8(value).map(str::to_owned)
        };
        assert_eq!(
            guard(|| decoder.decode(b"k", &Bytes::from_static(b"ok"))).unwrap(),
            "ok"
        );
        // Through `guard`, as the store calls every decoder.
        let err = guard(|| decoder.decode(b"k", &Bytes::from_static(b"boom"))).unwrap_err();
        assert_eq!(err.to_string(), "decoder panicked: cannot decode boom");
        // Still usable afterwards, and ordinary errors are unchanged.
        assert_eq!(
            guard(|| decoder.decode(b"k", &Bytes::from_static(b"ok"))).unwrap(),
            "ok"
        );
        let err = decoder
            .decode(b"k", &Bytes::from_static(&[0xff]))
            .unwrap_err();
        assert!(!err.to_string().contains("panicked"), "{err}");
    }

    #[test]
    fn guard_isolates_any_decoder_and_any_payload() {
        struct Strict;
        impl Decoder<u32> for Strict {
            fn decode(&self, _key: &[u8], value: &Bytes) -> Result<u32, DecodeError> {
                assert!(!value.is_empty(), "empty value");
                Ok(value.len() as u32)
            }
        }
        let d: &dyn Decoder<u32> = &Strict;
        assert_eq!(
            guard(|| d.decode(b"k", &Bytes::from_static(b"abc"))).unwrap(),
            3
        );
        let err = guard(|| d.decode(b"k", &Bytes::new())).unwrap_err();
        assert_eq!(err.to_string(), "decoder panicked: empty value");
        let err = guard::<()>(|| std::panic::panic_any(7_u8)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "decoder panicked: non-string panic payload"
        );
    }
}
