//! Length-prefixed postcard frames, with the size bound in the codec's constructor so no
//! decoder can forget it.
//!
//! The decoder never reserves space for a frame's claimed length: a buffer grows only with
//! bytes that actually arrived, so a peer cannot make us allocate by claiming.

use bytes::{Buf, BufMut, BytesMut};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::codec::{Decoder, Encoder};

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is larger than the bound.
    #[error("frame of {claimed} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Claimed or actual length.
        claimed: u64,
        /// The bound.
        max: usize,
    },
    /// The frame's content is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
    /// The stream failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

const PREFIX: usize = 4;

/// Encodes `value` as one frame (length prefix included).
pub fn encode_frame<T: Serialize>(value: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(value, vec![0u8; PREFIX])?;
    let len = out.len() - PREFIX;
    if len > max {
        return Err(FrameError::TooLarge {
            claimed: len as u64,
            max,
        });
    }
    out[..PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes one frame from the start of `input`: `Ok(None)` if more bytes are needed,
/// otherwise the value and how many bytes it used.
pub fn decode_frame<T: DeserializeOwned>(
    input: &[u8],
    max: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(prefix) = input.get(..PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge {
            claimed: len as u64,
            max,
        });
    }
    let Some(body) = input.get(PREFIX..PREFIX + len) else {
        return Ok(None);
    };
    let (value, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        // A frame holds exactly one message; trailing bytes mean the peer and we disagree
        // on the format, and guessing would hide it.
        return Err(FrameError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(Some((value, PREFIX + len)))
}

/// A tokio codec for frames of `T`, bounded by `max` bytes each way.
#[derive(Debug)]
pub struct FrameCodec<T> {
    max: usize,
    /// The size of the last frame decoded, prefix included.
    last_len: usize,
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T> FrameCodec<T> {
    /// A codec that refuses frames larger than `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameCodec {
            max,
            last_len: 0,
            _type: std::marker::PhantomData,
        }
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The size in bytes of the last frame decoded (prefix included), for budgets of
    /// what a peer's frames hold.
    pub fn last_frame_len(&self) -> usize {
        self.last_len
    }
}

impl<T: DeserializeOwned> Decoder for FrameCodec<T> {
    type Item = T;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<T>, FrameError> {
        match decode_frame(src, self.max)? {
            Some((value, used)) => {
                src.advance(used);
                self.last_len = used;
                Ok(Some(value))
            }
            None => Ok(None),
        }
    }
}

impl<T: Serialize> Encoder<&T> for FrameCodec<T> {
    type Error = FrameError;

    fn encode(&mut self, item: &T, dst: &mut BytesMut) -> Result<(), FrameError> {
        let start = dst.len();
        dst.put_bytes(0, PREFIX);
        let writer = postcard::to_extend(item, BytesMutWriter(dst))?;
        let len = writer.0.len() - start - PREFIX;
        if len > self.max {
            dst.truncate(start);
            return Err(FrameError::TooLarge {
                claimed: len as u64,
                max: self.max,
            });
        }
        dst[start..start + PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

/// Lets postcard append straight into the codec's buffer.
struct BytesMutWriter<'a>(&'a mut BytesMut);

impl Extend<u8> for BytesMutWriter<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Envelope, Handshake};

    #[test]
    fn a_frame_round_trips_through_the_codec() {
        let mut codec = FrameCodec::<Envelope>::new(1024);
        let mut buf = BytesMut::new();
        let value = Envelope::Ping { seq: 7, sent_us: 9 };
        codec.encode(&value, &mut buf).unwrap();
        assert_eq!(buf.len(), encode_frame(&value, 1024).unwrap().len());
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(value));
        assert!(buf.is_empty());
    }

    #[test]
    fn an_oversized_prefix_is_refused_before_the_body_arrives() {
        let input = [0x7f, 0xff, 0xff, 0xff];
        let err = decode_frame::<Handshake>(&input, 4096).unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                claimed: 0x7fff_ffff,
                max: 4096
            }
        ));
    }

    #[test]
    fn encoding_past_the_bound_fails_and_leaves_the_buffer_as_it_was() {
        let mut codec = FrameCodec::<Handshake>::new(16);
        let mut buf = BytesMut::from(&b"xy"[..]);
        let big = Handshake::Refused {
            reason: "x".repeat(100),
        };
        assert!(matches!(
            codec.encode(&big, &mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(&buf[..], b"xy");
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_malformed() {
        let mut frame = encode_frame(&Envelope::Cancel { id: 1 }, 64).unwrap();
        frame.push(0);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            decode_frame::<Envelope>(&frame, 64),
            Err(FrameError::Malformed(_))
        ));
    }
}
