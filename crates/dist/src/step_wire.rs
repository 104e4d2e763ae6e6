//! The wire encoding of the step plan that node 0 sends to the ranks of another node, and of
//! that node's answers.
//!
//! Every message is a frame: a `u32` little-endian payload length, then the payload, at most
//! [`MAX_STEP_FRAME`] bytes (a longer length is refused before anything is allocated). A
//! payload starts with a one-byte tag; every number is little-endian, every list a `u32` count
//! then its items, and every count is checked against the bytes left in the frame before
//! anything is allocated. Bytes left over after a message are an error.
//!
//! Node 0 → node (a *command*):
//! * `0` forward: the batch;
//! * `1` sampled forward: the batch, the sampling rows, `sample_vocab` (`u64`);
//! * `2` block copies: the kind (`0` copy, `1` swap out, `2` swap in), then the copies as
//!   (`src`, `dst`) `u32` pairs;
//! * `3` shutdown;
//! * `4` reset the group (after a step every rank refused alike; answered done, or failed
//!   when the group cannot be reset).
//!
//! A batch is `token_ids`, `positions` (`u32` lists), `slot_mapping` (`i64` list),
//! `seq_starts` (`u32` list), `block_tables` (`i32` list), `max_blocks` (`u64`),
//! `context_lens` (`i32` list), `logits_indices` (`u32` list); a sampling row is
//! `temperature`, `top_k` (`u32`), `top_p`, `min_p`, `repetition_penalty` (`f32`), `history`
//! (`u32` list), `uniform` (`f64`).
//!
//! Node → node 0 (an *answer*): `0` ready (every local rank is built), `1` done (every local
//! rank ran the step), or `2` failed: a list of (world rank `u32`, kind `u8`, message) for
//! each local rank that did not succeed, where the kind is `0` own error, `1` collective
//! error, `2` panic, `3` thread gone, `4` stuck, and the message a UTF-8 string (`u32`
//! length, at most [`MAX_MESSAGE`] bytes). Ranks not listed succeeded.

use std::io::{self, Read, Write};
use std::sync::Arc;

use kv_block_manager::{BlockId, CopyOp};

use crate::tensor_parallel::{CopyKind, Job, OwnedBatch, OwnedRow};

/// The largest step frame payload, in bytes (64 MiB: a batch of 16K tokens with its block
/// tables is well under 1 MiB).
pub const MAX_STEP_FRAME: usize = 64 << 20;
/// The longest failure message sent, in bytes (longer ones are cut at a character boundary).
pub(crate) const MAX_MESSAGE: usize = 4096;

const CMD_FORWARD: u8 = 0;
const CMD_FORWARD_SAMPLED: u8 = 1;
const CMD_COPY: u8 = 2;
const CMD_SHUTDOWN: u8 = 3;
const CMD_RESET_GROUP: u8 = 4;

const ANSWER_READY: u8 = 0;
const ANSWER_DONE: u8 = 1;
const ANSWER_FAILED: u8 = 2;

/// What node 0 asks of a node.
#[derive(Debug)]
pub(crate) enum Command {
    /// Run this step on every local rank.
    Step(Job),
    /// Drop the ranks and end.
    Shutdown,
}

/// How a remote rank did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// Its backend returned an error of its own.
    Error,
    /// A collective failed under it (a peer failed).
    Collective,
    /// Its backend panicked.
    Panic,
    /// Its thread is gone.
    Gone,
    /// It did not answer within the node's grace (stuck in a collective?).
    Stuck,
    /// Node 0 lost the node (the connection broke, or the node spoke nonsense).
    Lost,
}

impl FailureKind {
    const WIRE: [(Self, u8); 5] = [
        (Self::Error, 0),
        (Self::Collective, 1),
        (Self::Panic, 2),
        (Self::Gone, 3),
        (Self::Stuck, 4),
    ];

    fn to_wire(self) -> u8 {
        Self::WIRE
            .iter()
            .find(|(k, _)| *k == self)
            .map_or(0, |(_, b)| *b)
    }

    fn from_wire(b: u8) -> Option<Self> {
        Self::WIRE.iter().find(|(_, w)| *w == b).map(|(k, _)| *k)
    }
}

/// One remote rank that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RankFailure {
    /// Its world rank.
    pub rank: usize,
    pub kind: FailureKind,
    pub message: String,
}

/// What a node answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Every local rank is built.
    Ready,
    /// Every local rank ran the step.
    Done,
    /// These ranks did not succeed (the others did).
    Failed(Vec<RankFailure>),
}

/// Encodes into a frame (length prefix patched by [`Encoder::finish`]).
struct Encoder(Vec<u8>);

impl Encoder {
    fn new(tag: u8) -> Self {
        Self(vec![0, 0, 0, 0, tag])
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    fn list<T: Copy, const N: usize>(&mut self, items: &[T], bytes: impl Fn(T) -> [u8; N]) {
        self.count(items.len());
        self.0.reserve(items.len() * N);
        for &item in items {
            self.0.extend_from_slice(&bytes(item));
        }
    }
    fn text(&mut self, s: &str) {
        let mut end = s.len().min(MAX_MESSAGE);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.count(end);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
    }
    /// The frame, or an error when the payload is above [`MAX_STEP_FRAME`].
    fn finish(mut self) -> io::Result<Vec<u8>> {
        let len = self.0.len() - 4;
        let len = u32::try_from(len)
            .ok()
            .filter(|&l| l as usize <= MAX_STEP_FRAME)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a step frame of {len} bytes is above the {MAX_STEP_FRAME}-byte limit"),
                )
            })?;
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        Ok(self.0)
    }
}

/// Decodes a payload; every error names the field.
struct Decoder<'a> {
    rest: &'a [u8],
}

impl<'a> Decoder<'a> {
    fn bytes(&mut self, field: &str, n: usize) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err(format!(
                "`{field}`: {n} bytes needed, {} left in the frame",
                self.rest.len()
            ));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], String> {
        let b = self.bytes(field, N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }
    fn u8(&mut self, field: &str) -> Result<u8, String> {
        self.array::<1>(field).map(|b| b[0])
    }
    fn u32(&mut self, field: &str) -> Result<u32, String> {
        self.array(field).map(u32::from_le_bytes)
    }
    fn f32(&mut self, field: &str) -> Result<f32, String> {
        self.array(field).map(f32::from_le_bytes)
    }
    fn usize(&mut self, field: &str) -> Result<usize, String> {
        let v = u64::from_le_bytes(self.array(field)?);
        usize::try_from(v).map_err(|_| format!("`{field}`: {v} does not fit this machine"))
    }
    /// A `u32` count of items of `item` bytes each, checked against the bytes left.
    fn count(&mut self, field: &str, item: usize) -> Result<usize, String> {
        let n = self.u32(field)? as usize;
        match n.checked_mul(item) {
            Some(total) if total <= self.rest.len() => Ok(n),
            _ => Err(format!(
                "`{field}`: {n} items of {item} bytes, {} bytes left in the frame",
                self.rest.len()
            )),
        }
    }
    fn list<T, const N: usize>(
        &mut self,
        field: &str,
        from: impl Fn([u8; N]) -> T,
    ) -> Result<Vec<T>, String> {
        let n = self.count(field, N)?;
        let bytes = self.bytes(field, n * N)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                from(a)
            })
            .collect())
    }
    fn text(&mut self, field: &str) -> Result<String, String> {
        let n = self.count(field, 1)?;
        if n > MAX_MESSAGE {
            return Err(format!("`{field}`: {n} bytes, above {MAX_MESSAGE}"));
        }
        let bytes = self.bytes(field, n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("`{field}`: not UTF-8"))
    }
    fn end(self, what: &str) -> Result<(), String> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{what}: {} bytes left over after the message",
                self.rest.len()
            ))
        }
    }
}

fn encode_batch(e: &mut Encoder, b: &OwnedBatch) {
    e.list(&b.token_ids, u32::to_le_bytes);
    e.list(&b.positions, u32::to_le_bytes);
    e.list(&b.slot_mapping, i64::to_le_bytes);
    e.list(&b.seq_starts, u32::to_le_bytes);
    e.list(&b.block_tables, i32::to_le_bytes);
    e.u64(b.max_blocks as u64);
    e.list(&b.context_lens, i32::to_le_bytes);
    e.list(&b.logits_indices, u32::to_le_bytes);
}

fn decode_batch(d: &mut Decoder<'_>) -> Result<OwnedBatch, String> {
    Ok(OwnedBatch {
        token_ids: d.list("token_ids", u32::from_le_bytes)?,
        positions: d.list("positions", u32::from_le_bytes)?,
        slot_mapping: d.list("slot_mapping", i64::from_le_bytes)?,
        seq_starts: d.list("seq_starts", u32::from_le_bytes)?,
        block_tables: d.list("block_tables", i32::from_le_bytes)?,
        max_blocks: d.usize("max_blocks")?,
        context_lens: d.list("context_lens", i32::from_le_bytes)?,
        logits_indices: d.list("logits_indices", u32::from_le_bytes)?,
    })
}

/// The smallest encoded sampling row: five 4-byte fields, an empty history, the uniform.
const MIN_ROW: usize = 5 * 4 + 4 + 8;

/// The frame of a step (the logits buffer of a forward is not sent: remote ranks keep their
/// own).
pub(crate) fn encode_job(job: &Job) -> io::Result<Vec<u8>> {
    let e = match job {
        Job::Forward { batch, .. } => {
            let mut e = Encoder::new(CMD_FORWARD);
            encode_batch(&mut e, batch);
            e
        }
        Job::ForwardSampled {
            batch,
            rows,
            sample_vocab,
        } => {
            let mut e = Encoder::new(CMD_FORWARD_SAMPLED);
            encode_batch(&mut e, batch);
            e.count(rows.len());
            for r in rows.iter() {
                e.u32(r.temperature.to_bits());
                e.u32(r.top_k);
                e.u32(r.top_p.to_bits());
                e.u32(r.min_p.to_bits());
                e.u32(r.repetition_penalty.to_bits());
                e.list(&r.history, u32::to_le_bytes);
                e.u64(r.uniform.to_bits());
            }
            e.u64(*sample_vocab as u64);
            e
        }
        Job::Copy { kind, copies } => {
            let mut e = Encoder::new(CMD_COPY);
            e.u8(match kind {
                CopyKind::Blocks => 0,
                CopyKind::SwapOut => 1,
                CopyKind::SwapIn => 2,
            });
            e.count(copies.len());
            for c in copies.iter() {
                e.u32(c.src.0);
                e.u32(c.dst.0);
            }
            e
        }
        Job::ResetGroup => Encoder::new(CMD_RESET_GROUP),
    };
    e.finish()
}

/// The frame of a shutdown.
pub(crate) fn encode_shutdown() -> Vec<u8> {
    vec![1, 0, 0, 0, CMD_SHUTDOWN]
}

/// Decodes a command payload, or says which field is wrong.
pub(crate) fn decode_command(payload: &[u8]) -> Result<Command, String> {
    let mut d = Decoder { rest: payload };
    let command = match d.u8("command tag")? {
        CMD_FORWARD => Command::Step(Job::Forward {
            batch: Arc::new(decode_batch(&mut d)?),
            out: Vec::new(),
        }),
        CMD_FORWARD_SAMPLED => {
            let batch = Arc::new(decode_batch(&mut d)?);
            let n = d.count("rows", MIN_ROW)?;
            let mut rows = Vec::with_capacity(n);
            for _ in 0..n {
                rows.push(OwnedRow {
                    temperature: d.f32("rows.temperature")?,
                    top_k: d.u32("rows.top_k")?,
                    top_p: d.f32("rows.top_p")?,
                    min_p: d.f32("rows.min_p")?,
                    repetition_penalty: d.f32("rows.repetition_penalty")?,
                    history: d.list("rows.history", u32::from_le_bytes)?,
                    uniform: f64::from_bits(u64::from_le_bytes(d.array("rows.uniform")?)),
                });
            }
            Command::Step(Job::ForwardSampled {
                batch,
                rows: Arc::new(rows),
                sample_vocab: d.usize("sample_vocab")?,
            })
        }
        CMD_COPY => {
            let kind = match d.u8("copy kind")? {
                0 => CopyKind::Blocks,
                1 => CopyKind::SwapOut,
                2 => CopyKind::SwapIn,
                other => return Err(format!("`copy kind`: unknown kind {other}")),
            };
            let copies = d.list("copies", |b: [u8; 8]| {
                let [a0, a1, a2, a3, b0, b1, b2, b3] = b;
                CopyOp {
                    src: BlockId(u32::from_le_bytes([a0, a1, a2, a3])),
                    dst: BlockId(u32::from_le_bytes([b0, b1, b2, b3])),
                }
            })?;
            Command::Step(Job::Copy {
                kind,
                copies: Arc::new(copies),
            })
        }
        CMD_SHUTDOWN => Command::Shutdown,
        CMD_RESET_GROUP => Command::Step(Job::ResetGroup),
        other => return Err(format!("`command tag`: unknown tag {other}")),
    };
    d.end("command")?;
    Ok(command)
}

/// The frame of an answer.
pub(crate) fn encode_answer(answer: &Answer) -> io::Result<Vec<u8>> {
    let e = match answer {
        Answer::Ready => Encoder::new(ANSWER_READY),
        Answer::Done => Encoder::new(ANSWER_DONE),
        Answer::Failed(failures) => {
            let mut e = Encoder::new(ANSWER_FAILED);
            e.count(failures.len());
            for f in failures {
                e.u32(u32::try_from(f.rank).unwrap_or(u32::MAX));
                e.u8(f.kind.to_wire());
                e.text(&f.message);
            }
            e
        }
    };
    e.finish()
}

/// Decodes an answer payload, or says which field is wrong.
pub(crate) fn decode_answer(payload: &[u8]) -> Result<Answer, String> {
    let mut d = Decoder { rest: payload };
    let answer = match d.u8("answer tag")? {
        ANSWER_READY => Answer::Ready,
        ANSWER_DONE => Answer::Done,
        ANSWER_FAILED => {
            // Each failure is at least a rank, a kind and an empty message.
            let n = d.count("failures", 4 + 1 + 4)?;
            let mut failures = Vec::with_capacity(n);
            for _ in 0..n {
                let rank = d.u32("failures.rank")? as usize;
                let kind = d.u8("failures.kind")?;
                let kind = FailureKind::from_wire(kind)
                    .ok_or_else(|| format!("`failures.kind`: unknown kind {kind}"))?;
                failures.push(RankFailure {
                    rank,
                    kind,
                    message: d.text("failures.message")?,
                });
            }
            Answer::Failed(failures)
        }
        other => return Err(format!("`answer tag`: unknown tag {other}")),
    };
    d.end("answer")?;
    Ok(answer)
}

/// Why a frame could not be read.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The connection ended before the frame's first byte (a clean close).
    Eof,
    /// The length is above [`MAX_STEP_FRAME`]; nothing was allocated.
    TooLong(u32),
    /// The connection broke (or ended mid-frame).
    Io(io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Eof => write!(f, "the peer closed the connection"),
            Self::TooLong(len) => write!(
                f,
                "a frame of {len} bytes is longer than the {MAX_STEP_FRAME}-byte limit"
            ),
            Self::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                write!(f, "the connection closed mid-frame")
            }
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Reads one step frame's payload; a length above [`MAX_STEP_FRAME`] is refused before
/// anything is allocated.
pub(crate) fn read_step_frame(input: &mut impl Read) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match input.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Eof),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = u32::from_le_bytes(len);
    if len as usize > MAX_STEP_FRAME {
        return Err(FrameError::TooLong(len));
    }
    let mut payload = vec![0u8; len as usize];
    input.read_exact(&mut payload).map_err(FrameError::Io)?;
    Ok(payload)
}

/// Writes a whole frame (as made by the encoders) and flushes.
pub(crate) fn write_step_frame(out: &mut impl Write, frame: &[u8]) -> io::Result<()> {
    out.write_all(frame)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> OwnedBatch {
        OwnedBatch {
            token_ids: vec![5, 17, 42, u32::MAX],
            positions: vec![0, 1, 2, 3],
            slot_mapping: vec![0, 1, -1, i64::MAX],
            seq_starts: vec![0, 2, 4],
            block_tables: vec![0, -1, 3, 7],
            max_blocks: 2,
            context_lens: vec![2, 2],
            logits_indices: vec![1, 3],
        }
    }

    fn jobs() -> Vec<Job> {
        let row = |history: Vec<u32>| OwnedRow {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repetition_penalty: 1.1,
            history,
            uniform: 0.123_456_789,
        };
        let op = |s, d| CopyOp {
            src: BlockId(s),
            dst: BlockId(d),
        };
        vec![
            Job::Forward {
                batch: Arc::new(batch()),
                out: vec![1.0; 3],
            },
            Job::Forward {
                batch: Arc::new(OwnedBatch {
                    token_ids: vec![],
                    positions: vec![],
                    slot_mapping: vec![],
                    seq_starts: vec![0],
                    block_tables: vec![],
                    max_blocks: 0,
                    context_lens: vec![],
                    logits_indices: vec![],
                }),
                out: Vec::new(),
            },
            Job::ForwardSampled {
                batch: Arc::new(batch()),
                rows: Arc::new(vec![row(vec![1, 2, 3]), row(vec![])]),
                sample_vocab: 300,
            },
            Job::Copy {
                kind: CopyKind::Blocks,
                copies: Arc::new(vec![op(0, 1), op(u32::MAX, 2)]),
            },
            Job::Copy {
                kind: CopyKind::SwapOut,
                copies: Arc::new(vec![op(3, 4)]),
            },
            Job::Copy {
                kind: CopyKind::SwapIn,
                copies: Arc::new(vec![]),
            },
            Job::ResetGroup,
        ]
    }

    /// What a job holds, as comparable text (the logits buffer is not sent).
    fn describe(command: &Command) -> String {
        match command {
            Command::Step(Job::Forward { batch, .. }) => format!("forward {batch:?}"),
            other => format!("{other:?}"),
        }
    }

    fn payload(frame: &[u8]) -> &[u8] {
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        assert_eq!(len, frame.len() - 4);
        &frame[4..]
    }

    #[test]
    fn commands_round_trip_and_every_truncation_is_an_error() {
        let mut commands: Vec<Command> = jobs().into_iter().map(Command::Step).collect();
        commands.push(Command::Shutdown);
        for command in &commands {
            let frame = match command {
                Command::Step(job) => encode_job(job).unwrap(),
                Command::Shutdown => encode_shutdown(),
            };
            let bytes = payload(&frame);
            let back = decode_command(bytes).unwrap();
            assert_eq!(describe(&back), describe(command));
            for len in 0..bytes.len() {
                assert!(decode_command(&bytes[..len]).is_err(), "{len} bytes");
            }
            let mut long = bytes.to_vec();
            long.push(0);
            let err = decode_command(&long).unwrap_err();
            assert!(err.contains("left over"), "{err}");
            // Through a reader too.
            let read = read_step_frame(&mut frame.as_slice()).unwrap();
            assert_eq!(read, bytes);
        }
    }

    #[test]
    fn forward_logits_buffers_are_not_sent() {
        let frame = encode_job(&Job::Forward {
            batch: Arc::new(batch()),
            out: vec![0.5; 1000],
        })
        .unwrap();
        assert!(frame.len() < 200, "{} bytes", frame.len());
        match decode_command(payload(&frame)).unwrap() {
            Command::Step(Job::Forward { out, .. }) => assert!(out.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answers_round_trip_and_every_truncation_is_an_error() {
        let answers = [
            Answer::Ready,
            Answer::Done,
            Answer::Failed(vec![
                RankFailure {
                    rank: 3,
                    kind: FailureKind::Error,
                    message: "injected failure é".into(),
                },
                RankFailure {
                    rank: 2,
                    kind: FailureKind::Collective,
                    message: String::new(),
                },
                RankFailure {
                    rank: 5,
                    kind: FailureKind::Panic,
                    message: "boom".into(),
                },
                RankFailure {
                    rank: 6,
                    kind: FailureKind::Gone,
                    message: "gone".into(),
                },
                RankFailure {
                    rank: 7,
                    kind: FailureKind::Stuck,
                    message: "stuck".into(),
                },
            ]),
        ];
        for answer in &answers {
            let frame = encode_answer(answer).unwrap();
            let bytes = payload(&frame);
            assert_eq!(&decode_answer(bytes).unwrap(), answer);
            for len in 0..bytes.len() {
                assert!(decode_answer(&bytes[..len]).is_err(), "{len} bytes");
            }
        }
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let answer = Answer::Failed(vec![RankFailure {
            rank: 1,
            kind: FailureKind::Error,
            message: "é".repeat(MAX_MESSAGE),
        }]);
        let frame = encode_answer(&answer).unwrap();
        match decode_answer(payload(&frame)).unwrap() {
            Answer::Failed(f) => {
                assert_eq!(f[0].message.len(), MAX_MESSAGE);
                assert!(f[0].message.chars().all(|c| c == 'é'));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_tags_and_kinds_are_refused_naming_the_field() {
        let err = |r: Result<Command, String>| r.err().unwrap_or_default();
        assert!(err(decode_command(&[9])).contains("`command tag`: unknown tag 9"));
        assert!(err(decode_command(&[])).contains("`command tag`"));
        assert!(err(decode_command(&[CMD_COPY, 7, 0, 0, 0, 0])).contains("`copy kind`"));
        let answer = |b: &[u8]| decode_answer(b).err().unwrap_or_default();
        assert!(answer(&[9]).contains("`answer tag`: unknown tag 9"));
        // One failure, rank 1, kind 9, empty message.
        let bad_kind = [ANSWER_FAILED, 1, 0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0];
        assert!(answer(&bad_kind).contains("`failures.kind`"));
        // Not UTF-8.
        let bad_text = [ANSWER_FAILED, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0xff];
        assert!(answer(&bad_text).contains("not UTF-8"));
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        // A forward whose token list claims u32::MAX items.
        let bytes = [CMD_FORWARD, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4];
        let err = decode_command(&bytes).err().unwrap_or_default();
        assert!(err.contains("`token_ids`"), "{err}");
        let failures = [ANSWER_FAILED, 0xff, 0xff, 0xff, 0xff];
        let err = decode_answer(&failures).err().unwrap_or_default();
        assert!(err.contains("`failures`"), "{err}");
    }

    #[test]
    fn oversized_truncated_and_empty_frames_are_refused() {
        let huge = u32::MAX.to_le_bytes();
        assert!(matches!(
            read_step_frame(&mut huge.as_slice()),
            Err(FrameError::TooLong(u32::MAX))
        ));
        let just_over = u32::try_from(MAX_STEP_FRAME + 1).unwrap().to_le_bytes();
        assert!(matches!(
            read_step_frame(&mut just_over.as_slice()),
            Err(FrameError::TooLong(_))
        ));
        assert!(matches!(
            read_step_frame(&mut [].as_slice()),
            Err(FrameError::Eof)
        ));
        for partial in [&[1u8, 0][..], &[5, 0, 0, 0, 1, 2]] {
            let err = read_step_frame(&mut &partial[..]).unwrap_err();
            assert!(err.to_string().contains("mid-frame"), "{err}");
        }
        // An encoder refuses a payload above the limit.
        let mut e = Encoder::new(CMD_FORWARD);
        e.0.resize(MAX_STEP_FRAME + 5, 0);
        assert!(e.finish().is_err());
    }
}
