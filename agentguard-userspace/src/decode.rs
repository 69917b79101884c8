//! Decoding ring-buffer records into the shared event structs. Pure: a byte
//! slice in, an event or a [`DecodeError`] out, lengths always checked.
use agentguard_common::{CgroupMoveEvent, EventHeader, EventKind, ExecEvent, ExitEvent, FileEvent, ForkEvent, NetEvent};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than an event header ({need} bytes)")]
    TooShortForHeader { len: usize, need: usize },
    #[error("unknown event kind {0}: the kernel object and this binary disagree; rebuild both")]
    UnknownKind(u32),
    #[error("{kind:?} record of {len} bytes, expected {need}")]
    WrongLength {
        kind: EventKind,
        len: usize,
        need: usize,
    },
}

// Events are decoded one at a time into a stack value and logged at once;
// boxing the large exec variant would allocate on the hot path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy)]
pub enum KernelEvent {
    Exec(ExecEvent),
    Fork(ForkEvent),
    Exit(ExitEvent),
    /// A notification for the daemon, not a line of the log (see
    /// agentguard_common::EventKind::CgroupMove).
    CgroupMove(CgroupMoveEvent),
    Net(NetEvent),
    File(FileEvent),
}

impl KernelEvent {
    pub fn header(&self) -> &EventHeader {
        match self {
            Self::Exec(e) => &e.header,
            Self::Fork(e) => &e.header,
            Self::Exit(e) => &e.header,
            Self::CgroupMove(e) => &e.header,
            Self::Net(e) => &e.header,
            Self::File(e) => &e.header,
        }
    }
}

/// Read a `T` out of `bytes`, which must be exactly `size_of::<T>()` long
/// (the ring buffer rounds records up to 8 bytes; every event is a multiple of 8).
fn read_exact<T: Copy>(kind: EventKind, bytes: &[u8]) -> Result<T, DecodeError> {
    let need = std::mem::size_of::<T>();
    if bytes.len() != need {
        return Err(DecodeError::WrongLength {
            kind,
            len: bytes.len(),
            need,
        });
    }
    // SAFETY: length checked; T is a repr(C) plain-data event with no invalid
    // bit patterns (integers and byte arrays only); read_unaligned copes with
    // any alignment of the ring buffer slice.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn decode(bytes: &[u8]) -> Result<KernelEvent, DecodeError> {
    let need = std::mem::size_of::<EventHeader>();
    if bytes.len() < need {
        return Err(DecodeError::TooShortForHeader {
            len: bytes.len(),
            need,
        });
    }
    let raw_kind = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let kind = EventKind::from_u32(raw_kind).ok_or(DecodeError::UnknownKind(raw_kind))?;
    Ok(match kind {
        EventKind::Exec => KernelEvent::Exec(read_exact(kind, bytes)?),
        EventKind::Fork => KernelEvent::Fork(read_exact(kind, bytes)?),
        EventKind::Exit => KernelEvent::Exit(read_exact(kind, bytes)?),
        EventKind::CgroupMove => KernelEvent::CgroupMove(read_exact(kind, bytes)?),
        EventKind::Net => KernelEvent::Net(read_exact(kind, bytes)?),
        EventKind::File => KernelEvent::File(read_exact(kind, bytes)?),
    })
}

/// A NUL-terminated byte buffer as text (lossy).
pub fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use agentguard_common::Tag;

    use super::*;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: test helper over plain-data structs.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
            .to_vec()
    }

    fn fork_event() -> ForkEvent {
        let tag = Tag { agent_id: 3, session_id: 9 };
        ForkEvent {
            header: EventHeader {
                kind: EventKind::Fork as u32,
                agent_id: tag.agent_id,
                session_id: tag.session_id,
                pid: 100,
                tid: 101,
                uid: 1000,
                ktime_ns: 42,
            },
            child_tid: 102,
            _pad: 0,
        }
    }

    #[test]
    fn decodes_a_fork_record() {
        let ev = fork_event();
        match decode(&bytes_of(&ev)).expect("decodes") {
            KernelEvent::Fork(f) => {
                assert_eq!(f.child_tid, 102);
                assert_eq!(f.header.pid, 100);
                assert_eq!(f.header.agent_id, 3);
            }
            other => panic!("decoded as {other:?}"),
        }
    }

    #[test]
    fn rejects_short_unknown_and_misfit_records() {
        assert!(matches!(decode(&[1, 0, 0]), Err(DecodeError::TooShortForHeader { .. })));
        let mut b = bytes_of(&fork_event());
        b[0] = 77;
        assert_eq!(decode(&b).expect_err("must be rejected"), DecodeError::UnknownKind(77));
        let b = bytes_of(&fork_event());
        assert!(matches!(
            decode(&b[..36]),
            Err(DecodeError::WrongLength { kind: EventKind::Fork, .. })
        ));
    }

    #[test]
    fn c_str_stops_at_nul() {
        assert_eq!(c_str(b"/bin/true\0junk"), "/bin/true");
        assert_eq!(c_str(b"abc"), "abc");
    }
}
