//! TensorBoard event files, written without TensorFlow: a file of TFRecord frames, each
//! holding one `tensorflow.Event` protobuf. The first event carries
//! `file_version = "brain.Event:2"`; every later one a `Summary` of scalar values.
//!
//! TFRecord frame (all integers little-endian):
//! ```text
//! u64 length | u32 masked_crc32c(length bytes) | data[length] | u32 masked_crc32c(data)
//! ```
//! The messages below are the subset of tensorflow/core/util/event.proto and
//! tensorflow/core/framework/summary.proto that scalars need, with the same field numbers.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::{Error, Result};

/// `tensorflow.Event` (event.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "event::What", tags = "3, 5")]
    pub what: Option<event::What>,
}

pub mod event {
    /// The `what` oneof of `tensorflow.Event`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum What {
        #[prost(string, tag = "3")]
        FileVersion(String),
        #[prost(message, tag = "5")]
        Summary(super::Summary),
    }
}

/// `tensorflow.Summary` (summary.proto).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`. `simple_value` is a member of the `value` oneof in
/// summary.proto: it must be written even when it is 0.0 (a plain proto3 float would be
/// skipped), hence the explicit presence.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// What the first event of every file says; TensorBoard checks it.
pub const FILE_VERSION: &str = "brain.Event:2";

/// TFRecord's CRC masking (tensorflow/core/lib/hash/crc32c.h): rotate right by 15 bits
/// and add a constant, so that CRCs of data that embeds CRCs stay well distributed.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord frame around `data`.
pub fn tfrecord_frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && !h.contains(['/', '\\']))
        .unwrap_or_else(|| "localhost".into())
}

static FILE_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Appends events to one new `events.out.tfevents.<time>.<host>.<pid>.<n>` file (the
/// name PyTorch's and TensorFlow's SummaryWriter give theirs; TensorBoard picks up any
/// file whose name contains `tfevents`). Every write is flushed, so TensorBoard shows a
/// running job live and a crash loses nothing already logged.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `logdir` if needed and a new event file in it, starting with the
    /// file-version event.
    pub fn create(logdir: &Path) -> Result<Self> {
        std::fs::create_dir_all(logdir).map_err(|e| Error::io(logdir, e))?;
        let wall = now();
        let n = FILE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("events.out.tfevents.{:010}.{}.{}.{n}", wall as u64, hostname(), std::process::id());
        let path = logdir.join(name);
        let file = File::options().write(true).create_new(true).open(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { file: BufWriter::new(file), path };
        w.write_event(&Event { wall_time: wall, step: 0, what: Some(event::What::FileVersion(FILE_VERSION.into())) })?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write_event(&mut self, ev: &Event) -> Result<()> {
        let frame = tfrecord_frame(&ev.encode_to_vec());
        self.file
            .write_all(&frame)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// One event at `step` with a scalar per `(tag, value)`. Non-finite values are
    /// written as they are: TensorBoard shows NaN/inf, which is what a diverging run
    /// should look like.
    pub fn add_scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        let value = scalars
            .iter()
            .map(|(tag, v)| SummaryValue { tag: tag.to_string(), simple_value: Some(*v as f32) })
            .collect();
        self.write_event(&Event { wall_time: now(), step: step as i64, what: Some(event::What::Summary(Summary { value })) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: independent of
    /// the crate the writer uses.
    fn crc32c_naive(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
            }
        }
        !crc
    }

    /// Written as TensorFlow's crc32c.h spells it, not with the writer's rotate_right.
    #[allow(clippy::manual_rotate)]
    fn masked(data: &[u8]) -> u32 {
        let c = crc32c_naive(data);
        ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
    }

    /// Splits a TFRecord file into its records, checking both CRCs of every frame.
    fn read_frames(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(len_crc, masked(len_bytes), "length CRC of the frame at byte {at}");
            let data = &bytes[at + 12..at + 12 + len];
            let data_crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(data_crc, masked(data), "data CRC of the frame at byte {at}");
            out.push(data.to_vec());
            at += 16 + len;
        }
        out
    }

    /// Protobuf wire format by hand: (field number, wire type, payload) triples.
    enum Wire {
        Varint(u64),
        Fixed64(u64),
        Bytes(Vec<u8>),
        Fixed32(u32),
    }

    fn varint(b: &[u8], at: &mut usize) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = b[*at];
            *at += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        v
    }

    fn fields(b: &[u8]) -> Vec<(u64, Wire)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < b.len() {
            let key = varint(b, &mut at);
            let (num, ty) = (key >> 3, key & 7);
            let w = match ty {
                0 => Wire::Varint(varint(b, &mut at)),
                1 => {
                    at += 8;
                    Wire::Fixed64(u64::from_le_bytes(b[at - 8..at].try_into().unwrap()))
                }
                2 => {
                    let n = varint(b, &mut at) as usize;
                    at += n;
                    Wire::Bytes(b[at - n..at].to_vec())
                }
                5 => {
                    at += 4;
                    Wire::Fixed32(u32::from_le_bytes(b[at - 4..at].try_into().unwrap()))
                }
                other => panic!("unexpected wire type {other}"),
            };
            out.push((num, w));
        }
        out
    }

    /// An event as the test reads it: (wall_time, step, file_version, [(tag, value)]).
    type Decoded = (f64, i64, Option<String>, Vec<(String, f32)>);

    fn decode_event(b: &[u8]) -> Decoded {
        let (mut wall, mut step, mut version, mut values) = (0.0, 0, None, Vec::new());
        for (num, w) in fields(b) {
            match (num, w) {
                (1, Wire::Fixed64(v)) => wall = f64::from_bits(v),
                (2, Wire::Varint(v)) => step = v as i64,
                (3, Wire::Bytes(s)) => version = Some(String::from_utf8(s).unwrap()),
                (5, Wire::Bytes(summary)) => {
                    for (n, v) in fields(&summary) {
                        let (1, Wire::Bytes(value)) = (n, v) else { panic!("Summary field {n}") };
                        let (mut tag, mut x) = (String::new(), None);
                        for (n, v) in fields(&value) {
                            match (n, v) {
                                (1, Wire::Bytes(t)) => tag = String::from_utf8(t).unwrap(),
                                (2, Wire::Fixed32(f)) => x = Some(f32::from_bits(f)),
                                _ => panic!("Summary.Value field {n}"),
                            }
                        }
                        values.push((tag, x.expect("simple_value present")));
                    }
                }
                (n, _) => panic!("Event field {n}"),
            }
        }
        (wall, step, version, values)
    }

    #[test]
    fn crc_matches_the_castagnoli_check_value() {
        // The standard check value of CRC-32C: crc("123456789") = 0xE3069283.
        assert_eq!(crc32c_naive(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn event_file_decodes_with_an_independent_reader() {
        let dir = tempfile::tempdir().unwrap();
        let before = now();
        let mut w = EventWriter::create(&dir.path().join("runs")).unwrap();
        w.add_scalars(1, &[("train/loss", 2.5), ("train/learning_rate", 1e-4)]).unwrap();
        // 0.0 must still be written (a plain proto3 float field would be dropped).
        w.add_scalars(2, &[("train/loss", 0.0), ("eval/ce", f64::NAN)]).unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("events.out.tfevents.") && name.contains(&hostname()), "{name}");

        let frames = read_frames(&std::fs::read(&path).unwrap());
        let events: Vec<Decoded> = frames.iter().map(|f| decode_event(f)).collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].2.as_deref(), Some("brain.Event:2"));
        assert!(events[0].3.is_empty());
        for e in &events {
            assert!(e.0 >= before.floor() && e.0 <= now() + 1.0, "wall_time {}", e.0);
        }
        assert_eq!(events[1].1, 1);
        assert_eq!(events[1].3, vec![("train/loss".into(), 2.5), ("train/learning_rate".into(), 1e-4f32)]);
        assert_eq!(events[2].1, 2);
        assert_eq!(events[2].3[0], ("train/loss".into(), 0.0));
        assert_eq!(events[2].3[1].0, "eval/ce");
        assert!(events[2].3[1].1.is_nan());
    }

    #[test]
    fn two_writers_in_one_dir_get_two_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = EventWriter::create(dir.path()).unwrap();
        let b = EventWriter::create(dir.path()).unwrap();
        assert_ne!(a.path(), b.path());
    }
}
