//! Turning raw etcd values into the mirror's value type.

use bytes::Bytes;

/// The error a [`Decoder`] returns; its `Display` text is what status reports.
pub type DecodeError = Box<dyn std::error::Error + Send + Sync>;

/// Decodes a value read from etcd. Called once per put (and per listed key), on the
/// mirror's task: keep it cheap. It must not panic; return an error instead.
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
    pub key: Bytes,
    /// The revision of the bad value.
    pub revision: i64,
    /// The decoder's error.
    pub error: String,
}
